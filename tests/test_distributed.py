"""torchrun on CPU (gloo, 2 processes): DDP and FSDP2 train exactly like one process with the same
global batch, only rank 0 writes, and an error on one rank stops every rank with one message.

The helpers here (launch, finish, reference_run...) are shared with tests/test_crash_safety.py."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import train
from conftest import ROOT, compose_config, tiny_overrides
from checkpoint import load_checkpoint

TOL = 1e-5


def overrides(corpus, data_cache, out_dir, optimizer: str = "adamw") -> list[str]:
    """The tiny test config, with 96 sequences of 33 tokens per step: the validation split then holds
    93 windows, fewer than one batch and odd, so 2 ranks score unequal shares (47 and 46 rows).
    AdamW, not the default Muon: one reference run serves DDP, FSDP and the crash tests
    (test_two_processes_with_muon_match_one covers the default)."""
    return tiny_overrides(corpus, data_cache, out_dir) + ["train.seq_len=33", "train.batch_size=96",
                                                          "train.grad_accum=2", f"train.optimizer={optimizer}"]


def launch(args: list[str], nproc: int, cwd: Path, script: Path = ROOT / "train.py", env: dict = None):
    """Start `script` under torchrun with `nproc` processes (plain python when nproc == 1)."""
    cmd = [sys.executable, str(script), *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true", **(env or {})}
    # cwd: a default run folder would land there. A new session: the test can kill the whole launch.
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        pytest.fail(f"timed out (a rank waiting forever?)\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def torchrun(args: list[str], nproc: int, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return finish(launch(args, nproc, cwd, **kw))


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in metrics(out_dir) if key in r}


def assert_same_run(out_dir: Path, reference: Path, steps=None, weight_atol: float = TOL) -> None:
    """Same train and val losses at every step (to TOL) and the same final weights (to weight_atol)."""
    for key in ("train_loss", "val_loss"):
        got, want = losses(out_dir, key), losses(reference, key)
        assert sorted(got) == sorted(want), (key, sorted(got), sorted(want))
        for step in steps or want:
            if step in want:
                assert got[step] == pytest.approx(want[step], abs=TOL), (key, step, got, want)
    a, b = load_checkpoint(out_dir), load_checkpoint(reference)
    assert a.dir.name == b.dir.name
    assert a.model_state.keys() == b.model_state.keys()
    for k in a.model_state:
        torch.testing.assert_close(a.model_state[k], b.model_state[k], rtol=1e-4, atol=weight_atol,
                                   msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def reference_run(corpus, data_cache, tmp_path_factory) -> Path:
    """The uninterrupted run in one process that every distributed or resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    cfg = compose_config(overrides(corpus, data_cache, out))
    train.run(cfg)
    from data.pipeline import cache_folder

    meta = json.loads((cache_folder(OmegaConf.to_object(cfg.data)) / "meta.json").read_text())
    n_windows = (meta["n_val_tokens"] - 1) // cfg.train.seq_len
    assert n_windows < cfg.train.batch_size and n_windows % 2 == 1, "the eval no longer has uneven rank shares"
    return out


