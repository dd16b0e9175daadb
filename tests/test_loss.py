"""model/loss.py: the chunked LM head + cross-entropy against F.cross_entropy on float64 logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from builders import tiny_model
from model import loss as loss_mod
from model.loss import linear_cross_entropy


def reference(h, w, targets):
    """Loss and gradients of the plain path in float64: the whole logit matrix, then F.cross_entropy."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = F.cross_entropy(h64 @ w64.t(), targets, ignore_index=-1)
    loss.backward()
    return loss, h64.grad, w64.grad


@pytest.mark.parametrize("n, chunk_logits", [(300, 1 << 22), (300, 64 * 1000), (257, 64 * 1000)])
def test_loss_and_gradients_match_float64_cross_entropy(monkeypatch, n, chunk_logits):
    # 64 rows a chunk at vocab 1,000: several chunks and a ragged last one; 1 << 22: a single chunk.
    monkeypatch.setattr(loss_mod, "CHUNK_LOGITS", chunk_logits)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, 48, generator=g).requires_grad_()
    w = (torch.randn(1000, 48, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, 1000, (n,), generator=g)
    targets[::5] = -1  # ignored rows, including ones in every chunk
    loss = linear_cross_entropy(h, w, targets)
    (loss * 3.0).backward()  # a non-unit incoming gradient: backward must scale by it
    ref_loss, ref_h, ref_w = reference(h, w, targets)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    torch.testing.assert_close(h.grad.double(), 3.0 * ref_h, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w.grad.double(), 3.0 * ref_w, rtol=1e-4, atol=1e-7)


def test_without_gradients_it_only_computes_the_loss():
    # Under no_grad (evaluation) the only matmul is the logits' one: 2 x N x dim x vocab FLOPs, not the
    # backward's two more.
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(100, 16, generator=g), torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (100,), generator=g)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loss = linear_cross_entropy(h.requires_grad_(), w.requires_grad_(), targets)
    assert counter.get_total_flops() == 2 * 100 * 16 * 50
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(reference(h, w, targets)[0].item(), abs=1e-5)


def test_all_targets_ignored_is_nan_like_cross_entropy():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    assert torch.isnan(linear_cross_entropy(h, w, torch.full((4,), -1)))


def test_autocast_runs_the_matmuls_in_its_dtype():
    # bf16 autocast (a GPU's training set-up, here on the CPU): the loss and gradients stay those of the
    # plain path to bf16's precision, and the weight's gradient keeps the weight's dtype.
    g = torch.Generator().manual_seed(2)
    h = torch.randn(200, 32, generator=g).requires_grad_()
    w = (torch.randn(500, 32, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, 500, (200,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, targets)
    loss.backward()
    ref_loss, ref_h, ref_w = reference(h, w, targets)
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)
    torch.testing.assert_close(h.grad.double(), ref_h, rtol=5e-2, atol=2e-4)
    torch.testing.assert_close(w.grad.double(), ref_w, rtol=5e-2, atol=2e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_is_the_cross_entropy_of_its_logits(tie):
    # The model's loss path (no logits) against its own logits path through float64 cross-entropy, with
    # the gradients of every parameter: tied embeddings get the head's gradient plus the lookup's.
    model = tiny_model("gqa", tie_embeddings=tie).train()
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    y = x.roll(-1, 1)
    y[:, -1] = -1
    logits, loss = model(x, y)
    assert logits is None
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(x)
    ref = F.cross_entropy(logits.double().flatten(0, 1), y.flatten(), ignore_index=-1)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
