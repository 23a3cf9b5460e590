"""The console's progress display: one tqdm bar per phase (SFT warm-up, RL steps, evaluation), with
rate and eta, and calibrl's own lines printed above it.

On a terminal the bar refreshes in place; elsewhere (a pipe, a CI log, `ray job logs`) tqdm still
rewrites one line with carriage returns, refreshed at most every `PIPE_REFRESH_S` seconds.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

PIPE_REFRESH_S = 15.0


class Progress:
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.bar: tqdm | None = None
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def phase(self, desc: str, total: int, initial: int = 0, unit: str = "step") -> None:
        """Start a bar for a new phase (closing the current one)."""
        self.close()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                        dynamic_ncols=self.tty, ncols=None if self.tty else 110,
                        mininterval=0.5 if self.tty else PIPE_REFRESH_S, leave=True)

    def advance(self, n: int = 1, **postfix: float) -> None:
        if self.bar is None:
            return
        if postfix:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()}, refresh=False)
        self.bar.update(n)

    def task(self, desc: str, total: int, unit: str) -> tqdm:
        """A transient bar below the phase's, for work inside a step (an evaluation); shown on
        terminals only, where it refreshes in place and disappears when done."""
        return tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False, dynamic_ncols=True,
                    position=1 if self.bar is not None else 0, disable=not self.tty)

    def line(self, text: str) -> None:
        """A line of calibrl's own above the bar (the bar is redrawn below it)."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
