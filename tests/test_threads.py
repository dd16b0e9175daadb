"""The thread governor: the decision rule, and that it sees a process spinning beside it."""

import subprocess
import sys
import time

import pytest
import torch

from engine.threads import ThreadGovernor, threads_for


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
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
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
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
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
