"""The progress line of `conduit batch`: lines done of all, requests/s, output tokens/s and the ETA
(tqdm counts the lines and estimates the rest; the token rate is added to it)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int | None, done_before: int, enabled: bool = True):
        """`total`: input lines (None when unknown: no ETA); `done_before`: of them, answered by an
        earlier run (shown as done, not counted in the rates)."""
        self.total, self.done_before, self.enabled = total, done_before, enabled
        self.bar = None
        self.tokens = 0
        self.started = time.monotonic()

    def __enter__(self) -> Progress:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.done_before, unit="req", desc="conduit batch",
                            file=sys.stderr, dynamic_ncols=True, smoothing=0.05)
        self.started = time.monotonic()
        return self

    def update(self, lines: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.monotonic() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            self.bar.update(lines)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
