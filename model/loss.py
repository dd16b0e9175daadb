"""The LM head and the cross-entropy in one pass over row chunks, never holding the [tokens, vocab] logits.

`F.cross_entropy(lm_head(h))` writes the whole logit matrix (4,096 tokens x 8,192 ids is 134 MB in fp32),
then log-softmax reads and writes it again, and its backward makes a third and fourth pass: on this
project's CPU those passes over main memory took 0.28 s against the head's three matmuls' 0.44 s. Here each
chunk of rows makes its logits, their log-softmax and their gradient while they are still in cache,
then feeds that gradient straight into the two backward matmuls. The gradients are therefore computed
in the forward (when they are needed) and the backward only scales them by the incoming gradient, as
in Liger-Kernel's fused linear cross-entropy. The matmuls are the same as the plain path's; the
result equals `F.cross_entropy(h @ weight.T, targets, ignore_index=-1)` to float rounding
(tests/test_loss.py checks both against float64).
"""

import torch

# Rows per chunk: about 4M logits (16 MB in fp32), the fastest of 256, 512 and 1,024 rows at vocab 8,192,
# and at least 64 rows so a large vocabulary still gets real matmuls.
CHUNK_LOGITS = 1 << 22


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits `h @ weight.T` ([N, dim] @ [vocab, dim]) against `targets` [N];
    targets of -1 are ignored, as in F.cross_entropy(..., ignore_index=-1)."""
    rows = max(64, CHUNK_LOGITS // weight.shape[0])
    # Inside forward, needs_input_grad says True even under no_grad: pass the grad mode, so evaluation
    # computes the loss alone.
    return _LinearCrossEntropy.apply(h, weight, targets, rows, torch.is_grad_enabled())


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, rows, grad_enabled):
        # Under autocast (bf16 on a GPU) run the matmuls in its dtype, as the lm_head Linear would, with
        # the softmax and the sums in fp32.
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        want_h, want_w = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        with torch.autocast(dev, enabled=False):
            w = weight.to(dtype)
            valid = targets != -1
            safe = targets.clamp(min=0).unsqueeze(1)  # gather/scatter index; ignored rows are masked out
            grad_h = torch.empty_like(h) if want_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, h.shape[0], rows):
                hc, keep = h[s:s + rows].to(dtype), valid[s:s + rows].unsqueeze(1)
                logp = torch.log_softmax((hc @ w.t()).float(), dim=-1)
                total -= logp.gather(1, safe[s:s + rows]).masked_fill(~keep, 0).sum()
                if not (want_h or want_w):
                    continue
                # d(sum of losses)/d(logits) = softmax - one_hot(target), on the counted rows only: the
                # ignored rows are zeroed in the [rows, dim] operands, which is cheaper than in p.
                p = logp.exp_().scatter_add_(1, safe[s:s + rows], torch.full_like(logp[:, :1], -1.0)).to(dtype)
                if want_h:
                    grad_h[s:s + rows] = (p @ w).masked_fill_(~keep, 0)
                if want_w:
                    hk = hc.masked_fill(~keep, 0)
                    if dtype == torch.float32:
                        grad_w.addmm_(p.t(), hk)  # in place: no [vocab, dim] temporary per chunk
                    else:
                        grad_w += (p.t() @ hk).float()
            count = valid.sum()
        ctx.save_for_backward(grad_h, grad_w, count)
        ctx.weight_dtype = weight.dtype
        return total / count  # the mean over counted rows; 0/0 = nan when every target is ignored, as F's

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out / count
        return (None if grad_h is None else grad_h * scale.to(grad_h.dtype),
                None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype), None, None, None)
