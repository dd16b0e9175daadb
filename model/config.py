"""Model configuration: one dataclass, validated when built.

Attention is chosen by `attention`:

    attention   keys/values                         KV cache per token per layer
    ---------   ---------------------------------   ------------------------------------
    mha         n_kv_heads == n_heads               2 * n_heads * head_dim
    gqa         n_heads % n_kv_heads == 0           2 * n_kv_heads * head_dim
    mqa         n_kv_heads == 1                     2 * head_dim
    mla         a shared latent c_kv (DeepSeek-V2)  kv_lora_rank + qk_rope_head_dim

MHA, GQA and MQA are one module: query head h reads key/value head h // (n_heads // n_kv_heads).

    MHA  q: 0 1 2 3 4 5 6 7     GQA  q: 0 1 2 3 4 5 6 7     MQA  q: 0 1 2 3 4 5 6 7
         k: 0 1 2 3 4 5 6 7          k: 0 0 1 1 2 2 3 3          k: 0 0 0 0 0 0 0 0

MLA compresses keys and values into a `kv_lora_rank` latent that all heads share, and carries
position in a separate `qk_rope_head_dim` key (also shared by all heads), because RoPE does not
commute with the latent up-projection (DeepSeek-V2, section 2.1.3).
"""

from dataclasses import asdict, dataclass
from typing import Annotated, Literal, Optional

ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla")


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the option to change."""


@dataclass
class ModelConfig:
    vocab_size: int = 4096  # set from the tokenizer by train.py
    dim: int = 256  # residual stream width
    n_layers: int = 6  # transformer blocks
    n_heads: int = 8  # query heads; head_dim = dim // n_heads
    n_kv_heads: int = 2  # key/value heads (see the table above)
    ffn_dim: int = 688  # SwiGLU hidden width (about 8/3 * dim, rounded)
    max_seq_len: int = 256  # longest context RoPE tables are built for
    rope_theta: float = 10000.0  # RoPE's base: the wavelengths of the rotated pairs grow from 2*pi to about this
    # Llama 3 RoPE scaling (HF rope_scaling type "llama3"): low frequencies slowed by this factor,
    # high ones kept, a smooth ramp between (see rope.py). 1.0 = off. Set by importing a Llama 3 model.
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # Llama 3 RoPE scaling: wavelengths above original / this are slowed
    rope_high_freq_factor: float = 4.0  # Llama 3 RoPE scaling: wavelengths below original / this are kept
    rope_original_max_seq_len: int = 8192  # Llama 3 RoPE scaling: the context the model was first trained for
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    tie_embeddings: bool = False  # share the token embedding with the LM head
    attention: Annotated[str, Literal[ATTENTION_KINDS]] = "gqa"  # the attention variant (see the table above)
    # MLA only (DeepSeek-V2 names). q_lora_rank = 0 projects queries directly from the residual.
    q_lora_rank: int = 0
    kv_lora_rank: int = 64  # MLA: width of the shared key/value latent c_kv (what the KV cache stores)
    qk_nope_head_dim: int = 32  # MLA: per-head query/key width without position (RoPE)
    qk_rope_head_dim: int = 16  # MLA: width of the RoPE key shared by all heads (cached beside c_kv)
    v_head_dim: int = 32  # MLA: per-head value width
    # eps of MLA's latent RMSNorms (c_kv, and c_q with q_lora_rank); None = norm_eps. transformers'
    # DeepSeek classes fix it at 1e-6 whatever rms_norm_eps says, so only 1e-6 exports exactly to them.
    latent_norm_eps: Optional[float] = None

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        need(self.attention in ATTENTION_KINDS,
             f"unknown attention '{self.attention}': choose one of {', '.join(ATTENTION_KINDS)} (attention=...)")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            need(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}")
        need(self.dim % self.n_heads == 0,
             f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        need(self.norm_eps > 0 and self.rope_theta > 0, "model.norm_eps and model.rope_theta must be positive")
        need(self.latent_norm_eps is None or self.latent_norm_eps > 0, "model.latent_norm_eps must be positive")
        need(self.rope_scaling_factor >= 1 and self.rope_high_freq_factor > self.rope_low_freq_factor > 0
             and self.rope_original_max_seq_len > 0,
             "model.rope_scaling_factor must be >= 1 and 0 < rope_low_freq_factor < rope_high_freq_factor")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                need(getattr(self, name) > 0, f"model.{name} must be positive for attention=mla")
            need(self.q_lora_rank >= 0, "model.q_lora_rank must be >= 0 (0 disables the query low-rank path)")
            need(self.qk_rope_head_dim % 2 == 0,
                 f"model.qk_rope_head_dim ({self.qk_rope_head_dim}) must be even: RoPE rotates pairs")
            return
        need(self.head_dim % 2 == 0,
             f"head_dim = model.dim / model.n_heads = {self.head_dim} must be even: RoPE rotates pairs")
        need(self.n_heads % self.n_kv_heads == 0,
             f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})")
        need(self.attention != "mha" or self.n_kv_heads == self.n_heads,
             f"attention=mha needs model.n_kv_heads == model.n_heads ({self.n_heads}), got {self.n_kv_heads}; "
             "use attention=gqa for fewer kv heads")
        need(self.attention != "mqa" or self.n_kv_heads == 1,
             f"attention=mqa needs model.n_kv_heads == 1, got {self.n_kv_heads}; use attention=gqa")

    @property
    def rope_dim(self) -> int:
        """Width of the rotated part of each query/key head."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def mla_norm_eps(self) -> float:
        """eps of the MLA latent norms."""
        return self.norm_eps if self.latent_norm_eps is None else self.latent_norm_eps

    def kv_cache_values_per_token_per_layer(self) -> int:
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.n_kv_heads * self.head_dim

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2, per_layer: bool = False) -> int:
        """Bytes of KV cache one token costs at inference (default: bf16/fp16 storage)."""
        per = self.kv_cache_values_per_token_per_layer() * dtype_bytes
        return per if per_layer else per * self.n_layers

    def to_dict(self) -> dict:
        return asdict(self)
