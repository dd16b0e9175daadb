"""train.optimizer=muon: which parameters Muon gets, and that the schedule drives both optimizers."""

from unittest import mock

import pytest
import torch

from model import ModelConfig, Transformer
from training.config import TrainConfig
from training.optim import NS_COEFFICIENTS, NS_EPS, NS_STEPS, Muon, build_optimizer, lr_at, newton_schulz

HIDDEN = {"attn.wqkv.weight", "attn.wo.weight", "ffn.w13.weight", "ffn.w2.weight",  # MHA/GQA/MQA
          "attn.wq.weight", "attn.wkv_a.weight", "attn.wkv_b.weight"}  # MLA


def tiny(attention: str, tie: bool = False) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                   max_seq_len=32, attention=attention, kv_lora_rank=16, qk_nope_head_dim=8,
                                   qk_rope_head_dim=8, v_head_dim=8, tie_embeddings=tie))


@pytest.mark.parametrize("attention, tie", [("gqa", False), ("mla", False), ("gqa", True)])
def test_muon_gets_the_hidden_matrices_and_adamw_the_rest(attention, tie):
    model = tiny(attention, tie)
    adamw, muon = build_optimizer(model, TrainConfig(optimizer="muon"), "cpu")
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    name = {id(p): n for n, p in model.named_parameters()}
    to_muon = {name[id(p)] for g in muon.param_groups for p in g["params"]}
    to_adamw = {name[id(p)] for g in adamw.param_groups for p in g["params"]}
    # Written out by name (not by the rule in optim.py): the blocks' projections, nothing else.
    assert to_muon == {n for n in name.values() if n.split(".", 2)[-1] in HIDDEN}
    assert to_adamw == set(name.values()) - to_muon  # every parameter in exactly one optimizer
    assert {"embed.weight", "norm.weight"} <= to_adamw and ("lm_head.weight" in to_adamw) != tie
    decayed = {name[id(p)] for g in adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == (set() if tie else {"lm_head.weight"})
    # adamw: a single AdamW over everything, as before the option existed.
    (only,) = build_optimizer(model, TrainConfig(optimizer="adamw"), "cpu")
    assert isinstance(only, torch.optim.AdamW) and sum(len(g["params"]) for g in only.param_groups) == len(name)


def test_muon_steps_move_hidden_matrices_by_the_adamw_matched_rms():
    """match_rms_adamw: each Muon update has RMS 0.2 x lr (an orthogonal matrix of shape A x B has RMS
    1/sqrt(max(A, B)), scaled by 0.2 x sqrt(max(A, B))): the reason Muon can share AdamW's lr."""
    model = tiny("gqa")
    cfg = TrainConfig(optimizer="muon", weight_decay=0.0)
    opts = build_optimizer(model, cfg, "cpu")
    lr = lr_at(cfg.warmup_steps, cfg)
    for group in opts.param_groups:  # what the trainer does every step
        group["lr"] = lr
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 64, (4, 16))
    model(x, x)[1].backward()
    opts.step()
    for n, p in model.named_parameters():
        if n.split(".", 2)[-1] in HIDDEN:
            rms = (p.detach() - before[n]).double().pow(2).mean().sqrt().item()
            # Newton-Schulz's quintic leaves singular values in about [0.7, 1.2], not exactly 1.
            assert 0.6 * 0.2 * lr < rms < 1.25 * 0.2 * lr, (n, rms / (0.2 * lr))


def quintic(g: torch.Tensor, coefficients: tuple, steps: int, eps: float) -> torch.Tensor:
    """Newton-Schulz's quintic iteration as written, X <- a X + (b A + c A^2) X with A = X X^T, in float64."""
    a, b, c = coefficients
    x = g.double().T if g.size(0) > g.size(1) else g.double()
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if g.size(0) > g.size(1) else x).to(g.dtype)


def test_muon_takes_torchs_steps():
    """Our Muon against torch.optim.Muon (Nesterov, match_rms_adamw, decoupled weight decay) on the same
    matrices and gradients, torch's bfloat16 Newton-Schulz swapped for the float64 iteration here, so that
    the rest of the step is compared closely: momentum, look-ahead, scale, decay, state."""
    torchs = torch.optim.Muon([torch.nn.Parameter(torch.ones(2, 2))]).defaults
    assert (torchs["ns_coefficients"], torchs["ns_steps"], torchs["eps"]) == (NS_COEFFICIENTS, NS_STEPS, NS_EPS)
    torch.manual_seed(0)
    shapes = [(96, 32), (32, 96), (48, 48)]  # tall, wide (the Gram-matrix path), square
    start = [torch.randn(s) for s in shapes]
    mine, ref = [torch.nn.Parameter(w.clone()) for w in start], [torch.nn.Parameter(w.clone()) for w in start]
    opts = [Muon(mine, lr=0.02, weight_decay=0.1),
            torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")]
    with mock.patch("torch.optim._muon._zeropower_via_newtonschulz", quintic):
        for lr in (0.02, 0.05, 0.01):
            grads = [torch.randn(s) for s in shapes]
            for params, opt in zip((mine, ref), opts):
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                opt.param_groups[0]["lr"] = lr
                opt.step()
    for p, r, w in zip(mine, ref, start):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=0, atol=1e-5 * (r.detach() - w).abs().max().item())
        assert opts[0].state[p].keys() == opts[1].state[r].keys() == {"momentum_buffer"}  # one checkpoint format
        assert torch.equal(opts[0].state[p]["momentum_buffer"], opts[1].state[r]["momentum_buffer"])


def test_float32_muon_matches_torchs_bfloat16_muon():
    """Unpatched, torch's Muon runs Newton-Schulz in bfloat16: our float32 steps agree with its steps to
    bfloat16 precision (and our orthogonalisation is closer to the exact one, the SVD's U V^T)."""
    torch.manual_seed(0)
    w = torch.randn(96, 32)
    mine, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opts = [Muon([mine], lr=0.02, weight_decay=0.1),
            torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")]
    for _ in range(3):
        g = torch.randn(96, 32)
        for p, opt in zip((mine, ref), opts):
            p.grad = g.clone()
            opt.step()
    moved = (ref.detach() - w).norm()
    assert (mine.detach() - ref.detach()).norm() < 0.02 * moved
    g = torch.randn(96, 32, dtype=torch.float64)
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    ours = newton_schulz(g.float(), NS_COEFFICIENTS, NS_STEPS, NS_EPS).double()
    theirs = torch.optim._muon._zeropower_via_newtonschulz(g.float(), NS_COEFFICIENTS, NS_STEPS, NS_EPS).double()
    # the quintic leaves singular values in about [0.7, 1.2]: compare the directions, not the values
    cos = lambda a, b: (a * b).sum() / (a.norm() * b.norm())  # noqa: E731
    assert cos(ours, u @ vt) > 0.95 and cos(ours, theirs) > 0.999


@pytest.mark.parametrize("shape", [(48, 200), (200, 48), (64, 96), (64, 64)])  # Gram path, Gram path, the plain one
def test_newton_schulz_is_the_quintic_iteration(shape):
    """newton_schulz against the iteration itself in float64, on the matrix as given (wide shapes take the
    Gram-matrix path, which reorders the products)."""
    torch.manual_seed(0)
    g = torch.randn(shape, dtype=torch.float64)
    ref = quintic(g, NS_COEFFICIENTS, NS_STEPS, 0.0)
    ours = newton_schulz(g.float(), NS_COEFFICIENTS, NS_STEPS, NS_EPS)
    assert ours.dtype == torch.float32 and ours.shape == shape
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
