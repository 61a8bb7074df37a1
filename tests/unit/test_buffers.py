"""The receive-buffer pool (kubeforge/http/buffers.py): a buffer is handed out again only once
no memoryview, numpy array or torch tensor views it."""

from __future__ import annotations

import numpy as np
import torch

from kubeforge.http.buffers import POOL_MIN, BufferPool


def test_small_buffers_are_plain_bytearrays() -> None:
    assert type(BufferPool().take(POOL_MIN - 1)) is bytearray


def test_a_buffer_nothing_views_is_used_again() -> None:
    pool = BufferPool()
    first = pool.take(POOL_MIN * 2)
    backing = id(first.obj)  # an id: holding the buffer itself would keep it taken
    del first
    again = pool.take(POOL_MIN * 2)
    assert id(again.obj) == backing and len(again) == POOL_MIN * 2
    smaller = pool.take(POOL_MIN * 3 // 2)  # in use above: a new one
    assert id(smaller.obj) != backing


def test_a_buffer_stays_taken_while_an_array_or_tensor_views_it() -> None:
    pool = BufferPool()
    buf = pool.take(POOL_MIN)
    backing = id(buf.obj)
    arr = np.frombuffer(buf, np.uint8)[10:20]  # a slice of a view
    tensor = torch.frombuffer(buf, dtype=torch.uint8)[:5]
    del buf
    assert id(pool.take(POOL_MIN).obj) != backing
    del arr
    assert id(pool.take(POOL_MIN).obj) != backing  # the tensor still holds it
    del tensor
    assert id(pool.take(POOL_MIN).obj) == backing


def test_idle_buffers_beyond_the_limit_are_unmapped() -> None:
    pool = BufferPool(limit=POOL_MIN * 3)
    taken = [pool.take(POOL_MIN * 2) for _ in range(3)]
    del taken
    pool.take(POOL_MIN * 5)  # no idle one fits: a new one, and the idle ones are trimmed
    assert pool.pooled_bytes <= POOL_MIN * 3 + POOL_MIN * 5


def test_a_pool_with_no_limit_hands_out_bytearrays() -> None:
    assert type(BufferPool(limit=0).take(POOL_MIN * 4)) is bytearray