# FSDP2 also trains (steps 4-6, from a 1-process checkpoint) in test_crash_safety's resume test.
@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_match_one(parallel, corpus, data_cache, reference_run, tmp_path):
    out = tmp_path / parallel
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    extra = [f"train.parallel={parallel}"] + (["wandb.mode=offline"] if parallel == "ddp" else [])
    proc = ok(torchrun(overrides(corpus, data_cache, out) + extra, 2, tmp_path,
                       env={"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)}))
    assert_same_run(out, reference_run)
    # Only rank 0 logs: one metrics line per record, one banner, one wandb run.
    steps = [(r["step"], "val_loss" in r) for r in metrics(out)]
    assert len(steps) == len(set(steps)) == len(metrics(reference_run))
    assert proc.stdout.count("model: gqa") == 1 and f"x 2 ({parallel})" in proc.stdout
    assert len(list((wandb_dir / "wandb").glob("offline-run-*"))) == (parallel == "ddp")


@pytest.fixture(scope="module")
def muon_reference_run(corpus, data_cache, tmp_path_factory) -> Path:
    """reference_run with the default optimizer."""
    out = tmp_path_factory.mktemp("muon_reference") / "run"
    train.run(compose_config(overrides(corpus, data_cache, out, optimizer="muon")))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_with_muon_match_one(parallel, corpus, data_cache, muon_reference_run, tmp_path):
    """The default optimizer: under DDP every rank orthogonalises the same all-reduced gradients; under FSDP2
    each matrix is gathered whole on one rank, orthogonalised there and scattered back in shards."""
    out = tmp_path / parallel
    ok(torchrun(overrides(corpus, data_cache, out, optimizer="muon") + [f"train.parallel={parallel}"], 2, tmp_path))
    # The all-reduce sums the gradients in another order, and AdamW turns that rounding into larger weight
    # differences where a gradient's second moment is near zero (the LM head's rarely seen tokens): the
    # largest differences measured were 1.5e-5 with our CPU attention kernel, 3.9e-6 with SDPA, against 1e-5.
    assert_same_run(out, muon_reference_run, weight_atol=5e-5)


def test_fail_together(tmp_path):
    """An error on some ranks, before any collective, is raised on all ranks (and printed by one)."""
    script = tmp_path / "agree.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        import torch
        sys.path.insert(0, {str(ROOT)!r})
        from data import DataError
        from model import ConfigError
        from training.distributed import any_rank, fail_together, init_distributed, shutdown

        info = init_distributed(torch.device("cpu"))

        class Unpicklable(Exception):
            def __reduce__(self):
                raise TypeError("cannot pickle")

        def rank0_fails():
            if info.rank == 0:
                raise DataError("rank 0 could not prepare the data")

        def rank1_fails():
            if info.rank == 1:
                raise ConfigError("only rank 1 sees this")

        def all_fail():
            raise ConfigError("the same config error everywhere")

        def rank1_unpicklable():
            if info.rank == 1:
                raise Unpicklable("odd")

        results = {{}}
        for case in (rank0_fails, rank1_fails, all_fail, rank1_unpicklable, lambda: None):
            try:
                with fail_together(info):
                    case()
                results[case.__name__] = "ok"
            except Exception as e:
                results[case.__name__] = [type(e).__name__, str(e), e.reported_by]
        results["any_rank"] = [any_rank(info.rank == 1, info), any_rank(False, info)]
        (open(sys.argv[1] + f"/rank{{info.rank}}.json", "w")).write(json.dumps(results))
        shutdown(info)
    """))
    ok(torchrun([str(tmp_path)], 2, tmp_path, script=script))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["rank0_fails"] == r1["rank0_fails"] == ["DataError", "rank 0 could not prepare the data", 0]
    assert r0["rank1_fails"] == r1["rank1_fails"] == ["ConfigError", "only rank 1 sees this", 1]
    assert r0["all_fail"] == r1["all_fail"] == ["ConfigError", "the same config error everywhere", 0]
    assert r0["rank1_unpicklable"] == ["RuntimeError", "Unpicklable: odd", 1]
    assert r1["rank1_unpicklable"] == ["Unpicklable", "odd", 1]
    assert r0["<lambda>"] == r1["<lambda>"] == "ok"
    assert r0["any_rank"] == r1["any_rank"] == [True, False]


def one_error_line(proc: subprocess.CompletedProcess, pattern: str) -> None:
    """The run failed with exactly one `error:` line (not one per rank) and no Python traceback from
    the trainer (torchrun's own failure summary is expected)."""
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], proc.stderr[-3000:]
    assert f'File "{ROOT / "train.py"}"' not in proc.stderr, proc.stderr[-3000:]


def test_rank0_data_error_stops_every_rank(corpus, data_cache, tmp_path):
    # Rank 0 prepares the data while the others wait for it: its failure must reach them.
    args = [a for a in overrides(corpus, data_cache, tmp_path / "o") if not a.startswith("data.path")]
    proc = torchrun(args + [f"data.path={tmp_path / 'missing'}"], 2, tmp_path)
    one_error_line(proc, "does not exist")
    assert not any((tmp_path / "o").iterdir())  # Hydra created the folder; nothing was written into it


def test_muon_on_fsdp_shards_steps_like_one_process(tmp_path):
    """Muon under FSDP2, where each rank holds a block of rows of every matrix (the last block shorter or
    empty), takes exactly the steps it takes on whole matrices in one process; each rank orthogonalises a
    share of the matrices; the state saves and loads through torch.distributed.checkpoint's full state
    dicts (training/distributed.py, what checkpoints and resume use)."""
    shapes = [(5, 3), (1, 4), (8, 8), (6, 20), (20, 6)]  # odd row counts; rank 1 holds no row of (1, 4)
    script = tmp_path / "fsdp_muon.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        import torch
        import torch.distributed as dist
        sys.path.insert(0, {str(ROOT)!r})
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor
        from training.distributed import full_state, init_distributed, load_full_state, shutdown
        from training.optim import Muon, orthogonalise_sharded

        SHAPES = {shapes!r}

        def build(fsdp, state=None):
            torch.manual_seed(0)
            params = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s)) for s in SHAPES)
            if fsdp:
                fully_shard(params)
            opt = Muon(list(params), lr=0.05, weight_decay=0.1)
            if state is not None:
                load_full_state(params, opt, *state)
            return params, opt

        def step(params, opt, grads):
            for p, g in zip(params, grads):
                p.grad = distribute_tensor(g, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else g
            opt.step()

        info = init_distributed(torch.device("cpu"))
        torch.manual_seed(1)
        grads = [[torch.randn(s) for s in SHAPES] for _ in range(3)]
        (sharded, opt), (whole, whole_opt) = build(fsdp=True), build(fsdp=False)
        for g in grads[:2]:
            step(sharded, opt, g)
            step(whole, whole_opt, g)
        state = [full_state(sharded, opt)]  # rank 0's, as a checkpoint; every rank reads it, as on resume
        dist.broadcast_object_list(state, src=0)
        saved = [state[0][1]["state"][str(i)]["momentum_buffer"] for i in range(len(SHAPES))]
        same_state = all(torch.equal(m, whole_opt.state[w]["momentum_buffer"]) for m, w in zip(saved, whole))
        sharded, opt = build(fsdp=True, state=state[0])
        step(sharded, opt, grads[2])
        step(whole, whole_opt, grads[2])
        seen = []
        orthogonalise_sharded([p.grad for p in sharded], lambda x: seen.append(list(x.shape)) or x)
        results = {{"same_weights": all(torch.equal(p.full_tensor(), w) for p, w in zip(sharded, whole)),
                   "same_state": same_state,
                   "orthogonalised": seen}}
        open(sys.argv[1] + f"/rank{{info.rank}}.json", "w").write(json.dumps(results))
        shutdown(info)
    """))
    ok(torchrun([str(tmp_path)], 2, tmp_path, script=script))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["same_weights"] and r1["same_weights"] and r0["same_state"] and r1["same_state"]
    owned = sorted(map(tuple, r0["orthogonalised"])), sorted(map(tuple, r1["orthogonalised"]))
    assert owned[0] and owned[1] and sorted(owned[0] + owned[1]) == sorted(shapes), owned  # each matrix once
