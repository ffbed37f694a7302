"""Progress of a benchmark on stderr (stdout keeps only the tables): tqdm when installed, else a
plain line, rewritten in place on a terminal and printed every few seconds into a log."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream: Optional[TextIO] = None,
                 log_interval_s: float = 5.0):
        self.total, self.done, self.desc, self.enabled = max(int(total), 1), 0, desc, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.log_interval_s = log_interval_s
        self._last_line = float("-inf")
        self._in_place = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=self.total, desc=desc, unit="step", file=self.stream, dynamic_ncols=True)
        if enabled and self._bar is None:
            self._show("starting")  # the first unit can take a while: say at once that the run began

    def update(self, label: str = "", n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(n)
            return
        if not self._in_place and self.done < self.total and time.monotonic() - self._last_line < self.log_interval_s:
            return  # a log wants a line every few seconds, not one per step
        self._show(label)

    def _show(self, label: str) -> None:
        self._last_line = time.monotonic()
        width = 30
        filled = width * self.done // self.total
        line = f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label}".strip()
        if self._in_place:
            self.stream.write("\r\x1b[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._in_place:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
