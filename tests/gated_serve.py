"""A gate on the engine's steps, so a test decides when the engine moves instead of racing it.

    gate = StepGate(llm.core)   # closed: the engine thread waits before each step
    gate.allow(1)               # one more step may run (a prefill: each new request gets its first token)
    gate.open()                 # every step runs from now on
    gate.hold()                 # closed again (call it while the engine is idle)

Run as a script it is serve.py's command line with every engine's steps gated by stdin: each byte read
allows one step, the end of stdin opens the gate (for tests of the real process: signals, exit codes).
"""

import sys
import threading


class StepGate:
    def __init__(self, owner):
        """Wraps owner.step: an EngineCore (its steps) or the EngineCore class (every core's steps; the
        wrapper then gets the core as its argument and hands it on)."""
        self._permits = threading.Semaphore(0)
        self._open = False
        real = owner.step

        def step(*args):
            if not self._open:
                self._permits.acquire()
            return real(*args)

        owner.step = step

    def allow(self, n: int = 1) -> None:
        self._permits.release(n)

    def open(self) -> None:
        self._open = True
        self._permits.release()  # wakes a step already waiting

    def hold(self) -> None:
        self._open = False
        while self._permits.acquire(blocking=False):  # permits left over from open() or allow()
            pass


def feed_from_stdin(gate: StepGate) -> None:
    while sys.stdin.buffer.read(1):
        gate.allow()
    gate.open()


if __name__ == "__main__":
    import serve
    from engine.core import EngineCore

    threading.Thread(target=feed_from_stdin, args=(StepGate(EngineCore),), daemon=True).start()
    sys.exit(serve.main(sys.argv[1:]))
