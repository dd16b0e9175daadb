"""Config resolvers of the attention ablation presets (conf/experiment/attention_ablation*.yaml).

`sweep_group` names the wandb group after the sweep folder:

    wandb.group: ${sweep_group:attention_ablation}  ->  "attention_ablation multirun/2026-11-22/14-07-05"

(the same for every run of one `python train.py -m` sweep; the run folder for a single run; the bare
prefix outside a Hydra app, e.g. with hydra.compose in tests).

`matched_ffn_dim` gives equal parameter counts across attention variants; `matched_kv_lora_rank` gives MLA
the KV cache bytes per token of another variant (below).

The attention variants differ in their K/V projections, so at equal width they differ in parameters
(at model/tiny: MHA 3.34M, GQA 3.15M, MQA 3.10M, MLA 3.25M). conf/experiment/attention_ablation_matched.yaml
sets

    model.ffn_dim: ${matched_ffn_dim:mha,512}

which gives each variant the SwiGLU width that brings its parameter count to that of the reference
variant (here MHA) at ffn_dim 512: the parameters a variant saves in attention go into its FFN. Counts
then match to within 3 x dim x n_layers / 2 (one FFN unit per layer costs 3 x dim).
"""

from dataclasses import fields

from omegaconf import OmegaConf

from model import ModelConfig

KV_HEADS = {"mha": None, "mqa": 1}  # None: n_heads; gqa and mla keep the configured n_kv_heads


def count_params(model_fields: dict) -> int:
    """Exact parameter count of the Transformer for these model fields (built on the meta device: no memory)."""
    import torch

    from model import Transformer

    with torch.device("meta"):
        return Transformer(ModelConfig(**model_fields)).num_params()


def matched_ffn_dim(model_fields: dict, reference: str, reference_ffn: int) -> int:
    """ffn_dim for model_fields' variant so that its parameter count matches `reference` at `reference_ffn`."""
    known = {f.name for f in fields(ModelConfig)}
    mine = {k: v for k, v in model_fields.items() if k in known}
    mine["ffn_dim"] = reference_ffn
    ref = dict(mine, attention=reference)
    ref["n_kv_heads"] = KV_HEADS.get(reference, ref["n_kv_heads"]) or ref["n_heads"]
    target = count_params(ref)
    base = count_params(mine)
    per_unit = count_params(dict(mine, ffn_dim=reference_ffn + 1)) - base  # 3 x dim x n_layers
    return max(1, reference_ffn + round((target - base) / per_unit))


def matched_kv_lora_rank(model_fields: dict, reference: str) -> int:
    """kv_lora_rank that gives MLA, at these dims, the KV bytes per token of `reference` (mha, gqa or mqa with
    its n_kv_heads): MLA caches kv_lora_rank + qk_rope_head_dim values per layer, the others 2 x kv heads x
    head_dim. conf/experiment/attention_ablation_matched_kv.yaml: ${matched_kv_lora_rank:gqa}."""
    known = {f.name for f in fields(ModelConfig)}
    ref = {k: v for k, v in model_fields.items() if k in known and k != "kv_lora_rank"}
    ref.update(attention=reference, n_kv_heads=KV_HEADS.get(reference, ref["n_kv_heads"]) or ref["n_heads"])
    rank = ModelConfig(**ref).kv_cache_values_per_token_per_layer() - ref["qk_rope_head_dim"]
    if rank < 1:
        raise ValueError(f"{reference}'s KV cache is no larger than MLA's rope key alone "
                         f"(qk_rope_head_dim {ref['qk_rope_head_dim']}): lower model.qk_rope_head_dim")
    return rank


def _resolve(reference: str, reference_ffn, *, _parent_) -> int:
    node = {k: _parent_[k] for k in _parent_ if k != "ffn_dim"}  # reading ffn_dim would recurse into us
    return matched_ffn_dim(node, str(reference), int(reference_ffn))


def _resolve_kv(reference: str, *, _parent_) -> int:
    node = {k: _parent_[k] for k in _parent_ if k != "kv_lora_rank"}  # reading kv_lora_rank would recurse into us
    return matched_kv_lora_rank(node, str(reference))


def sweep_group(prefix: str) -> str:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return prefix
    hc = HydraConfig.get()
    return f"{prefix} {hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir}"


def register_resolvers() -> None:
    # replace=True: a second registration (train.py and scripts/ablation_report.py both register) is no error
    OmegaConf.register_new_resolver("matched_ffn_dim", _resolve, replace=True)
    OmegaConf.register_new_resolver("matched_kv_lora_rank", _resolve_kv, replace=True)
    OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)
