"""Model tests: shapes, causality, backends against each other, RoPE, MLA against a naive version,
the cached (absorbed) path against the full forward, config validation and the accounting."""

import math

import pytest
import torch

from model import ConfigError, ModelConfig, Transformer, math_attention
from model.rope import apply_rope, rope_tables

VARIANTS = {
    "mha": dict(attention="mha", n_kv_heads=4),
    "gqa": dict(attention="gqa", n_kv_heads=2),
    "mqa": dict(attention="mqa", n_kv_heads=1),
    "mla": dict(attention="mla", n_kv_heads=4, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8,
                v_head_dim=10),
    "mla_qlora": dict(attention="mla", n_kv_heads=4, q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=12,
                      qk_rope_head_dim=8, v_head_dim=10),
}


def tiny(variant: str, **kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, ffn_dim=96, max_seq_len=64)
    return ModelConfig(**{**base, **VARIANTS[variant], **kw})


def build(variant: str, backend="sdpa", dtype=torch.float32, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny(variant, **kw), backend=backend).to(dtype).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_loss(variant):
    m = build(variant)
    idx = torch.randint(0, 97, (3, 20))
    logits, _ = m(idx)
    assert logits.shape == (3, 20, 97)
    assert m(idx, idx)[0] is None  # the loss path never builds the logits (model/loss.py)
    loss = m(idx, idx)[1]
    # At init the logits are near zero, so the loss is near log(vocab).
    assert abs(loss.item() - math.log(97)) < 0.5


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant, backend):
    m = build(variant, backend)
    idx = torch.randint(0, 97, (2, 24))
    changed = idx.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 97
    a, _ = m(idx)
    b, _ = m(changed)
    assert torch.equal(a[:, :15], b[:, :15]), "a future token changed an earlier logit"
    assert not torch.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_backends_agree(variant):
    idx = torch.randint(0, 97, (2, 33))
    sdpa, _ = build(variant, "sdpa", torch.float64)(idx)
    naive, _ = build(variant, "math", torch.float64)(idx)
    torch.testing.assert_close(sdpa, naive, rtol=1e-9, atol=1e-9)


def test_math_attention_matches_explicit_loop():
    torch.manual_seed(1)
    B, Hq, Hkv, T, D, Dv = 2, 6, 2, 9, 8, 5
    q, k, v = torch.randn(B, Hq, T, D, dtype=torch.float64), torch.randn(B, Hkv, T, D, dtype=torch.float64), \
        torch.randn(B, Hkv, T, Dv, dtype=torch.float64)
    out = math_attention(q, k, v, 0.3)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for t in range(T):
                w = torch.softmax(torch.stack([q[b, h, t] @ k[b, g, s] * 0.3 for s in range(t + 1)]), 0)
                ref = sum(w[s] * v[b, g, s] for s in range(t + 1))
                torch.testing.assert_close(out[b, h, t], ref)


def test_rope_properties():
    cos, sin = rope_tables(16, 64, 10000.0)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def rot(x, pos):
        return apply_rope(x, cos[pos:pos + 1].unsqueeze(0), sin[pos:pos + 1].unsqueeze(0))

    torch.testing.assert_close(rot(q, 0), q)  # position 0 is the identity
    torch.testing.assert_close(rot(q, 37).norm(), q.norm())  # a rotation keeps the norm
    # The score depends only on the distance between positions.
    s1 = (rot(q, 10) * rot(k, 3)).sum()
    s2 = (rot(q, 40) * rot(k, 33)).sum()
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(s1, (rot(q, 10) * rot(k, 4)).sum())
    # The first pair rotates at frequency 1 (theta^0): a plain 2-D rotation by `pos` radians.
    x = torch.zeros(1, 1, 1, 16)
    x[..., 0] = 1.0
    y = rot(x, 2)
    torch.testing.assert_close(y[..., 0].squeeze(), torch.tensor(math.cos(2.0)))
    torch.testing.assert_close(y[..., 8].squeeze(), torch.tensor(math.sin(2.0)))


