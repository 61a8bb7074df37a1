"""The shared vectors (tests/vectors/relay.json), checked on the Python side; the relay's
`cargo test` checks the same file, so both call paths read ids and answers alike."""

from __future__ import annotations

import json
from pathlib import Path

import httptools
import pytest

from kubeforge.errors import UnknownSessionError
from kubeforge.router.retry import Outcome
from kubeforge.router.sessions import SessionCodec

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "relay.json").read_text())


@pytest.mark.parametrize("case", VECTORS["sessions"], ids=lambda c: c.get("why", c["id"][:24]))
def test_session_ids(case: dict) -> None:
    codec = SessionCodec(VECTORS["key"])
    if case["valid"]:
        ref = codec.parse(case["id"])
        assert (ref.index, ref.instance) == (case["index"], case["instance"])
    else:
        with pytest.raises(UnknownSessionError):
            codec.parse(case["id"])


def _answer_head(raw: str) -> tuple[int, bytes | None]:
    status = int(raw.split(" ", 2)[1])
    lines = raw.split("\r\n\r\n")[0].split("\r\n")[1:]
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines)}
    retryable = headers.get("x-kubeforge-retryable")
    return status, retryable.encode() if retryable else None


@pytest.mark.parametrize("case", VECTORS["answers"], ids=lambda c: str(c["report"]))
def test_replica_answers(case: dict) -> None:
    status, retryable = _answer_head(case["response"])
    outcome = Outcome.of_answer(status, retryable)
    assert (outcome and outcome.value) == case["outcome"]
    if case["report"] is not None:  # what the relay reports means the same outcome
        assert Outcome.of_report(case["report"]).value == case["outcome"]


@pytest.mark.parametrize("report", ["connect", "lost", "timeout"])
def test_relay_reports_without_an_answer(report: str) -> None:
    assert Outcome.of_report(report).value == report


@pytest.mark.parametrize("report", ["refused", "connect x", "gone", ""])
def test_unknown_reports_are_refused(report: str) -> None:
    with pytest.raises(ValueError):
        Outcome.of_report(report)


@pytest.mark.parametrize("case", VECTORS["requests"], ids=lambda c: c["request"][40:80])
def test_python_parser_rejects_what_the_relay_hands_over_as_bad(case: dict) -> None:
    """Every request the vectors expect a 400 for is one llhttp (the Python server) rejects."""

    class Sink:
        pass

    parser = httptools.HttpRequestParser(Sink())
    if case["status"] == 400 and case.get("parser", True):
        with pytest.raises(httptools.HttpParserError):
            parser.feed_data(case["request"].encode())
    else:
        parser.feed_data(case["request"].encode())
