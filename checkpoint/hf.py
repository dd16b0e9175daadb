"""Hugging Face folders: our weights and config <-> `LlamaForCausalLM` and `DeepseekV3ForCausalLM`.

A state-dict adapter in torchtitan's style: names and layouts are mapped here and nowhere else, so the
model code never learns about HF. MHA/GQA/MQA are `LlamaForCausalLM`; MLA is `DeepseekV3ForCausalLM`
with every layer dense (first_k_dense_replace = num_hidden_layers), the closest native class.

    ours (layer i)           LlamaForCausalLM (model.layers.i.)    DeepseekV3ForCausalLM (model.layers.i.)
    attn_norm                input_layernorm                       input_layernorm
    attn.wqkv  [q; k; v]     self_attn.{q,k,v}_proj                -
    attn.wq                  -                                     self_attn.q_proj       (rope rows permuted)
    attn.wq.0 / .1 / .2      -                                     self_attn.q_a_proj / q_a_layernorm / q_b_proj
    attn.wkv_a               -                                     self_attn.kv_a_proj_with_mqa (rope rows permuted)
    attn.kv_norm / wkv_b     -                                     self_attn.kv_a_layernorm / kv_b_proj
    attn.wo                  self_attn.o_proj                      self_attn.o_proj
    ffn_norm                 post_attention_layernorm              post_attention_layernorm
    ffn.w13  [gate; up]      mlp.{gate,up}_proj                    mlp.{gate,up}_proj
    ffn.w2                   mlp.down_proj                         mlp.down_proj
    embed / norm / lm_head   model.embed_tokens / model.norm / lm_head

RoPE layouts. We rotate the two halves of a head; so does HF's Llama, so q/k rows are copied as they
are. DeepSeek checkpoints store the rotary channels of q_pe/k_pe as interleaved pairs (x0, x1), (x2,
x3), ... (`rope_interleave`, what vLLM and llama.cpp also expect), so those rows are permuted: HF row
2j is our row j and HF row 2j+1 our row j + d/2. Permutations are exact, so ours -> HF -> ours is bitwise.

The latent norms. transformers' DeepSeek code builds kv_a_layernorm/q_a_layernorm with eps 1e-6
whatever rms_norm_eps says; our MLA uses model.latent_norm_eps (None = norm_eps). An MLA model whose
latent eps is not 1e-6 is refused rather than exported slightly wrong (1e-5 vs 1e-6 moves the logits by
4e-5 to 1.6e-4); new MLA runs use 1e-6 (conf/attention/mla.yaml). Import sets latent_norm_eps = 1e-6.
"""

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from data.chat import end_of_turn_id
from model import ModelConfig

from .store import CheckpointError, unusable

DEEPSEEK_LATENT_EPS = 1e-6  # hard-coded by transformers' DeepseekV3RMSNorm for the latent norms
MAX_SHARD_BYTES = 5 * 1024 ** 3  # one safetensors file up to this size, shards with an index above
INDEX_FILE = "model.safetensors.index.json"
LLAMA, DEEPSEEK = "LlamaForCausalLM", "DeepseekV3ForCausalLM"
MODEL_TYPES = {"llama": LLAMA, "deepseek_v3": DEEPSEEK}


def is_hf_folder(path) -> bool:
    """A folder whose config.json is a HF model config (it names an architecture or model type), not ours."""
    f = Path(path).expanduser() / "config.json"
    if not f.is_file():
        return False
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "model" not in cfg and ("architectures" in cfg or "model_type" in cfg)


# ----------------------------------------------------------------------------- rope row permutation

