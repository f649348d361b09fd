"""Every thread's stack on stderr every BENCH_STACKS_EVERY seconds (unset or 0: never), so that a benchmark stopped
by a time limit shows where it was, and a progress line with the time since start for each phase."""
from __future__ import annotations

import faulthandler
import os
import sys
import time

_T0 = time.perf_counter()


def arm() -> None:
    every = float(os.environ.get("BENCH_STACKS_EVERY") or 0)
    if every > 0:
        faulthandler.dump_traceback_later(every, repeat=True, file=sys.stderr)


def phase(what: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f} s] {what}", file=sys.stderr, flush=True)
