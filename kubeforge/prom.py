"""Prometheus text exposition (format 0.0.4) without a client library: we only render."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubeforge.metrics import Histogram

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

Sample = tuple[Mapping[str, str], float]


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {float(value)!r}")

    def histogram(
        self, name: str, help_text: str, series: Iterable[tuple[Mapping[str, str], Histogram]]
    ) -> None:
        """`name_bucket{le=...}`, `name_sum` and `name_count` for each labelled histogram."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        for labels, hist in series:
            for le, n in hist.cumulative():
                self.lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {float(n)!r}")
            self.lines.append(f"{name}_sum{_labels(labels)} {float(hist.sum)!r}")
            self.lines.append(f"{name}_count{_labels(labels)} {float(hist.count)!r}")

    def one(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text, [({}, value)])

    def render(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()