def _interleave(rope: int) -> torch.Tensor:
    """Index i of the result is our row for HF row i: [0, d/2, 1, d/2 + 1, ...]."""
    return torch.arange(rope).view(2, rope // 2).t().flatten()


def permute_rope_rows(w: torch.Tensor, period: int, start: int, rope: int, to_hf: bool) -> torch.Tensor:
    """Reorder the `rope` rows starting at `start` inside every group of `period` rows."""
    order = _interleave(rope) if to_hf else torch.argsort(_interleave(rope))
    w = w.reshape(-1, period, w.shape[-1]).clone()  # a copy: the input may be a strided view
    w[:, start:start + rope] = w[:, start:start + rope][:, order]
    return w.view(-1, w.shape[-1])


# ----------------------------------------------------------------------------- weights

def _layer_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our name, HF name) for the weights copied as they are, per layer, with {i} for the index."""
    names = [("attn_norm.weight", "input_layernorm.weight"), ("attn.wo.weight", "self_attn.o_proj.weight"),
             ("ffn_norm.weight", "post_attention_layernorm.weight"), ("ffn.w2.weight", "mlp.down_proj.weight")]
    if cfg.attention == "mla":
        names += [("attn.kv_norm.weight", "self_attn.kv_a_layernorm.weight"),
                  ("attn.wkv_b.weight", "self_attn.kv_b_proj.weight")]
        if cfg.q_lora_rank:
            names += [("attn.wq.0.weight", "self_attn.q_a_proj.weight"),
                      ("attn.wq.1.weight", "self_attn.q_a_layernorm.weight")]
    return names


def to_hf(cfg: ModelConfig, sd: dict) -> dict:
    """Our state dict -> HF tensors (lm_head left out when tied: HF ties it to embed_tokens)."""
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        for a, b in _layer_names(cfg):
            out[hf + b] = sd[ours + a]
        gate, up = sd[ours + "ffn.w13.weight"].chunk(2, dim=0)
        out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate, up
        if cfg.attention == "mla":
            wq = "attn.wq.2.weight" if cfg.q_lora_rank else "attn.wq.weight"
            q = permute_rope_rows(sd[ours + wq], qk, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, to_hf=True)
            out[hf + ("self_attn.q_b_proj.weight" if cfg.q_lora_rank else "self_attn.q_proj.weight")] = q
            rows = cfg.kv_lora_rank + cfg.qk_rope_head_dim
            out[hf + "self_attn.kv_a_proj_with_mqa.weight"] = permute_rope_rows(
                sd[ours + "attn.wkv_a.weight"], rows, cfg.kv_lora_rank, cfg.qk_rope_head_dim, to_hf=True)
        else:
            q, k, v = sd[ours + "attn.wqkv.weight"].split(
                [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim])
            out[hf + "self_attn.q_proj.weight"], out[hf + "self_attn.k_proj.weight"] = q, k
            out[hf + "self_attn.v_proj.weight"] = v
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(cfg: ModelConfig, hf: dict, where: str, rope_interleave: bool = True) -> dict:
    """HF tensors -> our state dict; CheckpointError naming the first missing or unexpected tensor.

    rope_interleave: the DeepSeek config's flag (rotary rows stored as interleaved pairs)."""
    hf = dict(hf)

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise CheckpointError(f"HF folder '{where}' lacks the tensor {name}")
        return hf.pop(name)

    sd = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some folders store the tied copy anyway
        sd["lm_head.weight"] = sd["embed.weight"]
    else:
        sd["lm_head.weight"] = take("lm_head.weight")
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    for i in range(cfg.n_layers):
        ours, p = f"layers.{i}.", f"model.layers.{i}."
        for a, b in _layer_names(cfg):
            sd[ours + a] = take(p + b)
        sd[ours + "ffn.w13.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        if cfg.attention == "mla":
            def unperm(w, period, start):
                return permute_rope_rows(w, period, start, cfg.qk_rope_head_dim, to_hf=False) if rope_interleave else w

            q = take(p + ("self_attn.q_b_proj.weight" if cfg.q_lora_rank else "self_attn.q_proj.weight"))
            sd[ours + ("attn.wq.2.weight" if cfg.q_lora_rank else "attn.wq.weight")] = unperm(q, qk, cfg.qk_nope_head_dim)
            sd[ours + "attn.wkv_a.weight"] = unperm(take(p + "self_attn.kv_a_proj_with_mqa.weight"),
                                                    cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank)
        else:
            sd[ours + "attn.wqkv.weight"] = torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
    if hf:
        extra = sorted(hf)[0]
        raise CheckpointError(f"HF folder '{where}' has tensors small-llm does not use (e.g. {extra}, "
                              f"{len(hf)} in all): biases, extra layers or MoE experts are not supported")
    return sd


# ----------------------------------------------------------------------------- config

def hf_config(cfg: ModelConfig, eos_id: Optional[int], dtype: torch.dtype) -> dict:
    """config.json for `cfg`; legacy rope_theta/rope_scaling keys, which every HF reader understands."""
    if cfg.attention == "mla" and cfg.mla_norm_eps != DEEPSEEK_LATENT_EPS:
        raise CheckpointError(
            f"this MLA model normalises its latents with eps {cfg.mla_norm_eps:g}, but transformers' DeepSeek "
            f"classes fix that eps at {DEEPSEEK_LATENT_EPS:g}, so the export would not be exact; train MLA with "
            f"model.latent_norm_eps={DEEPSEEK_LATENT_EPS:g} (the default of attention=mla since this export exists)")
    out = {
        "architectures": [DEEPSEEK if cfg.attention == "mla" else LLAMA],
        "model_type": "deepseek_v3" if cfg.attention == "mla" else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling_factor == 1.0 else {
            "rope_type": "llama3", "factor": cfg.rope_scaling_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len},
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.attention == "mla":
        out.update(num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None,
                   kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                   qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, rope_interleave=True,
                   first_k_dense_replace=cfg.n_layers)  # every layer dense: no expert is ever built
    else:
        out.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, mlp_bias=False)
    return out


def model_config(hf: dict, where: str) -> tuple[ModelConfig, bool]:
    """(ModelConfig, rope_interleave) from a HF config.json; CheckpointError naming what is unsupported."""
    def fail(what: str):
        raise CheckpointError(f"HF folder '{where}': {what} is not supported by small-llm")

    arch = (hf.get("architectures") or [MODEL_TYPES.get(hf.get("model_type"), hf.get("model_type"))])[0]
    if arch not in (LLAMA, DEEPSEEK):
        fail(f"architecture {arch} (readable: {LLAMA}, {DEEPSEEK} with dense layers)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            fail(f"{key}=true")
    if hf.get("sliding_window") is not None:
        fail(f"sliding_window={hf['sliding_window']}")
    if hf.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act={hf['hidden_act']}")
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 nests theta and scaling here
    rope.update({k: v for k, v in (hf.get("rope_scaling") or {}).items()})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        fail(f"rope_scaling of type {kind} (only llama3)")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    n_layers, n_heads, dim = hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"]
    kw = dict(vocab_size=hf["vocab_size"], dim=dim, n_layers=n_layers, n_heads=n_heads,
              n_kv_heads=hf.get("num_key_value_heads") or n_heads, ffn_dim=hf["intermediate_size"],
              max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
              norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if kind == "llama3":
        kw.update(rope_scaling_factor=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                  rope_high_freq_factor=float(rope["high_freq_factor"]),
                  rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))
    if arch == DEEPSEEK:
        dense = hf.get("first_k_dense_replace", 3)
        if dense is None or dense < n_layers:
            fail(f"MoE layers (first_k_dense_replace={dense} < num_hidden_layers={n_layers})")
        kw.update(attention="mla", n_kv_heads=n_heads, q_lora_rank=hf.get("q_lora_rank") or 0,
                  kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                  qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
                  latent_norm_eps=DEEPSEEK_LATENT_EPS)
    else:
        if hf.get("head_dim", dim // n_heads) != dim // n_heads:
            fail(f"head_dim={hf['head_dim']} other than hidden_size / num_attention_heads")
        kv = kw["n_kv_heads"]
        kw["attention"] = "mha" if kv == n_heads else "mqa" if kv == 1 else "gqa"
    try:
        return ModelConfig(**kw), bool(hf.get("rope_interleave", True))
    except Exception as e:
        raise unusable(where, "config.json", e, "use another folder") from e


# ----------------------------------------------------------------------------- folders

def read_hf_folder(path, tokenizer=None) -> tuple[ModelConfig, dict, Path, Optional[int]]:
    """(config, our state dict, tokenizer.json path, eos id) from a HF folder; CheckpointError on any problem.

    tokenizer: a tokenizer.json (or a folder holding one) to use instead of the folder's own."""
    d = Path(path).expanduser()
    try:
        hf = json.loads((d / "config.json").read_text())
        gen = json.loads((d / "generation_config.json").read_text()) if (d / "generation_config.json").is_file() else {}
    except (OSError, ValueError) as e:
        raise unusable(d, "config.json", e, "use another folder") from e
    cfg, interleave = model_config(hf, str(d))
    tok = Path(tokenizer).expanduser() if tokenizer is not None else d
    tok = tok / "tokenizer.json" if tok.is_dir() else tok
    if not tok.is_file():
        raise CheckpointError(f"no tokenizer for HF folder '{d}': {tok} does not exist; name a tokenizer.json "
                              "with --tokenizer PATH")
    if (d / INDEX_FILE).is_file():
        try:
            files = sorted(set(json.loads((d / INDEX_FILE).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise unusable(d, INDEX_FILE, e, "use another folder") from e
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"HF folder '{d}' has no model.safetensors (or {INDEX_FILE}); "
                              "only safetensors weights are read")
    state = {}
    for f in files:
        try:
            state.update(load_file(d / f))
        except Exception as e:
            raise unusable(d, f, e, "use another folder") from e
    eos = gen.get("eos_token_id", hf.get("eos_token_id"))
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return cfg, from_hf(cfg, state, str(d), interleave), tok, eos


def _shards(tensors: dict, max_bytes: int) -> list[dict]:
    """Split tensors, in order, into groups of at most max_bytes (a larger tensor gets a group of its own)."""
    shards, size = [{}], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def write_hf_folder(out: Path, cfg: ModelConfig, state_dict: dict, tokenizer_path: Path, eos_id: Optional[int],
                    dtype: torch.dtype = torch.float32, card: str = "", max_shard_bytes: int = MAX_SHARD_BYTES,
                    chat_template: Optional[str] = None):
    """Fill the (new, empty) folder `out` with what `from_pretrained` reads: config, weights (sharded with an
    index above max_shard_bytes), generation config, tokenizer files (with `chat_template`, which apply_chat_template
    renders), and the model card `card`. A chat model's generation stops at the end of its turn too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, eos_id, dtype), indent=2) + "\n")
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in to_hf(cfg, state_dict).items()}
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
    tok = Tokenizer.from_file(str(tokenizer_path))
    turn_end = end_of_turn_id(tok) if chat_template else None
    gen = {"bos_token_id": eos_id, "eos_token_id": eos_id if turn_end is None else [eos_id, turn_end]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    shutil.copyfile(tokenizer_path, out / "tokenizer.json")
    eos = None if eos_id is None else tok.id_to_token(eos_id)
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
               "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
               "bos_token": eos, "eos_token": eos, "unk_token": None, "pad_token": eos}
    if chat_template:
        tok_cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    if card:
        (out / "README.md").write_text(card)
