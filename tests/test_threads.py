"""The thread governor: the decision rule, and that it sees a process spinning beside it."""

import os
import time

import pytest
import torch

from engine.threads import ThreadGovernor, threads_for
from scripts.busy import spin_one_core


@pytest.mark.parametrize("cores,others,want", [
    (2, 0.0, 2), (2, 0.2, 2),      # an idle machine, or a little background noise: all cores
    (2, 0.3, 1), (2, 1.0, 1),      # one core taken (a quarter of a core is enough to stall a barrier)
    (2, 2.0, 1), (2, 5.0, 1),      # never fewer than one thread
    (8, 1.0, 7), (8, 2.6, 5),
])
def test_threads_for(cores, others, want):
    assert threads_for(cores, others) == want


def test_threads_for_respects_the_workload_cap():
    assert threads_for(8, 0.0, max_threads=2) == 2
    assert threads_for(2, 1.0, max_threads=2) == 1


def write_proc_stat(path, ticks: dict[int, tuple[int, int]]) -> None:
    """A /proc/stat whose CPU c has run ticks[c] = (busy, idle) clock ticks since boot; the first line
    sums them all, as the kernel's does."""
    line = "{} {} 0 0 {} 0 0 0 0 0 0"  # user nice system idle iowait irq softirq steal guest guest_nice
    rows = [line.format("cpu ", sum(b for b, _ in ticks.values()), sum(i for _, i in ticks.values()))]
    rows += [line.format(f"cpu{c}", b, i) for c, (b, i) in sorted(ticks.items())]
    path.write_text("\n".join(rows + ["intr 12345 0 0", "ctxt 678"]) + "\n")


@pytest.fixture
def fake_host(tmp_path, monkeypatch):
    """A 64-CPU host of which this process may use CPUs {0, 1}, no cgroup quota, our own threads idle.
    Returns a function that advances every CPU by 100 ticks, busy on the CPUs it is given."""
    import engine.threads as threads

    stat = tmp_path / "stat"
    now = {c: (0, 0) for c in range(64)}
    write_proc_stat(stat, now)
    monkeypatch.setattr(threads, "PROC_STAT", str(stat))
    monkeypatch.setattr(threads, "allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(threads, "_own_ticks", lambda: 0)

    def advance(busy_cpus):
        for c, (b, i) in now.items():
            now[c] = (b + 100, i) if c in busy_cpus else (b, i + 100)
        write_proc_stat(stat, now)

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield advance
    torch.set_num_threads(saved)


def test_only_the_cpus_we_may_use_count(fake_host):
    """Pinned to 2 of 64 CPUs: the other 62 all busy leave us both threads; one of ours busy takes one."""
    gov = ThreadGovernor(interval=0.0)
    assert gov.cores == 2 and gov.max_threads == 2
    fake_host(busy_cpus=set(range(2, 64)))
    assert gov.update() == 2 and torch.get_num_threads() == 2
    fake_host(busy_cpus={1} | set(range(2, 64)))
    assert gov.update() == 1 and torch.get_num_threads() == 1
    fake_host(busy_cpus=set())
    assert gov.update() == 2


@pytest.mark.parametrize("cgroup,cpu_max,want", [
    ("0::/user.slice/job\n", {"user.slice/job": "150000 100000\n"}, 2),  # 1.5 CPUs of quota: 2 threads
    ("0::/\n", {"": "100000 100000\n"}, 1),                               # a container's own root
    ("0::/docker/abc\n", {"": "200000 100000\n"}, 2),  # the host's path, the container's cgroupfs
    ("0::/user.slice\n", {"user.slice": "max 100000\n"}, 8),               # no quota
    ("4:cpu,cpuacct:/\n", {}, 8),                                          # cgroup v1: no cpu.max
])
def test_a_cgroup_quota_caps_the_threads(tmp_path, monkeypatch, cgroup, cpu_max, want):
    import engine.threads as threads

    (tmp_path / "cgroup").write_text(cgroup)
    for folder, text in cpu_max.items():
        (tmp_path / "fs" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / folder / "cpu.max").write_text(text)
    monkeypatch.setattr(threads, "PROC_CGROUP", str(tmp_path / "cgroup"))
    monkeypatch.setattr(threads, "CGROUP_ROOT", str(tmp_path / "fs"))
    monkeypatch.setattr(threads, "allowed_cpus", lambda: set(range(8)))
    gov = ThreadGovernor(max_threads=8)
    assert gov.cores == 8 and gov.max_threads == want


def test_a_spinning_process_takes_a_thread(monkeypatch):
    """A child spinning on one core shows up as about one busy core, and the governor drops a thread.

    Not a timing test: whatever the machine's speed the spinner keeps a core busy for the whole
    sample, and this process sleeps meanwhile."""
    gov = ThreadGovernor(max_threads=2, interval=0.0)
    if not gov.enabled:
        pytest.skip("no /proc on this OS: the governor is off by design")
    monkeypatch.setattr(gov, "cores", 2)  # the rule for a 2-core machine, whatever this one has
    spinner = spin_one_core()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        time.sleep(0.5)  # let the child start spinning
        before = gov._sample()
        time.sleep(1.0)
        after = gov._sample()
        assert gov.others_busy(before, after) >= 0.75
        gov._last = before
        assert gov.update() == 1 and torch.get_num_threads() == 1
    finally:
        spinner.kill()
        torch.set_num_threads(threads)


def test_the_engine_steps_under_the_governor(monkeypatch):
    """LLM(adaptive_threads=True) on CPU consults the governor before each step (README, Generation):
    next to a spinning process its decode drops to one thread; adaptive_threads=False leaves torch alone."""
    from builders import tiny_model
    from engine import LLM, SamplingParams

    threads = torch.get_num_threads()
    spinner = spin_one_core()
    try:
        for adaptive in (False, True):
            torch.set_num_threads(2)
            llm = LLM(model=tiny_model("gqa"), device="cpu", adaptive_threads=adaptive)
            assert (llm.core.threads is not None) == adaptive
            if adaptive:
                monkeypatch.setattr(llm.core.threads, "cores", 2)
                monkeypatch.setattr(llm.core.threads, "_next", 0.0)  # decide at the first step
                time.sleep(1.0)  # a sample of the spinner's CPU time since the LLM was made
            llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=4))
            assert torch.get_num_threads() == (1 if adaptive else 2)
    finally:
        spinner.kill()
        torch.set_num_threads(threads)


