"""Ctrl-C (SIGINT) and SIGTERM (a scheduler's preemption, `kill`, torchrun stopping its workers) ask the
loop to stop after the current step and save, instead of losing everything since the last checkpoint.
A second Ctrl-C aborts at once."""

import signal
import sys


class StopOnSignal:
    """Within this block, `requested` names the first SIGINT/SIGTERM received (None until then)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    requested = None  # until a signal sets it on the instance

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C raises KeyboardInterrupt
        print(f"\n{self.requested}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnSignal":
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
