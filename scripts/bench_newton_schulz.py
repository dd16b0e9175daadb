"""Muon's Newton-Schulz for one optimizer step: training/optim.py's newton_schulz against the plain iteration.

    python -m scripts.bench_newton_schulz

The plain iteration (torch.optim.Muon's, in float32) multiplies by the m x n update matrix twice per step;
ours runs the steps on the m x m Gram matrix for wide matrices (see newton_schulz). Both orthogonalise the
hidden matrices of the README's shape and of make train's, alternated round by round; the ratio is taken
within each round and its median is the summary.
"""

import statistics
import time

import torch
import torch.optim._muon as muon

from model import ModelConfig, Transformer
from training.optim import is_hidden_matrix, newton_schulz

COEFFICIENTS, STEPS, EPS = (muon.DEFAULT_A, muon.DEFAULT_B, muon.DEFAULT_C), muon.DEFAULT_NS_STEPS, muon.EPS


def plain(grad: torch.Tensor) -> torch.Tensor:
    a, b, c = COEFFICIENTS
    x = grad.T if grad.size(0) > grad.size(1) else grad
    x = x / x.norm().clamp(min=EPS)
    for _ in range(STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


def main(rounds: int = 9):
    shapes = {"README shape": ModelConfig(vocab_size=8192, dim=256, n_layers=6, n_heads=8, n_kv_heads=2, ffn_dim=688),
              "make train's": ModelConfig(vocab_size=4096, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=512)}
    for name, cfg in shapes.items():
        grads = [torch.randn(p.shape) for n, p in Transformer(cfg).named_parameters() if is_hidden_matrix(n, p)]
        times = {"plain": [], "ours": []}
        for _ in range(rounds):
            for key, fn in (("plain", plain), ("ours", lambda g: newton_schulz(g, COEFFICIENTS, STEPS, EPS))):
                t = time.perf_counter()
                for g in grads:
                    fn(g)
                times[key].append(time.perf_counter() - t)
        ratios = [p / o for p, o in zip(times["plain"], times["ours"])]
        print(f"{name}, {len(grads)} matrices: plain {statistics.median(times['plain']) * 1e3:.0f} ms, ours "
              f"{statistics.median(times['ours']) * 1e3:.0f} ms per step (medians of {rounds}); plain / ours "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