def naive_mla_layer(attn, x, cos, sin):
    """DeepSeek-V2 MLA written out head by head from the module's weights, in float64."""
    B, T, _ = x.shape
    H, nope, rope, vd, r = attn.n_heads, attn.nope, attn.rope, attn.v_dim, attn.rank

    def rot(t, pos):  # t [..., rope], rotate halves
        c, s = cos[pos], sin[pos]
        a, b = t[..., : rope // 2], t[..., rope // 2:]
        return torch.cat([a * c - b * s, a * s + b * c], -1)

    q_all = attn.wq(x)
    kv_a = x @ attn.wkv_a.weight.T
    c = kv_a[..., :r]
    c = c / torch.sqrt((c * c).mean(-1, keepdim=True) + attn.kv_norm.eps) * attn.kv_norm.weight
    k_pe = kv_a[..., r:]
    w_b = attn.wkv_b.weight.view(H, nope + vd, r)
    out = torch.zeros(B, T, H, vd, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            qh = q_all[b].view(T, H, nope + rope)[:, h]
            for t in range(T):
                q_t = torch.cat([qh[t, :nope], rot(qh[t, nope:], t)])
                scores, values = [], []
                for s in range(t + 1):
                    k_s = torch.cat([w_b[h, :nope] @ c[b, s], rot(k_pe[b, s], s)])
                    scores.append(q_t @ k_s / math.sqrt(nope + rope))
                    values.append(w_b[h, nope:] @ c[b, s])
                p = torch.softmax(torch.stack(scores), 0)
                out[b, t, h] = sum(p[i] * values[i] for i in range(t + 1))
    return attn.wo(out.reshape(B, T, H * vd))


@pytest.mark.parametrize("variant", ["mla", "mla_qlora"])
def test_mla_matches_naive(variant):
    m = build(variant, "math", torch.float64)
    attn = m.layers[0].attn
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    T = x.shape[1]
    got = attn(x, m.rope_cos[:T].unsqueeze(0).double(), m.rope_sin[:T].unsqueeze(0).double())
    torch.testing.assert_close(got, naive_mla_layer(attn, x, m.rope_cos.double(), m.rope_sin.double()))


class DenseCache:
    """A minimal contiguous cache for one sequence, written for this test: it checks the model's side
    of the cache contract (including MLA's absorbed latent path) independently of engine/."""

    def __init__(self):
        self.k, self.v = {}, {}

    def attend(self, layer, q, k, v, scale):
        self.k[layer] = torch.cat([self.k[layer], k]) if layer in self.k else k
        if v is not None:
            self.v[layer] = torch.cat([self.v[layer], v]) if layer in self.v else v
        keys = self.k[layer]
        # MLA's latent entry [c_kv, k_pe]: the values are c_kv, its first kv_lora_rank channels.
        values = self.v[layer] if v is not None else keys[..., : self.latent_rank]
        T, S, Hq, Hkv = q.shape[0], keys.shape[0], q.shape[1], keys.shape[1]
        out = torch.zeros(T, Hq, values.shape[-1], dtype=q.dtype)
        for h in range(Hq):
            g = h // (Hq // Hkv)
            scores = (q[:, h] @ keys[:, g].T) * scale  # [T, S]
            offset = S - T  # new tokens sit at the end of the context
            mask = torch.arange(S)[None, :] <= (torch.arange(T)[:, None] + offset)
            out[:, h] = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ values[:, g]
        return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decode_matches_full_forward(variant):
    m = build(variant, "math", torch.float64)
    idx = torch.randint(0, 97, (1, 12))
    full, _ = m(idx)
    cache = DenseCache()
    cache.latent_rank = m.cfg.kv_lora_rank
    prefill, _ = m(idx[:, :5], positions=torch.arange(5)[None], cache=cache)
    steps = [prefill]
    for t in range(5, 12):
        logits, _ = m(idx[:, t:t + 1], positions=torch.tensor([[t]]), cache=cache)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("overrides, message", [
    (dict(dim=65), "divisible by model.n_heads"),
    (dict(n_kv_heads=3, attention="gqa"), "divisible by model.n_kv_heads"),
    (dict(attention="mha", n_kv_heads=2), "attention=mha needs"),
    (dict(attention="mqa", n_kv_heads=2), "attention=mqa needs"),
    (dict(attention="xyz"), "unknown attention"),
    (dict(attention="mla", qk_rope_head_dim=7), "must be even"),
    (dict(attention="mla", kv_lora_rank=0), "kv_lora_rank must be positive"),
    (dict(dim=60, n_heads=4, n_kv_heads=2), "must be even"),  # head_dim 15
    (dict(n_layers=0), "n_layers must be positive"),
])
def test_config_validation(overrides, message):
    base = dict(vocab_size=97, dim=64, n_heads=4, n_kv_heads=2, attention="gqa")
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**base, **overrides})


def test_kv_cache_bytes_and_params():
    gqa = tiny("gqa")
    assert gqa.kv_cache_bytes_per_token(dtype_bytes=2, per_layer=True) == 2 * 2 * 16 * 2  # k+v, 2 heads, hd 16
    assert gqa.kv_cache_bytes_per_token(dtype_bytes=4) == 2 * 2 * 16 * 4 * 2  # fp32, 2 layers
    mla = tiny("mla")
    assert mla.kv_cache_bytes_per_token(dtype_bytes=2, per_layer=True) == (24 + 8) * 2
    m = build("gqa")
    d, hd = 64, 16
    per_layer = d * (4 + 2 * 2) * hd + 4 * hd * d + d * 2 * 96 + 96 * d + 2 * d
    expected = 97 * d + 2 * per_layer + d + d * 97
    assert m.num_params() == expected
    tied = build("gqa", tie_embeddings=True)
    assert tied.num_params() == expected - d * 97


def test_depth_scaled_init():
    m = build("gqa", n_layers=8)
    std = m.layers[0].attn.wo.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.002
    assert abs(m.layers[0].attn.wqkv.weight.std().item() - 0.02) < 0.002
