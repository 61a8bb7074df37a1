"""What every benchmark script shares about its figures: how they are printed and kept.

Each script ends with one `RESULT {json}` line (the smoke test reads it) and, with `--json
PATH`, writes the same figures to a file: `make bench` keeps them under bench/results/, where
bench/plots.py draws them. Latency distributions are kept as the values at `CDF_PERCENTILES`,
so that a CDF can be drawn without keeping every sample.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Where a latency CDF is sampled: dense where the tail is.
CDF_PERCENTILES: tuple[float, ...] = (
    *range(1, 90),
    *(90 + i * 0.5 for i in range(19)),
    99.5,
    99.9,
    99.99,
)


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="also write the figures to this file")


def finite(x: Any) -> Any:
    """NaN/inf become null, floats keep 4 decimals: the RESULT line stays strict JSON."""
    if isinstance(x, float):
        return round(x, 4) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x


def emit(figures: dict[str, Any], path: Path | None) -> None:
    """Print the RESULT line and, when asked, write the same figures to `path`."""
    clean = finite(figures)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(clean, indent=1, sort_keys=True) + "\n")
    print("RESULT " + json.dumps(clean, sort_keys=True), flush=True)


def percentiles(ordered: Sequence[float]) -> list[float]:
    """The values at CDF_PERCENTILES of an already sorted sample (nearest rank)."""
    if not ordered:
        return []
    last = len(ordered) - 1
    return [ordered[min(last, int(p / 100 * len(ordered)))] for p in CDF_PERCENTILES]


def median_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """Per percentile, the median over rounds: one CDF for a point measured several times."""
    curves = [c for c in curves if c]
    if not curves:
        return []
    columns = zip(*curves, strict=True)
    return [sorted(col)[len(col) // 2] for col in (list(c) for c in columns)]
