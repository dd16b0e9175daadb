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
        assert gov.update() == 1 and torch.get_num_threads() == 1 and gov.changes == 1
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
    from training.trainer import Trainer

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc on this OS: the governor is off by design")
    others = {"cores": 1.0}  # what other processes keep busy, as the next /proc/stat read will say
    ticks = {"busy": 0, "total": 0, "reads": 0}

    def machine_ticks():  # 100 ticks per CPU of this machine pass between two reads
        ticks["reads"] += 1
        ticks["busy"] += int(100 * others["cores"])
        ticks["total"] += 100 * (os.cpu_count() or 1)
        return ticks["busy"], ticks["total"]

    monkeypatch.setattr(threads, "_machine_ticks", machine_ticks)
    monkeypatch.setattr(threads, "_own_ticks", lambda: 0)  # our own time is not in the fake busy ticks
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    saved = torch.get_num_threads()
    try:
        for adaptive in (False, True):
            torch.set_num_threads(2)
            others["cores"], ticks["reads"] = 1.0, 0
            cfg = compose_config(tiny_overrides(corpus, data_cache, tmp_path / str(adaptive))
                                 + [f"train.adaptive_threads={adaptive}"])
            t = Trainer(cfg)
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
    from training.config import check_options
    from training.errors import TrainConfigError

    cfg = compose_config(tiny_overrides(corpus, data_cache, tmp_path) + ["train.adaptive_threads=true",
                                                                         "train.device=mps"])
    with pytest.raises(TrainConfigError, match="train.adaptive_threads=true sets CPU threads.*train.device=cpu"):
        check_options(cfg)
