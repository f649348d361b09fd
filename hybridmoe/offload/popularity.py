"""Expert popularity files: tokens routed to each (layer, expert), saved by one run to warm the next (the offload
engine's GPU cache, the disk tier's resident set)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError

FORMAT = "hybridmoe-expert-popularity"


def write_popularity(path: str | Path, counts: dict[tuple[int, int], int]) -> None:
    """counts: (layer, expert) -> tokens; written atomically (a temporary file renamed over the old one)."""
    rows = [[layer, e, n] for (layer, e), n in sorted(counts.items())]
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "counts": rows}))
    os.replace(tmp, path)


def read_popularity(path: str | Path) -> dict[tuple[int, int], int]:
    try:
        data = json.loads(Path(path).read_text())
        rows = data["counts"] if data.get("format") == FORMAT else None
        return {(int(layer), int(e)): int(n) for layer, e, n in rows}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{path}: not an expert popularity file written by save_popularity") from None
