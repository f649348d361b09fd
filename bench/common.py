"""What the bench scripts share."""
from __future__ import annotations

import sys
from typing import Callable

import hybridmoe


def run(main: Callable[[], int]) -> None:
    """Run a script's main(): a model or option error ends it with one line, not a traceback."""
    try:
        sys.exit(main())
    except hybridmoe.HybridMoEError as e:
        sys.exit(f"error: {e}")