def test_training_consults_the_governor_only_when_asked(corpus, data_cache, tmp_path, monkeypatch):
    """train.adaptive_threads=true: each step asks the governor, which follows the load /proc reports
    (here a fake /proc: one core busy, then none); false (the default): the governor is never made and
    the thread count never moves, however busy the machine looks."""
    import math

    import engine.threads as threads
    from conftest import compose_config, tiny_overrides
    from training.plan import make_plan
    from training.trainer import Trainer

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc on this OS: the governor is off by design")
    others = {"cores": 1.0}  # what other processes keep busy, as the next /proc/stat read will say
    ticks = {"busy": 0, "total": 0, "reads": 0}

    def cpu_ticks(cpus):  # 100 ticks per CPU of ours pass between two reads
        ticks["reads"] += 1
        ticks["busy"] += int(100 * others["cores"])
        ticks["total"] += 100 * len(cpus)
        return ticks["busy"], ticks["total"], len(cpus)

    monkeypatch.setattr(threads, "_cpu_ticks", cpu_ticks)
    monkeypatch.setattr(threads, "_own_ticks", lambda: 0)  # our own time is not in the fake busy ticks
    monkeypatch.setattr(threads, "allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    saved = torch.get_num_threads()
    try:
        for adaptive in (False, True):
            torch.set_num_threads(2)
            others["cores"], ticks["reads"] = 1.0, 0
            cfg = compose_config(tiny_overrides(corpus, data_cache, tmp_path / str(adaptive))
                                 + [f"train.adaptive_threads={adaptive}"])
            t = Trainer(make_plan(cfg))
            try:
                assert (t.threads is not None) == adaptive
                if adaptive:
                    t.threads.interval = t.threads._next = 0.0  # decide at every step, not once a second
                seen = []
                for step in range(3):
                    others["cores"] = 1.0 if step == 0 else 0.0  # the other process ends after a step
                    assert math.isfinite(t.train_step()["train_loss"])
                    seen.append(torch.get_num_threads())
            finally:
                t.close()
            assert seen == ([1, 2, 2] if adaptive else [2, 2, 2])
            assert ticks["reads"] == (4 if adaptive else 0)  # one at start, then one per step
    finally:
        torch.set_num_threads(saved)


def test_adaptive_threads_is_refused_on_a_gpu(corpus, data_cache, tmp_path):
    from conftest import compose_config, tiny_overrides
    from training.config import validate
    from training.errors import TrainConfigError

    cfg = compose_config(tiny_overrides(corpus, data_cache, tmp_path) + ["train.adaptive_threads=true",
                                                                         "train.device=mps"])
    with pytest.raises(TrainConfigError, match="train.adaptive_threads=true sets CPU threads.*train.device=cpu"):
        validate(cfg)
