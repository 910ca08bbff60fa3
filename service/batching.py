"""Dynamic batching with Triton's semantics, knowing neither HTTP nor ONNX.

A :class:`DynamicBatcher` wraps a blocking list-to-list callable (``rows -> outputs``, one output
per row, same order) and lets many concurrent callers share it:

* one queue and one scheduler task per batcher; a batch is formed only when an execution slot
  is free (``instances`` slots, each a thread, since onnxruntime releases the GIL);
* the queue is walked in arrival order, summing each request's own row count; a batch never
  exceeds ``max_batch_size`` and never mixes requests with different ``key`` (e.g. input shapes);
* dispatch at once when the batch is full, otherwise wait at most ``max_queue_delay_ms`` counted
  from the *oldest* waiting request; with delay 0 batches form from what queued meanwhile;
* a full queue rejects at once (:class:`Overloaded`); a request whose deadline passes while it is
  queued is removed and fails with :class:`DeadlineExceeded`, never run; a caller that is
  cancelled (client gone) is removed before inference;
* an exception fails exactly the requests of its batch and the scheduler keeps going;
* outputs are split back to their requests in order, after checking the row count;
* a request larger than ``max_batch_size`` is cut into chunks that queue one after another, so
  other requests interleave with it instead of waiting behind all of it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from service.admission import Places, redeem
from service.errors import DeadlineExceeded, InferenceFailed, Overloaded, ServiceError, ShuttingDown

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatchObserver(Protocol):
    """Hooks for metrics; the batcher calls them on the event loop."""

    def on_queue_depth(self, depth: int) -> None: ...
    def on_batch(self, size: int, compute_s: float) -> None: ...
    def on_dequeue(self, queue_s: float) -> None: ...


class _NullObserver:
    def on_queue_depth(self, depth: int) -> None:
        pass

    def on_batch(self, size: int, compute_s: float) -> None:
        pass

    def on_dequeue(self, queue_s: float) -> None:
        pass


@dataclass(frozen=True, slots=True)
class BatchResult(Generic[R]):
    outputs: list[R]
    queue_s: float  # time spent waiting in the queue
    compute_s: float  # time of the batch (or batches) that carried the request
    batch_size: int  # rows in the largest batch the request rode in


class _State(enum.Enum):
    QUEUED = 1
    RUNNING = 2
    DONE = 3  # expired, cancelled or answered


class _Pending:
    __slots__ = ("deadline", "enqueued", "future", "key", "queue_s", "queued_at", "rows", "state")

    def __init__(self, rows: Sequence, key: Hashable, now: float, deadline: float, future: asyncio.Future) -> None:
        self.rows = rows
        self.key = key
        self.enqueued = now  # event-loop clock: schedules the delay and the deadline timer
        # perf_counter: what is reported. The loop's clock has 1 ms resolution under uvloop, most
        # of a small model's whole inference (0.5 ms for MNIST at batch 1).
        self.queued_at = time.perf_counter()
        self.deadline = deadline
        self.future = future
        self.state = _State.QUEUED
        self.queue_s = 0.0


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        infer: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_queue_delay_ms: float = 0.0,
        max_queue_size: int = 256,
        instances: int = 1,
        name: str = "batcher",
        observer: BatchObserver | None = None,
        retry_after_s: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if instances < 1:
            raise ValueError("instances must be >= 1")
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.instances = instances
        self.name = name
        self._observer: BatchObserver = observer or _NullObserver()
        self._retry_after = {"Retry-After": str(retry_after_s)}
        self._queue: deque[_Pending] = deque()
        self.places = Places()  # held by requests let in but not yet queued (see service.admission)
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(instances)
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=f"infer-{name}")
        self._running: set[asyncio.Task] = set()
        self._scheduler: asyncio.Task | None = None
        self._closing = False

    # -- public API -------------------------------------------------------------------------

    @property
    def saturated(self) -> bool:
        """The queue is full, counting the places held for requests on their way: a new request
        would be refused."""
        return len(self._queue) + self.places.held >= self.max_queue_size

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def start(self) -> None:
        if self._scheduler is None:
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule(), name=f"batcher-{self.name}")

    async def submit(
        self, rows: Sequence[T], *, key: Hashable = None, timeout_s: float | None = None
    ) -> BatchResult[R]:
        """Queue ``rows`` and wait for their outputs, in the same order.

        ``timeout_s`` bounds the time until the request starts running (its queue time), as in
        Triton; once running, a batch is always finished. A request cut into chunks gets it per
        chunk, from the moment that chunk queues: the chunks run one after another, and the last
        must not expire for the time the first ones spent running. It completes or fails as one.
        """
        if not rows:
            return BatchResult([], 0.0, 0.0, 0)
        if self._closing:
            raise ShuttingDown(f"model {self.name} is shutting down", headers=self._retry_after)
        self.start()
        loop = asyncio.get_running_loop()

        def deadline() -> float:
            return loop.time() + timeout_s if timeout_s is not None else float("inf")

        size = self.max_batch_size
        if len(rows) <= size:
            return await self._submit_one(rows, key, deadline())
        outputs: list[R] = []
        queue_s = compute_s = 0.0
        batch_size = 0
        for start in range(0, len(rows), size):
            part = await self._submit_one(rows[start : start + size], key, deadline())
            outputs.extend(part.outputs)
            queue_s += part.queue_s
            compute_s += part.compute_s
            batch_size = max(batch_size, part.batch_size)
        return BatchResult(outputs, queue_s, compute_s, batch_size)

    async def close(self, *, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop taking requests; with ``drain`` finish what is queued and running first."""
        self._closing = True
        self._wake.set()
        if drain:
            deadline = time.monotonic() + timeout_s
            while (self._queue or self._running) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
        for pending in self._queue:
            self._fail(pending, ShuttingDown(f"model {self.name} shut down before the request ran"))
        self._queue.clear()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- submitting ---------------------------------------------------------------------------

    async def _submit_one(self, rows: Sequence[T], key: Hashable, deadline: float) -> BatchResult[R]:
        redeem(self.places)  # the place this request held (if any) becomes its entry in the queue
        if len(self._queue) + self.places.held >= self.max_queue_size:
            raise Overloaded(
                f"model {self.name} has {len(self._queue)} requests queued and {self.places.held} on their way "
                f"(limit {self.max_queue_size})",
                headers=self._retry_after,
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        if deadline <= now:
            raise DeadlineExceeded(f"request deadline passed before it reached model {self.name}")
        pending = _Pending(rows, key, now, deadline, loop.create_future())
        self._queue.append(pending)
        self._observer.on_queue_depth(len(self._queue))
        self._wake.set()
        # A timer rather than wait_for(shield(...)): one handle per request instead of two tasks.
        timer = loop.call_at(deadline, self._deadline_passed, pending) if deadline != float("inf") else None
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The caller is gone (client disconnected). Drop it if it has not started yet.
            if pending.state is _State.QUEUED:
                self._remove(pending)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _deadline_passed(self, pending: _Pending) -> None:
        # Only a queued request expires; a started batch is always finished and answered.
        if pending.state is _State.QUEUED:
            self._remove(pending)
            self._fail(
                pending,
                DeadlineExceeded(
                    f"request waited {time.perf_counter() - pending.queued_at:.3f} s in model {self.name}'s queue "
                    f"without starting ({len(self._queue)} others still queued); try again later"
                ),
            )

    def _remove(self, pending: _Pending) -> None:
        pending.state = _State.DONE
        try:
            self._queue.remove(pending)
        except ValueError:
            pass
        self._observer.on_queue_depth(len(self._queue))

    async def _run(self, rows: list) -> tuple[Sequence[R], float]:
        started = time.perf_counter()
        outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._infer, rows)
        if len(outputs) != len(rows):
            raise InferenceFailed(f"model {self.name} returned {len(outputs)} outputs for a batch of {len(rows)} rows")
        compute_s = time.perf_counter() - started
        self._observer.on_batch(len(rows), compute_s)
        return outputs, compute_s

    async def _execute_alone(self, pending: _Pending) -> None:
        if pending.future.done():
            return
        try:
            outputs, compute_s = await self._run(list(pending.rows))
        except Exception as exc:
            self._fail(pending, self._as_service_error(exc, len(pending.rows)))
            return
        self._answer([pending], outputs, compute_s, len(pending.rows))

    def _as_service_error(self, exc: Exception, rows: int) -> ServiceError:
        if isinstance(exc, ServiceError):
            return exc
        log.error("a request of %d rows failed in model %s: %s", rows, self.name, exc)
        # onnxruntime's own message names graph nodes and internals: not for clients.
        return InferenceFailed(f"model {self.name} could not run this request ({type(exc).__name__})")

    def _answer(self, batch: list[_Pending], outputs: Sequence[R], compute_s: float, rows: int) -> None:
        offset = 0
        for pending in batch:
            n = len(pending.rows)
            pending.state = _State.DONE
            if not pending.future.done():
                pending.future.set_result(
                    BatchResult(list(outputs[offset : offset + n]), pending.queue_s, compute_s, rows)
                )
            offset += n

    @staticmethod
    def _fail(pending: _Pending, exc: BaseException) -> None:
        pending.state = _State.DONE
        if not pending.future.done():
            pending.future.set_exception(exc)

    # -- scheduling ---------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[_Pending]:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            self._expire(now)
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._queue[0]
            if self._closing or self.max_queue_delay_s == 0 or self._rows_ready(head.key) >= self.max_batch_size:
                return self._take(head.key, now)
            wait_s = head.enqueued + self.max_queue_delay_s - now
            if wait_s <= 0:
                return self._take(head.key, now)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait_s)
            except TimeoutError:
                pass

    def _expire(self, now: float) -> None:
        expired = [p for p in self._queue if p.deadline <= now]
        for pending in expired:
            self._remove(pending)
            self._fail(
                pending, DeadlineExceeded(f"request's deadline passed while it waited in model {self.name}'s queue")
            )

    def _rows_ready(self, key: Hashable) -> int:
        total = 0
        for pending in self._queue:
            if pending.key == key:
                total += len(pending.rows)
                if total >= self.max_batch_size:
                    break
        return total

    def _take(self, key: Hashable, now: float) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        for pending in self._queue:
            if pending.key != key:
                continue  # a different shape waits for a batch of its own
            if rows + len(pending.rows) > self.max_batch_size:
                break  # keep arrival order: do not let later, smaller requests jump ahead
            batch.append(pending)
            rows += len(pending.rows)
        taken = time.perf_counter()
        for pending in batch:
            self._queue.remove(pending)
            pending.state = _State.RUNNING
            pending.queue_s = taken - pending.queued_at
            self._observer.on_dequeue(pending.queue_s)
        self._observer.on_queue_depth(len(self._queue))
        return batch

    # -- executing ----------------------------------------------------------------------------

    async def _execute(self, batch: list[_Pending]) -> None:
        try:
            rows = [row for pending in batch for row in pending.rows]
            try:
                outputs, compute_s = await self._run(rows)
            except Exception as exc:
                if len(batch) == 1:
                    self._fail(batch[0], self._as_service_error(exc, len(rows)))
                    return
                # One request's bad input must not fail the others that shared its batch: run each
                # alone, so only the culprit gets the error.
                log.warning("batch of %d requests failed in model %s; running each alone", len(batch), self.name)
                for pending in batch:
                    await self._execute_alone(pending)
                return
            self._answer(batch, outputs, compute_s, len(rows))
        finally:
            self._slots.release()
