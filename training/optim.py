"""The optimizers (AdamW, or Muon for the hidden matrices with AdamW for the rest) and the learning-rate
schedules."""

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

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


# Keller Jordan's quintic Newton-Schulz (https://kellerjordan.github.io/posts/muon/), torch.optim.Muon's defaults
NS_COEFFICIENTS, NS_STEPS, NS_EPS = (3.4445, -4.7750, 2.0315), 5, 1e-7


def newton_schulz(grad: torch.Tensor, ns_coefficients: tuple, ns_steps: int, eps: float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz orthogonalisation (the same quintic, coefficients and steps) in
    `dtype`, and in float32 on the Gram matrix where that is cheaper."""
    a, b, c = ns_coefficients
    x = grad.to(dtype)
    x = x.T if grad.size(0) > grad.size(1) else x  # m x n with m <= n: iterate on the m x m Gram matrix
    x = x / x.norm().clamp(min=eps)  # spectral norm <= 1
    m, n = x.shape
    # Each step is X <- (a I + b A + c A^2) X with A = X X^T: 4mn + 2m^2 FLOPs per row of X. So X_k is
    # Q_k X_0, Q_k a polynomial in G = X_0 X_0^T (symmetric, commuting with G), and the steps can run on Q
    # alone: A = Q G Q, 8m^2 per row, with X_0 touched twice in all. Cheaper for wide matrices (n > 1.9 m at
    # 5 steps), such as SwiGLU's: 1.9x fewer FLOPs for make train's gate-and-up matrix (192 x 1024). Measured
    # in float32 only: bfloat16 keeps torch's plain iteration.
    if dtype == torch.float32 and 4 * n + 8 * m * ns_steps < ns_steps * (4 * n + 2 * m):
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


def orthogonalise(update: torch.Tensor) -> torch.Tensor:
    """Muon's Newton-Schulz, in float32 on CPU and bfloat16 elsewhere (torch's choice, right for GPUs). A CPU
    without bf16 matrix units emulates bfloat16, about 20 times slower than float32 (measured on this
    project's CPU: 3 s vs 0.15 s for one 1024 x 192 matrix)."""
    dtype = torch.float32 if update.device.type == "cpu" else torch.bfloat16
    return newton_schulz(update, NS_COEFFICIENTS, NS_STEPS, NS_EPS, dtype)


def owners(shapes: list, world: int) -> list[int]:
    """The rank that orthogonalises each matrix: the largest first, each to the least loaded rank (a
    Newton-Schulz step costs about m n min(m, n)), so that the ranks finish together."""
    cost = [s[0] * s[1] * min(s) for s in shapes]
    load, owner = [0] * world, [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: -cost[i]):  # stable: the same order on every rank
        owner[i] = load.index(min(load))
        load[owner[i]] += cost[i]
    return owner


def orthogonalise_sharded(updates: list[DTensor], ortho=orthogonalise) -> list[DTensor]:
    """`ortho` of each whole matrix under FSDP2, where each rank holds a block of rows of every matrix
    (Shard(0): torch.chunk's blocks, the last ones shorter or empty).

    Distributed Muon ("Muon is Scalable for LLM Training", Moonshot 2025) gathers each matrix whole,
    orthogonalises it and keeps the local rows. Here each matrix is gathered on one rank, its owner; the
    owners orthogonalise their matrices at the same time, each a share of the work, and scatter the rows
    back. The results are those of one process: the same matrices through the same function."""
    mesh = updates[0].device_mesh
    if mesh.ndim != 1 or any(u.placements != (Shard(0),) for u in updates):
        raise NotImplementedError("Muon under FSDP needs FSDP2's default sharding (dim 0 over a 1-D mesh)")
    group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    owner = owners([u.shape for u in updates], world)
    block = [-(-u.shape[0] // world) for u in updates]  # rows per rank, the last ranks' padded up to it
    mine = [pad_rows(u.to_local(), b) for u, b in zip(updates, block)]
    gathered = [[torch.empty_like(x) for _ in range(world)] if o == rank else None for x, o in zip(mine, owner)]
    wait([dist.gather(x, g, group_dst=o, group=group, async_op=True) for x, g, o in zip(mine, gathered, owner)])
    results = [pad_rows(ortho(torch.cat(g)[:u.shape[0]]), b * world).split(b) if g is not None else None
               for u, g, b in zip(updates, gathered, block)]
    wait([dist.scatter(x, None if r is None else list(r), group_src=o, group=group, async_op=True)
          for x, r, o in zip(mine, results, owner)])
    return [DTensor.from_local(x[:u.to_local().shape[0]], mesh, u.placements, shape=u.shape, stride=u.stride())
            for x, u in zip(mine, updates)]


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with zero rows appended up to `rows`, in contiguous memory (gloo sends a transposed view's storage
    as it lies: tall matrices leave newton_schulz transposed)."""
    return torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[0])).contiguous()


def wait(works: list) -> None:
    for work in works:
        work.wait()


class Muon(torch.optim.Optimizer):
    """Muon (momentum orthogonalised by Newton-Schulz) for 2-D parameters: torch.optim.Muon's update with
    Nesterov momentum and match_rms_adamw, and its state (one "momentum_buffer" per matrix, so the
    checkpoints are the same), orthogonalising in float32 on CPU (see orthogonalise) and, under FSDP2,
    on whole matrices gathered across ranks (orthogonalise_sharded). tests/test_optim.py checks it against
    torch.optim.Muon. Our own rather than a subclass: torch's has no hook for the orthogonalisation (only
    its private _zeropower_via_newtonschulz, called one matrix at a time), and under FSDP a step's matrices
    are orthogonalised together, spread over the ranks."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = 0.95):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        if any(p.ndim != 2 for group in self.param_groups for p in group["params"]):
            raise ValueError("Muon takes matrices only: give other parameters to AdamW")

    @torch.no_grad()
    def step(self, closure=None):  # closure: in torch's signature (torch.distributed.checkpoint passes None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = self.state[p]["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                updates.append(p.grad.lerp(buf, group["momentum"]))  # Nesterov: a step ahead along the momentum
            sharded = bool(updates) and isinstance(updates[0], DTensor)
            for p, update in zip(params, orthogonalise_sharded(updates) if sharded else map(orthogonalise, updates)):
                # match_rms_adamw: an orthogonal A x B matrix has RMS 1/sqrt(max(A, B)); the scale gives the
                # update the RMS of a typical AdamW update, 0.2 lr, so that both share train.lr.
                scale = 0.2 * math.sqrt(max(p.shape))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


def is_hidden_matrix(name: str, p: torch.nn.Parameter) -> bool:
    """The 2-D weights inside the blocks (attention and SwiGLU projections): the ones that mix features.
    The embedding and the LM head are 2-D too, but they are lookup tables over tokens, not maps between
    hidden features; norm gains are vectors."""
    return p.ndim == 2 and not name.endswith(("embed.weight", "lm_head.weight"))  # DDP prefixes "module."


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> Optimizers:
    muon = cfg.optimizer == "muon"
    # Muon orthogonalises each update matrix (Newton-Schulz), which only makes sense for a map between
    # hidden features: it gets the hidden matrices. Embedding rows see sparse, token-frequency-shaped
    # gradients and the head's rows are per-token too (Muon's authors keep both on AdamW), and norm gains
    # are not matrices: those stay on AdamW. With adamw, AdamW gets everything.
    hidden, decay, no_decay = [], [], []
    for name, p in model.named_parameters():  # all trained: the model freezes none
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
        # Muon scales each matrix's update to the RMS AdamW's would have (match_rms_adamw), so it shares
        # train.lr, its schedule and the decoupled weight decay with AdamW (Moonshot's "Muon is Scalable for
        # LLM Training"): one LR to tune, not two.
        opts.append(Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay))
    return Optimizers(opts)


def lr_at(step: int, cfg: TrainConfig, steps: Optional[int] = None) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine or WSD decay over
    `steps` (default train.max_steps; a time budget's fitted length, see steps_that_fit)."""
    steps = steps or cfg.max_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(steps * cfg.decay_fraction))
        decay_start = steps - decay_steps
        if step < decay_start:
            return cfg.lr
        return cfg.lr - (cfg.lr - min_lr) * min(1.0, (step - decay_start) / decay_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps))
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def steps_that_fit(step: int, seconds: float, step_s: float, eval_s: float, save_s: float, cfg: TrainConfig) -> int:
    """The last step a run at `step` can reach in `seconds`, at most train.max_steps (and `step` itself if
    no step fits): what is left of a time budget, spent on steps of `step_s` and on what train.py does after
    this step and the later ones: an evaluation (`eval_s`) at each multiple of train.eval_every and after the
    last step, and a save (`save_s`) after each evaluation (counted as if every one improved and saved `best`)
    and at each multiple of train.save_every."""
    def cost(last: int) -> float:
        def multiples(every: int) -> int:  # of `every` in [step, last]: this step's own come after the fit
            return last // every - (step - 1) // every
        e, s = cfg.eval_every, cfg.save_every
        evals = multiples(e) + (last % e != 0)
        saves = multiples(e) + multiples(s) - multiples(math.lcm(e, s)) + (last % e != 0 and last % s != 0)
        return (last - step) * step_s + evals * eval_s + saves * save_s

    lo, hi = step, cfg.max_steps  # the cost grows with the last step: bisect for the largest that fits
    if cost(hi) <= seconds:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds else (lo, mid)
    return lo
