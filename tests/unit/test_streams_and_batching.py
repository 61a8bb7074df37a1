"""The pure parts of streaming and batching: frames (kubeforge/streams.py), a batch's columns,
and what `@endpoint` accepts."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubeforge import Actor, endpoint, streams
from kubeforge.actor import endpoints_of
from kubeforge.argcheck import checker
from kubeforge.errors import InvalidArgumentsError
from kubeforge.replica.batching import columns
from kubeforge.router.core import batch_counts
from kubeforge.router.report import batch_sizes


def encoded(items: list[bytes], end: int = streams.END) -> bytes:
    out = b"".join(b"".join(streams.frame(streams.ITEM, i)) for i in items)
    return out + b"".join(streams.frame(end, b'{"error": {}}' if end == streams.ERROR else b""))


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(1, 64), st.randoms())
def test_frames_come_out_whole_whatever_the_chunk_boundaries(
    items: list[bytes], most: int, rnd: random.Random
) -> None:
    raw = encoded(items)
    reader = streams.FrameReader()
    got, at = [], 0
    while at < len(raw):
        size = rnd.randint(1, most)
        got += list(reader.feed(raw[at : at + size]))
        at += size
    assert [bytes(p) for k, p in got if k == streams.ITEM] == items
    assert got[-1][0] == streams.END and reader.ended and not reader.mid_frame


def test_a_cut_stream_is_seen_as_cut() -> None:
    raw = encoded([b"abc", b"defgh"])
    reader = streams.FrameReader()
    got = list(reader.feed(raw[:12]))  # the first frame and part of the second
    assert [bytes(p) for _, p in got] == [b"abc"]
    assert reader.mid_frame and not reader.ended


def test_an_error_frame_ends_the_stream_and_nothing_may_follow() -> None:
    reader = streams.FrameReader()
    kinds = [k for k, _ in reader.feed(encoded([b"1"], end=streams.ERROR))]
    assert kinds == [streams.ITEM, streams.ERROR] and reader.ended
    with pytest.raises(streams.FrameError, match="after the end"):
        list(reader.feed(b"\x00"))
    with pytest.raises(streams.FrameError, match="unknown frame kind 7"):
        list(streams.FrameReader().feed(streams.HEAD.pack(0, 7)))


def test_content_types_name_the_items_format() -> None:
    stream_type = streams.content_type(b"application/json")
    assert streams.item_type(stream_type) == b"application/json"
    assert streams.item_type(b"application/json") is None
    assert streams.sse_event(streams.ITEM, b'"x"') == b'data: "x"\n\n'


def test_columns_turn_calls_into_one_list_per_argument() -> None:
    calls = [([1], {"by": 2}), ([3], {"by": 4})]
    assert columns(calls) == ([[1, 3]], {"by": [2, 4]})
    with pytest.raises(ValueError, match="same arguments"):
        columns([([1], {}), ([], {"x": 1})])


def test_a_batched_endpoint_checks_each_call_against_its_lists_elements() -> None:
    class A(Actor):
        @endpoint(batch_size=4)
        async def score(self, texts: list[str], scale: float = 1.0) -> list[float]:
            return [len(t) * scale for t in texts]

    info = endpoints_of(A)["score"]
    assert info.batch == (4, 0.005)
    check = checker("score", A.score, info.signature, batched=True)
    check(["one"], {})
    with pytest.raises(InvalidArgumentsError, match="must be str, got int"):
        check([1], {})


def test_endpoint_options_are_checked_when_the_class_is_defined() -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        endpoint(batch_size=0)
    with pytest.raises(ValueError, match="batch_wait"):
        endpoint(batch_size=2, batch_wait=-1)
    with pytest.raises(ValueError, match="cannot be batched"):

        class B(Actor):
            @endpoint(batch_size=2)
            async def gen(self, xs: list[int]) -> AsyncIterator[int]:
                yield 1

    class C(Actor):
        @endpoint
        async def gen(self) -> AsyncIterator[int]:
            yield 1

        @endpoint
        def sync_gen(self) -> object:
            yield 1

    assert [endpoints_of(C)[n].streams for n in ("gen", "sync_gen")] == [True, True]


def test_reported_batch_counts_keep_only_well_formed_entries_and_give_mean_sizes() -> None:
    reported = {
        "score": {"batches": 4, "calls": 30, "largest": 16},
        "idle": {"batches": 0, "calls": 0, "largest": 0},
        "bad": {"batches": -1, "calls": 2, "largest": 2},
        "worse": {"batches": "4", "calls": 3, "largest": 1},
        7: {"batches": 1, "calls": 1, "largest": 1},
    }
    counts = batch_counts(reported)
    assert sorted(counts) == ["idle", "score"]
    assert batch_counts(["not", "a", "map"]) == {} == batch_counts(None)
    sizes = batch_sizes(counts)
    assert sizes["score"]["avg_batch_size"] == 7.5 and sizes["score"]["largest"] == 16
    assert sizes["idle"]["avg_batch_size"] == 0.0
