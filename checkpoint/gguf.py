"""GGUF export: one file that llama.cpp (and Ollama, LM Studio, ...) loads and runs, tokenizer inside.

We go through the Hugging Face tensors of hf.py and name them with the `gguf` package's own table
(TensorNameMap, what llama.cpp's convert_hf_to_gguf.py uses), so the names are llama.cpp's by
construction. Two layout points:

  - arch `llama` (MHA/GQA/MQA): llama.cpp rotates interleaved pairs (rope type NORM) while HF's Llama
    and we rotate halves, so the rows of every q and k head are permuted (row 2j <- j, 2j+1 <- j + d/2),
    exactly as convert_hf_to_gguf.py does. The dot products q.k are unchanged.
  - arch `deepseek2` (MLA): llama.cpp runs DeepSeek's MLA with dense layers (leading_dense_block_count =
    n_layers, no experts) through its non-absorbed path (attn_kv_b). Its rotary rows are already
    interleaved in DeepSeek's HF layout (hf.py). llama.cpp uses one rms eps for every norm, latent norms
    included, so an MLA model is exported only if its latent eps equals model.norm_eps.

Llama 3 RoPE scaling travels as llama.cpp expects it: a `rope_freqs` tensor of per-frequency divisors.

Tokenizer: our byte-level BPE as llama.cpp's `gpt2` model with pre-tokenizer `gpt-2` (the GPT-2 split
regex, the same as tokenizers' ByteLevel(use_regex=True)): the vocabulary by id, the merges, special
tokens typed CONTROL, ids the tokenizer lacks (a padded embedding) as UNUSED placeholders.
"""

import json
from pathlib import Path
from typing import Optional

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer

from data.chat import end_of_turn_id
from model import ModelConfig
from model.rope import llama3_scaled

from .hf import permute_rope_rows, to_hf
from .store import CheckpointError

OUTTYPES = {"f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
            "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
            "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0)}


def _tokenizer(w: gguf.GGUFWriter, tokenizer_path: Path, vocab_size: int, eos_id: Optional[int],
               chat_template: Optional[str]) -> None:
    tj = json.loads(Path(tokenizer_path).read_text())
    if tj["model"].get("type") != "BPE" or (tj.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise CheckpointError("GGUF export needs a byte-level BPE tokenizer (ours, GPT-2's): "
                              f"{tokenizer_path} is not one")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in tj["model"]["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for t in tj.get("added_tokens", []):
        tokens[t["id"]] = t["content"]
        types[t["id"]] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if eos_id is not None:
        w.add_bos_token_id(eos_id)
        w.add_eos_token_id(eos_id)
    w.add_add_bos_token(False)  # we never prepend a token: prompts are encoded as they are
    if chat_template:  # llama.cpp renders it (ChatML, data/chat.py) and ends a reply at the end-of-turn token
        w.add_chat_template(chat_template)
        turn_end = end_of_turn_id(Tokenizer.from_file(str(tokenizer_path)))
        if turn_end is not None:
            w.add_eot_token_id(turn_end)


def _hparams(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.attention != "mla":
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        return
    if cfg.mla_norm_eps != cfg.norm_eps:
        raise CheckpointError(
            f"llama.cpp normalises MLA latents with the one rms eps of the model ({cfg.norm_eps:g}), but this "
            f"model uses {cfg.mla_norm_eps:g} for them, so the GGUF would not be exact; train with "
            "model.latent_norm_eps equal to model.norm_eps to export MLA to GGUF")
    w.add_head_count_kv(cfg.n_heads)  # the non-absorbed path: every head has its own k and v
    w.add_key_length(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_leading_dense_block_count(cfg.n_layers)  # every layer dense
    w.add_expert_feed_forward_length(cfg.ffn_dim)  # required keys, unused without experts
    w.add_expert_shared_count(0)


def _tensors(cfg: ModelConfig, state_dict: dict) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 tensor in llama.cpp's layout."""
    arch = gguf.MODEL_ARCH.DEEPSEEK2 if cfg.attention == "mla" else gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, cfg.n_layers)
    out = {}
    for name, t in to_hf(cfg, state_dict).items():
        t = t.detach().float().cpu()
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "k_proj.weight")):
            t = permute_rope_rows(t, cfg.head_dim, 0, cfg.head_dim, to_hf=True)  # halves -> pairs
        out[names.get_name(name, try_suffixes=(".weight",))] = t
    if cfg.rope_scaling_factor != 1.0:
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.rope_dim, 2, dtype=torch.float64) / cfg.rope_dim))
        scaled = llama3_scaled(inv, cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                               cfg.rope_original_max_seq_len)
        out["rope_freqs.weight"] = (inv / scaled).float()  # llama.cpp divides each frequency by its factor
    return out


def write_gguf(path: Path, cfg: ModelConfig, state_dict: dict, tokenizer_path: Path, eos_id: Optional[int],
               outtype: str = "f32", name: str = "small-llm", chat_template: Optional[str] = None) -> None:
    """Write one GGUF file: hyperparameters, tokenizer (with the chat template, if any) and weights (norms and rope
    factors stay f32)."""
    if outtype not in OUTTYPES:
        raise CheckpointError(f"unknown GGUF outtype '{outtype}': choose one of {', '.join(OUTTYPES)}")
    file_type, qtype = OUTTYPES[outtype]
    arch = "deepseek2" if cfg.attention == "mla" else "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type(file_type)
    _hparams(w, cfg)
    _tokenizer(w, tokenizer_path, cfg.vocab_size, eos_id, chat_template)
    for tname, t in _tensors(cfg, state_dict).items():
        data = t.numpy()
        # Vectors stay f32 (as in llama.cpp's converter); q8_0 needs rows that are whole 32-value blocks.
        kind = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else qtype
        if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(tname, data.astype(np.float32))
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(tname, data.astype(np.float16))
        else:
            w.add_tensor(tname, gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load_in_llama_cpp(path, n_ctx: int, logits_all: bool = False, n_threads: Optional[int] = None,
                      f32_kv: bool = False):
    """Open a GGUF with llama-cpp-python (a test and benchmark dependency) without llama.cpp's extra CPU
    buffer types (weight repacking, AMX), whose AMX path crashes on q8_0 batches of more than one token
    on some CPUs. Llama() silently ignores a `use_extra_bufts` keyword, so the model parameters it starts
    from are patched for the duration of the load. f32_kv: keep the KV cache in f32 (llama.cpp's default
    is f16, which moves fp32 logits by about 1e-4)."""
    import llama_cpp
    from llama_cpp import llama_cpp as lib  # the module whose default parameters Llama() starts from

    default = lib.llama_model_default_params

    def no_extra_bufts():
        params = default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = no_extra_bufts
    try:
        kv = dict(type_k=lib.GGML_TYPE_F32, type_v=lib.GGML_TYPE_F32) if f32_kv else {}
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all, n_threads=n_threads,
                               verbose=False, **kv)
    finally:
        lib.llama_model_default_params = default
