"""The training speed paths against plain references: MFU's FLOP count (training/metrics.py) against torch's
own FLOP counter (tests/test_train.py checks the logged MFU with it), the trainer's fused AdamW against torch's
for-loop AdamW, the compiled step against the eager one."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from builders import tiny_config
from model import ModelConfig, Transformer
from training.config import TrainConfig
from training.metrics import flops_per_token
from training.optim import build_optimizer
from training.trainer import compile_for_training


def counted_flops_per_token(cfg: ModelConfig, batch: int = 2) -> float:
    """Forward + backward FLOPs per token that torch.utils.flop_counter counts on the model, with the
    attention's share halved for the causal mask (the counter counts the whole score matrix). The math
    attention backend does attention in batched matmuls (bmm) and every Linear is an mm: the counter's
    per-op totals keep the two apart. The loss is taken on the logits: the training loss path
    (model/loss.py) runs the same matmuls, but its in-place addmm_ is not one the counter counts."""
    torch.manual_seed(0)
    model = Transformer(cfg, backend="math")
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1))
    with FlopCounterMode(display=False) as counter:
        logits = model(x[:, :-1])[0]
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(by_op) == {"aten.mm", "aten.bmm"}, by_op  # nothing else the count would miss
    return (by_op["aten.mm"] + by_op["aten.bmm"] / 2) / x[:, :-1].numel()


@pytest.mark.parametrize("attention, overrides", [
    ("gqa", {}), ("mha", {"tie_embeddings": True}), ("mla", {}), ("mla", {"q_lora_rank": 16}),
])
def test_flops_per_token_matches_torch_flop_counter(attention, overrides):
    cfg = tiny_config(attention, max_seq_len=16, **overrides)
    assert flops_per_token(Transformer(cfg), cfg.max_seq_len) == counted_flops_per_token(cfg)



def test_trainer_adamw_matches_torch_for_loop_adamw():
    """The trainer's AdamW (fused on CPU) against torch's plain for-loop AdamW set up as training/optim.py
    documents (decay on matrices but the embedding): the weights agree to fp32 rounding after a few steps
    on the same gradients."""
    cfg = TrainConfig(optimizer="adamw")
    torch.manual_seed(0)
    models = [Transformer(tiny_config("gqa", max_seq_len=16)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fast = build_optimizer(models[0], cfg, "cpu")
    decay = [p for n, p in models[1].named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in models[1].named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    plain = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
                              lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=False)
    for _ in range(3):
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fast.step()
        plain.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow  # compiles a forward and backward graph (tens of seconds on 2 cores)
def test_compiled_training_repeats_bitwise(monkeypatch, tmp_path):
    """train.compile=true on CPU (compile_for_training): the same steps twice give bitwise the same weights.
    Inductor's embedding backward adds token rows with atomics across threads; without deterministic mode
    this failed. A small vocabulary makes many tokens share a row; two threads race for it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        weights = []
        for _ in range(2):
            torch.manual_seed(0)
            model = Transformer(tiny_config("gqa", vocab_size=16, max_seq_len=64), backend="sdpa")
            forward = compile_for_training(model, torch.device("cpu"))
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            g = torch.Generator().manual_seed(0)
            for _ in range(3):
                x = torch.randint(0, 16, (64, 65), generator=g)
                forward(x[:, :-1], x[:, 1:])[1].backward()
                opt.step()
                opt.zero_grad()
            weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    finally:  # the mode is process-wide: leave the other tests as they were
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    for name, w in weights[0].items():
        assert torch.equal(w, weights[1][name]), name


@pytest.mark.slow  # compiles a forward and backward graph (tens of seconds on 2 cores, less from Inductor's cache)
@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_compiled_step_matches_eager(attention):
    """train.compile=true: Inductor's fused kernels (RMSNorm, RoPE, SwiGLU, cross-entropy; matmuls and
    attention stay torch's) give the eager step's loss and gradients to fp32 rounding."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(attention, max_seq_len=32), backend="sdpa")
    x = torch.randint(0, model.cfg.vocab_size, (4, 33))
    results = []
    for forward in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        loss = forward(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=0, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=0, atol=1e-5, msg=name)


def test_inductor_cache_goes_to_dot_cache_unless_chosen(monkeypatch):
    """compile_for_training keeps Inductor's caches in .cache/torchinductor (README, `make clean`), though
    importing torch._dynamo has already written torch's default folder into TORCHINDUCTOR_CACHE_DIR; a
    folder the user chose stays."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    try:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(default_cache_dir()))  # what the import wrote
        compile_for_training(torch.nn.Linear(2, 2), torch.device("cpu"))
        assert cache_dir() == str(Path(".cache/torchinductor").resolve())
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
        compile_for_training(torch.nn.Linear(2, 2), torch.device("cpu"))
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"
    finally:  # the mode is process-wide: leave the other tests as they were
        torch.use_deterministic_algorithms(False)


def bench_options(corpus, data_cache) -> list[str]:
    """The tests' tiny run as scripts/bench_train.py's options (it adds out_dir, and quiets its Trainers itself)."""
    from conftest import tiny_overrides

    return [o for o in tiny_overrides(corpus, data_cache, Path("unused"))
            if not o.startswith(("out_dir=", "train.progress=", "wandb.mode="))]


def test_bench_steps_are_the_trainers(corpus, data_cache, tmp_path, monkeypatch):
    """scripts/bench_train.py times Trainer.train_step itself (what train.py runs), not a copy of it: each
    step it times is a call of the method, on a Trainer of the variant's config."""
    from scripts import bench_train
    from training.trainer import Trainer

    calls = []
    real = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self: calls.append(self.cfg.train.optimizer) or real(self))
    args = SimpleNamespace(loop=False, warmup=1, steps=2)
    step, timed, _ = bench_train.build("adamw", args, bench_options(corpus, data_cache), tmp_path, None)
    assert timed() > 0 and calls == ["adamw"] * 3  # the warm-up step, then the two timed


def test_bench_loop_time_is_the_trainers_clock(corpus, data_cache, tmp_path, monkeypatch):
    """--loop: the seconds per step of train.py's whole loop, from the trainer's own clock between its log
    lines at train.log_every and at the last step; a fake clock charging 0.25 s a step (and 7 s for each
    evaluation, which the loop makes after the last step only) makes the answer exact."""
    import training.trainer as trainer
    from scripts import bench_train

    clock = SimpleNamespace(now=0.0)
    clock.time = lambda: clock.now
    monkeypatch.setattr(trainer, "time", clock)
    real_step, real_eval = trainer.Trainer.train_step, trainer.Trainer.evaluate

    def step(self):
        clock.now += 0.25
        return real_step(self)

    def evaluate(self):
        clock.now += 7.0
        return real_eval(self)

    monkeypatch.setattr(trainer.Trainer, "train_step", step)
    monkeypatch.setattr(trainer.Trainer, "evaluate", evaluate)
    cfg = bench_train.config(bench_options(corpus, data_cache) + [
        f"out_dir={tmp_path / 'loop'}", "train.log_every=2", "train.max_steps=8", "train.eval_every=4"])
    seconds, share = bench_train.loop_seconds_per_step(cfg)
    assert seconds == 0.25 and share > 0
