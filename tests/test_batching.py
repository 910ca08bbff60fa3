"""DynamicBatcher unit tests: random data, so that any reordering or misassignment shows."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batching import DynamicBatcher
from service.errors import DeadlineExceeded, InferenceFailed, Overloaded, ShuttingDown

pytestmark = pytest.mark.anyio


class Recorder:
    """A list-to-list callable that transforms each row and records every batch it ran."""

    def __init__(
        self, *, gate: threading.Event | None = None, fail_on: float | None = None, drop_one: bool = False
    ) -> None:
        self.batches: list[list[np.ndarray]] = []
        self.threads: set[int] = set()
        self.gate = gate
        self.fail_on = fail_on
        self.drop_one = drop_one

    def __call__(self, rows: list[np.ndarray]) -> list[np.ndarray]:
        self.threads.add(threading.get_ident())
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        self.batches.append(list(rows))
        if self.fail_on is not None and any(np.any(r == self.fail_on) for r in rows):
            raise RuntimeError("poisoned row")
        out = [r * 3.0 + 1.0 for r in rows]
        return out[:-1] if self.drop_one else out

    def seen(self, row: np.ndarray) -> bool:
        return any(any(np.array_equal(row, r) for r in batch) for batch in self.batches)


def rows(rng: np.random.Generator, n: int, width: int = 5) -> list[np.ndarray]:
    return list(rng.standard_normal((n, width)))


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


async def test_batcher_returns_each_request_its_own_rows_in_order() -> None:
    rng = np.random.default_rng(1)
    fn = Recorder()
    batcher = DynamicBatcher(fn, max_batch_size=16, max_queue_delay_ms=5)
    requests = [rows(rng, int(n)) for n in rng.integers(1, 7, size=60)]
    results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    for request, result in zip(requests, results, strict=True):
        assert len(result.outputs) == len(request)
        for sent, got in zip(request, result.outputs, strict=True):
            np.testing.assert_array_equal(got, sent * 3.0 + 1.0)
    assert max(len(b) for b in fn.batches) > 1, "concurrent requests were never batched together"
    assert all(len(b) <= 16 for b in fn.batches)
    await batcher.close()


async def test_batcher_dispatches_full_batch_without_waiting_for_delay() -> None:
    rng = np.random.default_rng(2)
    fn = Recorder()
    batcher = DynamicBatcher(fn, max_batch_size=4, max_queue_delay_ms=5_000)
    started = time.monotonic()
    results = await asyncio.gather(*(batcher.submit(rows(rng, 1)) for _ in range(4)))
    assert time.monotonic() - started < 2.0, "a full batch waited for the queue delay"
    assert [len(b) for b in fn.batches] == [4]
    assert all(r.batch_size == 4 for r in results)
    await batcher.close()


async def test_batcher_waits_at_most_delay_counted_from_oldest_request() -> None:
    rng = np.random.default_rng(3)
    fn = Recorder()
    batcher = DynamicBatcher(fn, max_batch_size=64, max_queue_delay_ms=300)
    started = time.monotonic()
    first = asyncio.ensure_future(batcher.submit(rows(rng, 1)))
    await asyncio.sleep(0.2)
    second = asyncio.ensure_future(batcher.submit(rows(rng, 1)))
    await asyncio.gather(first, second)
    elapsed = time.monotonic() - started
    # From the oldest: dispatch at ~0.3 s. Counted from the newest it would be ~0.5 s.
    assert 0.28 <= elapsed < 0.45, elapsed
    assert [len(b) for b in fn.batches] == [2]
    assert first.result().queue_s >= 0.28
    await batcher.close()


async def test_batcher_counts_rows_of_each_request_toward_max_batch_size() -> None:
    rng = np.random.default_rng(4)
    gate = threading.Event()
    fn = Recorder(gate=gate)
    batcher = DynamicBatcher(fn, max_batch_size=8, max_queue_delay_ms=0)
    blocker = asyncio.ensure_future(batcher.submit(rows(rng, 1)))
    await wait_until(lambda: batcher.in_flight == 1)
    sizes = [5, 4, 3, 1]
    queued = [asyncio.ensure_future(batcher.submit(rows(rng, n))) for n in sizes]
    await wait_until(lambda: batcher.queue_depth == 4)
    gate.set()
    await asyncio.gather(blocker, *queued)
    # 5 then 4 would exceed 8: arrival order is kept, so the batches are [5], [4, 3, 1].
    assert [len(b) for b in fn.batches] == [1, 5, 8]
    await batcher.close()


async def test_batcher_with_zero_delay_batches_what_queued_while_busy() -> None:
    rng = np.random.default_rng(5)
    gate = threading.Event()
    fn = Recorder(gate=gate)
    batcher = DynamicBatcher(fn, max_batch_size=32, max_queue_delay_ms=0)
    first = asyncio.ensure_future(batcher.submit(rows(rng, 1)))
    await wait_until(lambda: batcher.in_flight == 1)
    later = [asyncio.ensure_future(batcher.submit(rows(rng, 1))) for _ in range(6)]
    await wait_until(lambda: batcher.queue_depth == 6)
    gate.set()
    await asyncio.gather(first, *later)
    assert [len(b) for b in fn.batches] == [1, 6]
    await batcher.close()


async def test_batcher_never_mixes_requests_with_different_keys() -> None:
    rng = np.random.default_rng(6)
    gate = threading.Event()
    fn = Recorder(gate=gate)
    batcher = DynamicBatcher(fn, max_batch_size=16, max_queue_delay_ms=0)
    blocker = asyncio.ensure_future(batcher.submit(rows(rng, 1, width=3), key=3))
    await wait_until(lambda: batcher.in_flight == 1)
    widths = [5, 7, 5, 7, 7, 5]
    queued = [asyncio.ensure_future(batcher.submit(rows(rng, 2, width=w), key=w)) for w in widths]
    await wait_until(lambda: batcher.queue_depth == len(widths))
    gate.set()
    results = await asyncio.gather(blocker, *queued)
    for batch in fn.batches:
        assert len({r.shape for r in batch}) == 1, "a batch mixed shapes"
    assert sorted(len(b) for b in fn.batches) == [1, 6, 6]
    for result, width in zip(results[1:], widths, strict=True):
        assert all(o.shape == (width,) for o in result.outputs)
    await batcher.close()


async def test_batcher_rejects_at_once_when_queue_is_full() -> None:
    rng = np.random.default_rng(7)
    gate = threading.Event()
    batcher = DynamicBatcher(Recorder(gate=gate), max_batch_size=1, max_queue_size=2, retry_after_s=3)
    running = asyncio.ensure_future(batcher.submit(rows(rng, 1)))
    await wait_until(lambda: batcher.in_flight == 1)
    queued = [asyncio.ensure_future(batcher.submit(rows(rng, 1))) for _ in range(2)]
    await wait_until(lambda: batcher.queue_depth == 2)
    started = time.monotonic()
    with pytest.raises(Overloaded) as info:
        await batcher.submit(rows(rng, 1))
    assert time.monotonic() - started < 0.1
    assert info.value.status_code == 429
    assert info.value.headers["Retry-After"] == "3"
    gate.set()
    await asyncio.gather(running, *queued)  # nothing accepted is lost
    await batcher.close()


async def test_batcher_expired_request_is_answered_504_and_never_run() -> None:
    rng = np.random.default_rng(8)
    gate = threading.Event()
    fn = Recorder(gate=gate)
    batcher = DynamicBatcher(fn, max_batch_size=4, max_queue_delay_ms=0)
    running = asyncio.ensure_future(batcher.submit(rows(rng, 1)))
    await wait_until(lambda: batcher.in_flight == 1)
    late = rows(rng, 2)
    with pytest.raises(DeadlineExceeded) as info:
        await batcher.submit(late, timeout_s=0.05)
    assert info.value.status_code == 504
    assert batcher.queue_depth == 0
    gate.set()
    await running
    assert not any(fn.seen(r) for r in late), "an expired request was run"
    await batcher.close()


async def test_batcher_drops_cancelled_request_before_inference() -> None:
    rng = np.random.default_rng(9)
    gate = threading.Event()
    fn = Recorder(gate=gate)
    batcher = DynamicBatcher(fn, max_batch_size=4, max_queue_delay_ms=0)
    running = asyncio.ensure_future(batcher.submit(rows(rng, 1)))
    await wait_until(lambda: batcher.in_flight == 1)
    gone_rows, kept_rows = rows(rng, 1), rows(rng, 1)
    gone = asyncio.ensure_future(batcher.submit(gone_rows))
    kept = asyncio.ensure_future(batcher.submit(kept_rows))
    await wait_until(lambda: batcher.queue_depth == 2)
    gone.cancel()  # what the HTTP layer does when the client disconnects
    await wait_until(lambda: batcher.queue_depth == 1)
    gate.set()
    await asyncio.gather(running, kept)
    assert not fn.seen(gone_rows[0])
    assert fn.seen(kept_rows[0])
    await batcher.close()


async def test_batcher_exception_fails_only_the_culprit_of_its_batch_and_scheduler_survives() -> None:
    rng = np.random.default_rng(10)
    gate = threading.Event()
    fn = Recorder(gate=gate, fail_on=-999.0)
    batcher = DynamicBatcher(fn, max_batch_size=3, max_queue_delay_ms=0)
    first = asyncio.ensure_future(batcher.submit(rows(rng, 1)))
    await wait_until(lambda: batcher.in_flight == 1)
    poison = rows(rng, 1)
    poison[0][0] = -999.0
    doomed = [asyncio.ensure_future(batcher.submit(r)) for r in (rows(rng, 1), poison, rows(rng, 1))]
    survivors = [asyncio.ensure_future(batcher.submit(rows(rng, 1))) for _ in range(3)]
    await wait_until(lambda: batcher.queue_depth == 6)
    gate.set()
    outcomes = await asyncio.gather(first, *doomed, *survivors, return_exceptions=True)
    assert not isinstance(outcomes[0], Exception)
    # The batch of three failed; each of its requests ran again alone, so only the poison fails,
    # and with a message that does not leak the runtime's own.
    assert isinstance(outcomes[2], InferenceFailed) and "poisoned row" not in str(outcomes[2])
    assert "could not run this request (RuntimeError)" in str(outcomes[2])
    assert all(len(o.outputs) == 1 and o.batch_size == 1 for o in (outcomes[1], outcomes[3]))
    assert all(not isinstance(o, Exception) for o in outcomes[4:])
    after = await batcher.submit(rows(rng, 2))  # the scheduler is still alive
    assert len(after.outputs) == 2
    await batcher.close()


async def test_batcher_row_count_mismatch_is_an_error_not_a_misassignment() -> None:
    rng = np.random.default_rng(11)
    batcher = DynamicBatcher(Recorder(drop_one=True), max_batch_size=8, max_queue_delay_ms=20)
    outcomes = await asyncio.gather(*(batcher.submit(rows(rng, 2)) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(o, InferenceFailed) for o in outcomes)
    assert "outputs for a batch of" in str(outcomes[0])
    await batcher.close()


async def test_batcher_runs_inference_off_the_event_loop() -> None:
    rng = np.random.default_rng(12)

    def slow(batch: list[np.ndarray]) -> list[np.ndarray]:
        time.sleep(0.3)
        return batch

    batcher = DynamicBatcher(slow, max_batch_size=4)
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.ensure_future(heartbeat())
    await batcher.submit(rows(rng, 1))
    beat.cancel()
    assert ticks >= 10, "the event loop was blocked during inference"
    fn = Recorder()
    threaded = DynamicBatcher(fn, max_batch_size=4)
    await threaded.submit(rows(rng, 1))
    assert threading.get_ident() not in fn.threads
    await asyncio.gather(batcher.close(), threaded.close())


async def test_batcher_splits_request_larger_than_max_batch_and_interleaves_others() -> None:
    rng = np.random.default_rng(13)
    gate = threading.Event()
    fn = Recorder(gate=gate)
    batcher = DynamicBatcher(fn, max_batch_size=4, max_queue_delay_ms=0)
    big_rows = rows(rng, 10)
    big = asyncio.ensure_future(batcher.submit(big_rows))
    await wait_until(lambda: batcher.in_flight == 1)
    small_rows = rows(rng, 1)
    small = asyncio.ensure_future(batcher.submit(small_rows))
    await wait_until(lambda: batcher.queue_depth == 1)
    gate.set()
    big_result, small_result = await asyncio.gather(big, small)
    assert all(len(b) <= 4 for b in fn.batches)
    for sent, got in zip(big_rows, big_result.outputs, strict=True):
        np.testing.assert_array_equal(got, sent * 3.0 + 1.0)
    np.testing.assert_array_equal(small_result.outputs[0], small_rows[0] * 3.0 + 1.0)
    # The small request rode in the second batch, not after all three chunks of the big one.
    assert any(np.array_equal(r, small_rows[0]) for r in fn.batches[1])
    await batcher.close()


async def test_batcher_close_drains_queue_then_refuses_new_requests() -> None:
    rng = np.random.default_rng(14)
    gate = threading.Event()
    fn = Recorder(gate=gate)
    batcher = DynamicBatcher(fn, max_batch_size=2, max_queue_delay_ms=0)
    pending = [asyncio.ensure_future(batcher.submit(rows(rng, 1))) for _ in range(7)]
    await wait_until(lambda: batcher.in_flight == 1)
    closing = asyncio.ensure_future(batcher.close(drain=True))
    await asyncio.sleep(0.01)
    with pytest.raises(ShuttingDown):
        await batcher.submit(rows(rng, 1))
    gate.set()
    await closing
    results = await asyncio.gather(*pending)
    assert all(len(r.outputs) == 1 for r in results)
    assert sum(len(b) for b in fn.batches) == 7


async def test_a_request_that_times_out_in_the_queue_says_truthfully_how_long_it_waited() -> None:
    # Issue 13, finding 6: the message said "waited 0.032 s ... without starting" for a chunk whose
    # deadline had been the whole request's; each wait is now measured against its own deadline.
    import re

    gate = threading.Event()
    runner = Recorder(gate=gate)
    batcher = DynamicBatcher(runner, max_batch_size=1, max_queue_delay_ms=0)
    holding = asyncio.ensure_future(batcher.submit([np.ones(3)]))
    await wait_until(lambda: bool(runner.threads))  # the runner is busy with it
    with pytest.raises(DeadlineExceeded) as refused:
        await batcher.submit([np.ones(3) * 2], timeout_s=0.05)
    waited = re.search(r"waited (\d+\.\d+) s in model", refused.value.message)
    assert waited is not None and 0.05 <= float(waited.group(1)) < 0.5, refused.value.message
    gate.set()
    await holding
    await batcher.close()


async def test_batcher_chunks_of_a_large_request_each_get_the_deadline_from_when_they_queue() -> None:
    # Three chunks of 60 ms each under an 80 ms queue deadline: the last chunk starts 120 ms after the
    # request arrived, but it never waited more than the deadline itself.
    rng = np.random.default_rng(21)

    def slow(batch: list[np.ndarray]) -> list[np.ndarray]:
        time.sleep(0.06)
        return [r * 2 for r in batch]

    batcher = DynamicBatcher(slow, max_batch_size=2, max_queue_delay_ms=0)
    data = rows(rng, 6)
    result = await batcher.submit(data, timeout_s=0.08)
    assert len(result.outputs) == 6 and np.allclose(result.outputs[5], data[5] * 2)
    await batcher.close()
