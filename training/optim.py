"""The optimizers (AdamW, or Muon for the hidden matrices with AdamW for the rest) and the learning-rate
schedules."""

import math
from unittest import mock

import torch
import torch.optim._muon  # the Newton-Schulz function that Muon below replaces on CPU

from .config import TrainConfig


class Optimizers(tuple):
    """Several optimizers stepped as one. A tuple, because torch.distributed.checkpoint's state-dict
    helpers (training/distributed.py: full_state, load_full_state) take an iterable of optimizers and save
    and load them as one combined state keyed by parameter name: one checkpoint format for both recipes."""

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self for group in opt.param_groups]

    def step(self) -> None:
        for opt in self:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self:
            opt.zero_grad(set_to_none=set_to_none)


def newton_schulz(grad: torch.Tensor, ns_coefficients: tuple, ns_steps: int, eps: float) -> torch.Tensor:
    """torch's Newton-Schulz orthogonalisation (torch.optim._muon._zeropower_via_newtonschulz: the same
    quintic, coefficients and steps) in float32 instead of bfloat16, and on the Gram matrix where that is
    cheaper."""
    a, b, c = ns_coefficients
    x = grad.float()
    x = x.T if grad.size(0) > grad.size(1) else x  # m x n with m <= n: iterate on the m x m Gram matrix
    x = x / x.norm().clamp(min=eps)  # spectral norm <= 1
    m, n = x.shape
    # Each step is X <- (a I + b A + c A^2) X with A = X X^T: 4mn + 2m^2 FLOPs per row of X. So X_k is
    # Q_k X_0, Q_k a polynomial in G = X_0 X_0^T (symmetric, commuting with G), and the steps can run on Q
    # alone: A = Q G Q, 8m^2 per row, with X_0 touched twice in all. Cheaper for wide matrices (n > 1.9 m at
    # 5 steps), such as SwiGLU's: 1.9x fewer FLOPs for make train's gate-and-up matrix (192 x 1024).
    if 4 * n + 8 * m * ns_steps < ns_steps * (4 * n + 2 * m):
        g, q = x @ x.T, torch.eye(m, device=x.device)
        for _ in range(ns_steps):
            gram = q @ g @ q
            q = torch.addmm(q, torch.addmm(gram, gram, gram, beta=b, alpha=c), q, beta=a)
        x = q @ x
    else:
        for _ in range(ns_steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if grad.size(0) > grad.size(1) else x).to(grad.dtype)


class Muon(torch.optim.Muon):
    """torch.optim.Muon (its options, checks, state and update), orthogonalising in float32 on CPU.

    torch runs Newton-Schulz in bfloat16, right for GPUs; a CPU without bf16 matrix units emulates it,
    about 20 times slower than float32 (measured on this project's CPU: 3 s vs 0.15 s for one 1024 x 192
    matrix), which made a muon step of model/tiny twice as long as an adamw one."""

    @torch.no_grad()
    def step(self, closure=None):
        if self.param_groups[0]["params"][0].device.type != "cpu":
            return super().step(closure)
        with mock.patch.object(torch.optim._muon, "_zeropower_via_newtonschulz", newton_schulz):
            return super().step(closure)


def is_hidden_matrix(name: str, p: torch.nn.Parameter) -> bool:
    """The 2-D weights inside the blocks (attention and SwiGLU projections): the ones that mix features.
    The embedding and the LM head are 2-D too, but they are lookup tables over tokens, not maps between
    hidden features; norm gains are vectors."""
    return p.ndim == 2 and not name.endswith(("embed.weight", "lm_head.weight"))  # DDP prefixes "module."


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> Optimizers:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = cfg.optimizer == "muon"
    # Muon orthogonalises each update matrix (Newton-Schulz), which only makes sense for a map between
    # hidden features: it gets the hidden matrices. Embedding rows see sparse, token-frequency-shaped
    # gradients and the head's rows are per-token too (Muon's authors keep both on AdamW), and norm gains
    # are not matrices: those stay on AdamW. With adamw, AdamW gets everything.
    hidden, decay, no_decay = [], [], []
    for name, p in named:
        if muon and is_hidden_matrix(name, p):
            hidden.append(p)
        # AdamW decays only the matrices that mix features. Norm gains are scales, and the embedding is a
        # lookup table whose rows see few gradients: decaying them only shrinks rare tokens.
        elif p.ndim >= 2 and "embed" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one pass over each tensor instead of torch's default for-loop of about ten elementwise ops per
    # parameter on CPU (several times faster there; tests/test_train_speed.py checks it against the loop).
    opts = [torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                              fused=device_type in ("cuda", "cpu"))]
    if muon:
        # match_rms_adamw scales each matrix's update to the RMS AdamW's would have (0.2 * sqrt(max(A, B))),
        # so Muon shares train.lr, its schedule and the decoupled weight decay with AdamW (Moonshot's
        # "Muon is Scalable for LLM Training"): one LR to tune, not two.
        opts.append(Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"))
    return Optimizers(opts)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine or WSD decay."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(cfg.max_steps * cfg.decay_fraction))
        decay_start = cfg.max_steps - decay_steps
        if step < decay_start:
            return cfg.lr
        return cfg.lr - (cfg.lr - min_lr) * min(1.0, (step - decay_start) / decay_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))
