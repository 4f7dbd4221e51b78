"""Admission's row reservation: what a body of a given size may hold, per encoding."""

from __future__ import annotations

import asyncio

import pytest

from app.admission import MIN_ROW_BYTES, Admission, Busy
from app.decoding import InputSpec
from app.metrics import Metrics


def admission(max_rows: int = 64) -> Admission:
    return Admission(max_rows=max_rows, max_bytes=1 << 30, max_wait_s=0.05, max_instances=256,
                     metrics=Metrics())


def test_any_encoding_reserves_the_most_rows_the_body_can_hold():
    a = admission()
    assert a.estimate_rows(None) == 256  # unknown length: the per-request maximum
    assert a.estimate_rows(10) == 1
    assert a.estimate_rows(10 * MIN_ROW_BYTES) == 10
    assert a.estimate_rows(10**9) == 256


def test_binary_bodies_reserve_whole_fp32_rows():
    """A 12 KB binary 3x32x32 tensor is one row; the any-encoding minimum would count 192 and
    keep all but a few such requests waiting while the batcher runs tiny batches."""
    row = InputSpec((3, 32, 32), [0.0, 1.0]).binary_row_bytes
    assert row == 4 * 3 * 32 * 32
    body = 120 + row  # the JSON header, then one row
    a = admission()
    assert a.estimate_rows(body, row) == 2  # the header's bytes could at most be one more row
    assert a.estimate_rows(body) == 194  # before: 12,408 bytes / 64

    async def admit_many(n: int) -> int:
        tickets = [await a.acquire(body, body, asyncio.get_running_loop().time() + 1, row)
                   for _ in range(n)]
        return sum(t.rows for t in tickets)

    # 32 such requests fit a 64-row bound at once
    assert asyncio.run(admit_many(32)) == 64


def test_without_a_wait_a_full_queue_refuses_at_once_instead_of_handing_over():
    """HFF_QUEUE_WAIT_S 0: no line to wait in, so try_acquire (the hot path's) refuses with 429
    itself; with a wait allowed it returns None and the request waits in line on the ASGI route."""
    for wait, refuses in ((0.0, True), (0.05, False)):
        a = Admission(max_rows=2, max_bytes=1 << 30, max_wait_s=wait, max_instances=1,
                      metrics=Metrics())
        first = a.try_acquire(10, 10, 1e9)
        second = a.try_acquire(10, 10, 1e9)
        assert first is not None and second is not None and a.rows == 2
        if refuses:
            with pytest.raises(Busy) as refused:
                a.try_acquire(10, 10, 1e9)
            assert refused.value.status == 429 and "HFF_QUEUE_WAIT_S" in refused.value.message
            assert refused.value.headers == {"Retry-After": "1"}
        else:
            assert a.try_acquire(10, 10, 1e9) is None
        assert a.rows == 2  # a refusal reserves nothing
        a.release(first)
        assert a.try_acquire(10, 10, 1e9) is not None
