"""Progress for long loops that reads well both in a terminal and in a log file.

On a terminal: a tqdm bar, redrawn in place. Anywhere else (CI, ``| tee log``, nohup, a cluster job's
output file): no carriage-return frames, one plain line every ``every`` steps and one at the end, so a
log holds a few readable lines per epoch instead of hundreds of redrawn bars.
"""
from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, desc) as p: ... p.update(1, loss="0.12")``: a bar on a terminal, else lines.

    total: steps expected (int); desc: a label; every: steps between log lines when not on a terminal
    (the bar shows every step); enabled: False prints nothing (other ranks); stream: default stderr.
    """

    def __init__(self, total: int, desc: str = "", *, every: int = 10, enabled: bool = True, stream=None):
        self.total, self.desc, self.every, self.enabled = total, desc, max(1, every), enabled
        self.stream = stream or sys.stderr
        self.n, self.postfix, self.t0 = 0, {}, time.perf_counter()
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, file=self.stream)

    def update(self, n: int = 1, **postfix) -> None:
        """Advance by n steps; postfix values (already formatted) are shown beside the count."""
        self.n += n
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
        elif self.n % self.every == 0 and self.n < self.total:
            self._line()

    def _line(self) -> None:
        post = "  ".join(f"{k} {v}" for k, v in self.postfix.items())
        elapsed = time.perf_counter() - self.t0
        print(f"{self.desc}  {self.n}/{self.total}  {elapsed:.0f}s  {post}".rstrip(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.n:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
