"""Step-level (iteration-level) batching for autoregressive decoding, knowing neither HTTP nor ONNX.

A dynamic batcher runs a whole request per batch; for a decode loop that means a batch of short
and long sentences runs until the longest one ends, and a request that arrives meanwhile waits
for all of it. :class:`StepScheduler` batches *steps* instead (Orca's iteration-level scheduling,
as in vLLM), for any model that offers two blocking calls on a list of sequences:

* ``prefill(new)``: the one-off work of newly admitted sequences (an encoder pass);
* ``step(active)``: one decoding step for every row of every active sequence, each sequence
  updating itself (appending a token, re-ranking its beams) and setting ``done`` when it ends.

Per-row decoder state is the sequence's own, of whatever kind its decoder keeps, and the scheduler
never looks inside it (see :class:`Decoder`): a translation's key/value cache grows by a position
per step (its ``tokens`` grow with it and count against ``max_tokens``); a recurrent language
model's ``(h, c)`` is fixed in size. Either way a row joins the batch once its prefill has made its
state, and leaves with it when it ends, at any step.

One loop per model, on its own thread (the event loop only adds sequences and receives the
answers): the next step never waits for a busy event loop. When each iteration went through the
event loop, the decode thread sat idle 33-41 % of the time at 512 connections (py-spy), waiting
for its turn among the requests being answered and refused. Each iteration:

1. drops sequences whose caller is gone, and fails with :class:`DeadlineExceeded` those whose
   deadline passed, whether still waiting or in the middle of decoding (they leave the batch);
2. admits waiting sequences in arrival order while the batch stays within ``max_rows`` (decoder
   rows: a beam of 4 is 4 rows) and ``max_tokens`` (tokens held by the batch, source and target,
   as they are at admission), running ``prefill`` on them (a failure there fails only them); they
   join this very step;
3. runs ``step`` on the whole batch;
4. answers every sequence that finished (one hand-over to the event loop for all of them): it
   leaves the batch and its place goes to the next waiting one.

An exception in ``prefill`` or ``step`` fails exactly the sequences of that call, and the loop goes
on. The waiting line is bounded (:class:`Overloaded` beyond ``max_queue_size``).

Where a step's cost grows with its rows (a CPU), every active sequence pays for the batch's size on
every step, and the longest sequences, which take the most steps, pay most. So sequences that have
been decoding for ``boost_after`` steps or more (the oldest first, at most ``boost_rows`` rows) take
up to ``boost_steps`` extra steps in the same iteration, alone (within a quarter of the batch's
rows, so only large batches, whose steps are slow, do it): a step of a few rows is cheap, and
it spends compute on the oldest requests first (first come, first finished) without holding back
the rest. Every token is still computed once; only the order changes.

A prefill's cost grows little with the prompts it takes (the recurrent model's, on a CPU: 1.7 ms
for one prompt of 8 tokens, 2.7 ms for four, ``python -m bench.sampling``), and at a steady state
about one sequence joins per step. With ``admit_every=k``, newcomers join a decoding batch at most
every k steps (at once when nothing decodes), so one prefill serves several: fewer prefill calls
for up to k - 1 steps more before a newcomer's first token.

``mode="request"`` keeps the same machinery but admits only into an empty batch: a static batch
decodes until its last sequence ends, which is request-level batching, kept for benchmarks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

from service.admission import Places, holds, redeem
from service.errors import DeadlineExceeded, InferenceFailed, Overloaded, PayloadTooLarge, ServiceError, ShuttingDown

log = logging.getLogger(__name__)


class Sequence(Protocol):
    """What the scheduler needs to know of a sequence being decoded."""

    @property
    def rows(self) -> int: ...  # rows it may put in a step batch (its beam width), reserved at admission
    @property
    def tokens(self) -> int: ...  # tokens per row it holds now (source + generated)
    @property
    def done(self) -> bool: ...


S = TypeVar("S", bound=Sequence)


class Decoder(Protocol[S]):
    """What a model gives the scheduler: two blocking calls (run on the decode thread) on lists of
    its sequences, each of which carries its own decoder state between calls.

    * ``prefill(new)``: make each new sequence's state (an encoder pass and cross-attention keys
      and values; a recurrent network run over the prompt), possibly its first token;
    * ``step(active)``: one token for each row of each sequence that is not done, its state
      carried forward (a cache appended to, a recurrent state replaced)."""

    def prefill(self, seqs: list[S]) -> None: ...
    def step(self, seqs: list[S]) -> None: ...
    def close(self) -> None: ...


class StepObserver(Protocol):
    def on_queue_depth(self, depth: int) -> None: ...
    def on_step(self, rows: int, sequences: int, seconds: float) -> None: ...
    def on_active(self, sequences: int) -> None: ...


class _NullObserver:
    def on_queue_depth(self, depth: int) -> None:
        pass

    def on_step(self, rows: int, sequences: int, seconds: float) -> None:
        pass

    def on_active(self, sequences: int) -> None:
        pass


@dataclass(frozen=True, slots=True)
class DecodeStats:
    queue_s: float  # from submission to admission into the batch
    decode_s: float  # from admission to the answer
    steps: int  # decoder steps the sequence took part in
    max_rows: int  # the largest step batch (rows) it rode in


class _Entry(Generic[S]):
    __slots__ = (
        "admitted",
        "deadline",
        "future",
        "group",
        "max_rows",
        "rows",
        "seq",
        "steps",
        "submitted",
        "timeout_s",
    )

    def __init__(self, seq: S, deadline: float, timeout_s: float | None, future: asyncio.Future, group: object) -> None:
        self.timeout_s = timeout_s
        self.group = group  # the request it belongs to (fair shares); the sequence itself if none
        self.seq = seq
        self.rows = seq.rows  # as reserved at submission (the waiting line's books count these)
        # Timings on perf_counter; the deadline on time.monotonic, which the decode thread checks.
        self.submitted = time.perf_counter()
        self.deadline = deadline
        self.future = future
        self.admitted = 0.0
        self.steps = 0
        self.max_rows = 0


class StepScheduler(Generic[S]):
    def __init__(
        self,
        prefill: Callable[[list[S]], None],
        step: Callable[[list[S]], None],
        *,
        max_rows: int,
        max_tokens: int,
        max_queue_size: int = 256,
        mode: Literal["step", "request"] = "step",
        name: str = "decoder",
        observer: StepObserver | None = None,
        retry_after_s: int = 1,
        boost_after: int = 0,
        boost_steps: int = 0,
        boost_rows: int = 8,
        fair: bool = True,
        admit_every: int = 1,
    ) -> None:
        if max_rows < 1 or max_tokens < 1 or admit_every < 1:
            raise ValueError("max_rows, max_tokens and admit_every must be >= 1")
        if mode not in ("step", "request"):
            raise ValueError(f"mode must be 'step' or 'request', not {mode!r}")
        self._prefill, self._step = prefill, step
        self.max_rows, self.max_tokens = max_rows, max_tokens
        self.max_queue_size = max_queue_size
        self.mode = mode
        self.fair = fair  # requests share max_rows (see _admit)
        # Step mode: while a batch decodes, newcomers join at most every this many steps, so that
        # one prefill call serves several (see _admit).
        self.admit_every = admit_every
        self._since_admit = 0  # iterations since newcomers last joined a decoding batch
        self.name = name
        # Extra steps for old sequences (step mode only; 0 turns it off).
        self.boost_after, self.boost_steps, self.boost_rows = boost_after, boost_steps, boost_rows
        self._observer: StepObserver = observer or _NullObserver()
        self._retry_after = {"Retry-After": str(retry_after_s)}
        self._waiting: deque[_Entry[S]] = deque()
        # The waiting line's books, kept as entries come and go so that admission is O(distinct
        # request sizes), not O(waiting): a scan of the line on every check took 8 % of the event
        # loop at 512 connections (py-spy), where most checks end in a 429.
        self._waiting_rows = 0
        # Requests let in but not yet here hold a place of one row each (see service.admission).
        self.places = Places()
        self._group_rows: dict[object, int] = {}  # request -> its rows waiting
        self._size_rows: dict[int, int] = {}  # a request's waiting rows -> rows of all such requests
        # The waiting line and its books are shared: the event loop adds and withdraws, the
        # decode thread admits and prunes; this lock guards them. The batch is the thread's own.
        self._lock = threading.Lock()
        self._active: list[_Entry[S]] = []
        self._work = threading.Event()  # set when there may be something to do
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._stopping = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def start(self) -> None:
        """Start the decode thread; answers go to the running event loop."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name=f"decode-{self.name}", daemon=True)
            self._thread.start()

    async def submit(
        self, seq: S, *, timeout_s: float | None = None, group: object = None, admitted: bool = False
    ) -> DecodeStats:
        """Decode ``seq`` to its end (it is updated in place) and say how it went.

        ``timeout_s`` bounds the whole decode, waiting included: past it the sequence leaves the
        batch and this raises :class:`DeadlineExceeded`. ``group``: the request the sequence is
        part of; requests share the batch's rows fairly (see :meth:`_admit`). ``admitted``: the
        caller already passed the whole request through :meth:`admit`.
        """
        if self._closing:
            raise ShuttingDown(f"model {self.name} is shutting down", headers=self._retry_after)
        if seq.rows > self.max_rows or seq.rows * seq.tokens > self.max_tokens:
            raise PayloadTooLarge(  # it could never be admitted: refuse it rather than queue it forever
                f"a sequence of {seq.rows} rows x {seq.tokens} tokens exceeds model {self.name}'s decode batch "
                f"({self.max_rows} rows, {self.max_tokens} tokens)"
            )
        if not admitted:
            self.admit(seq.rows)
        self.start()
        if asyncio.get_running_loop() is not self._loop:  # its answer could never be delivered
            raise RuntimeError(f"decoder {self.name} answers on another event loop")
        deadline = time.monotonic() + timeout_s if timeout_s is not None else float("inf")
        entry = _Entry(seq, deadline, timeout_s, self._loop.create_future(), seq if group is None else group)  # type: ignore[union-attr]
        redeem(self.places)  # its rows now stand where its place was
        with self._lock:  # the gauge too: the decode thread may admit it at once and report 0
            self._enqueue(entry)
            self._observer.on_queue_depth(len(self._waiting))
        self._work.set()
        try:
            return await entry.future
        except asyncio.CancelledError:
            # Caller gone: leave the line now; the batch at the next step (the thread sees the
            # cancelled future).
            with self._lock:
                self._withdraw(entry)
            raise

    @property
    def saturated(self) -> bool:
        """The waiting line is full: even a request of one row would be refused."""
        return self._ahead(1) is not None

    @property
    def waiting_rows(self) -> int:
        return self._waiting_rows

    def _enqueue(self, entry: _Entry[S]) -> None:
        self._waiting.append(entry)
        self._book(entry.group, entry.rows)

    def _dequeue(self, entry: _Entry[S]) -> None:
        self._waiting.remove(entry)  # ValueError when it is not waiting: the books stay as they are
        self._book(entry.group, -entry.rows)

    def _book(self, group: object, rows: int) -> None:
        before = self._group_rows.get(group, 0)
        after = before + rows
        if before:
            left = self._size_rows[before] - before
            if left:
                self._size_rows[before] = left
            else:
                del self._size_rows[before]
        if after:
            self._group_rows[group] = after
            self._size_rows[after] = self._size_rows.get(after, 0) + after
        else:
            del self._group_rows[group]
        self._waiting_rows += rows

    def admit(self, rows: int) -> None:
        """Raise :class:`Overloaded` unless a request of ``rows`` rows may wait. Call it with a whole
        request's rows before submitting any of them: it is refused whole, before any decodes.

        The line is bounded by cost, in rows (a beam of 5 waits as 5), and by what is ahead of
        *this* request: with fair shares a request overtakes the waiting requests larger than
        itself, so only the no-larger ones count against ``max_queue_size``. A short request is
        not refused because a 320-row one is waiting; a large one is refused while anything
        waits that it would have to wait behind. Everything waiting together stays within four
        times the limit."""
        if self._closing:
            raise ShuttingDown(f"model {self.name} is shutting down", headers=self._retry_after)
        # The place this request holds on its way (if any) is not counted ahead of it; its rows
        # take it over when they queue (submit), a loop turn later.
        ahead = self._ahead(rows, own=holds(self.places))
        if ahead is not None:
            raise Overloaded(
                f"model {self.name} has {ahead} decoder rows waiting ahead of a request of "
                f"{rows} (limit {self.max_queue_size}); retry later",
                headers=self._retry_after,
            )

    def _ahead(self, rows: int, own: bool = False) -> int | None:
        """The rows that keep a request of ``rows`` out of the line, or None when it may wait.
        A place held for a request on its way counts as a waiting request of one row (except the
        asking request's ``own``)."""
        held = self.places.held - own
        total = self._waiting_rows + held
        if not total:
            return None
        with self._lock:
            ahead = held + sum(r for size, r in self._size_rows.items() if size <= rows) if self.fair else total
        if (ahead and ahead + rows > self.max_queue_size) or (total and total + rows > 4 * self.max_queue_size):
            return ahead
        return None

    async def close(self, *, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop taking sequences; with ``drain`` finish those waiting and decoding first."""
        self._closing = True
        if drain:
            deadline = time.monotonic() + timeout_s
            while (self._waiting or self._active) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        self._stopping = True
        self._work.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # A step in progress ends first (at most one step's time; bounded, so a stuck graph
            # cannot hold shutdown).
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 10.0)
        with self._lock:
            left = [*self._waiting, *self._active]
            self._waiting.clear()
            self._waiting_rows = 0
            self._group_rows.clear()
            self._size_rows.clear()
            self._active = []
        for entry in left:
            self._fail(entry, ShuttingDown(f"model {self.name} shut down before the sequence finished"))
        self._observer.on_active(0)
        self._observer.on_queue_depth(0)

    # -- the loop (on the decode thread) ------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._work.wait()
            if self._stopping:
                break
            try:
                self._once()
            except Exception:  # a bug of ours: fail the batch and go on rather than stop decoding
                log.exception("decoder %s: an iteration failed", self.name)
                self._fail_all(self._active, InferenceFailed(f"model {self.name} failed while decoding"))

    def _once(self) -> None:
        self._prune(time.monotonic())
        with self._lock:
            new = self._admit(time.perf_counter())
            if not self._active and not new:
                # Nothing decodes and nothing can start: sleep until a submission (which sets the
                # event after adding, under this lock, so none is missed).
                if not self._waiting:
                    self._work.clear()
                return
        self._active = [*self._active, *new]
        started = time.perf_counter()
        old = self._stragglers()
        stepped, extra = self._dispatch(new, old)
        self._complete(stepped, old, extra, time.perf_counter() - started)

    def _dispatch(self, new: list[_Entry[S]], old: list[_Entry[S]]) -> tuple[list[_Entry[S]], list[int]]:
        """Prefill, step and extra steps. Returns the entries that stepped and the extra steps of
        ``old``. A failed step fails exactly this step's sequences; a failed prefill only the
        newcomers (the others stepped on)."""
        batch = self._active
        try:
            prefill_error, extra = self._iterate([e.seq for e in new], [e.seq for e in batch], [e.seq for e in old])
        except Exception as exc:
            self._fail_all(batch, exc)
            return [], [0] * len(old)
        if prefill_error is not None:
            self._fail_all(new, prefill_error)
            batch = [e for e in batch if e not in new]
        return batch, extra

    def _complete(self, stepped: list[_Entry[S]], old: list[_Entry[S]], extra: list[int], seconds: float) -> None:
        """Count the step, answer every sequence that finished (its place goes to the next waiting
        one), keep the rest."""
        if not stepped:
            return
        rows = sum(e.seq.rows for e in stepped)
        self._observer.on_step(rows, len(stepped), seconds)
        now = time.perf_counter()
        for entry, steps in zip(old, extra, strict=True):
            entry.steps += steps
        still, finished = [], []
        for entry in self._active:
            entry.steps += 1
            entry.max_rows = max(entry.max_rows, rows)
            if not entry.seq.done:
                still.append(entry)
            else:
                stats = DecodeStats(entry.admitted - entry.submitted, now - entry.admitted, entry.steps, entry.max_rows)
                finished.append((entry, stats))
        self._active = still
        self._observer.on_active(len(still))
        self._post(finished)

    def _stragglers(self) -> list[_Entry[S]]:
        """The oldest active sequences past ``boost_after`` steps, within ``boost_rows`` rows and a
        quarter of the batch's rows (in a small batch an extra step costs nearly a whole one)."""
        if self.mode != "step" or not self.boost_steps or not self.boost_after:
            return []
        budget = min(self.boost_rows, sum(e.seq.rows for e in self._active) // 4)
        old = sorted((e for e in self._active if e.steps >= self.boost_after), key=lambda e: -e.steps)
        chosen, rows = [], 0
        for entry in old:
            if rows + entry.seq.rows > budget:
                break
            chosen.append(entry)
            rows += entry.seq.rows
        return chosen

    def _iterate(self, new: list[S], batch: list[S], old: list[S]) -> tuple[Exception | None, list[int]]:
        """In the worker thread: prefill the newcomers, step the batch (without the newcomers if
        their prefill failed, whose exception is returned), then the extra steps of ``old``: how
        many each took. An extra step that fails fails the whole iteration, like the step."""
        error = None
        if new:
            try:
                self._prefill(new)
            except Exception as exc:
                error = exc
                failed = {id(s) for s in new}
                batch = [s for s in batch if id(s) not in failed]
        if batch:
            self._step(batch)
        extra = [0] * len(old)
        for _ in range(self.boost_steps if old else 0):
            going = [i for i, s in enumerate(old) if not s.done]
            if not going:
                break
            self._step([old[i] for i in going])
            for i in going:
                extra[i] += 1
        return error, extra

    def _fail_all(self, entries: list[_Entry[S]], exc: BaseException) -> None:
        if not isinstance(exc, ServiceError):
            log.error("decoding %d sequences failed in model %s", len(entries), self.name, exc_info=exc)
            exc = InferenceFailed(f"model {self.name} failed while decoding: {exc}")
        self._post([(entry, exc) for entry in entries])
        self._active = [e for e in self._active if e not in entries]
        self._observer.on_active(len(self._active))

    def _post(self, outcomes: list[tuple[_Entry[S], DecodeStats | BaseException]]) -> None:
        """Hand answers to the event loop, all of one iteration in one call."""
        if not outcomes:
            return
        try:
            self._loop.call_soon_threadsafe(self._settle, outcomes)  # type: ignore[union-attr]
        except RuntimeError:  # the event loop is closed: nobody is left to answer
            pass

    @staticmethod
    def _settle(outcomes: list[tuple[_Entry, DecodeStats | BaseException]]) -> None:
        for entry, outcome in outcomes:
            if entry.future.done():  # its caller left meanwhile
                continue
            if isinstance(outcome, BaseException):
                entry.future.set_exception(outcome)
            else:
                entry.future.set_result(outcome)

    def _admit(self, now: float) -> list[_Entry[S]]:
        """Waiting sequences into the batch, in arrival order, while it stays within ``max_rows``
        and ``max_tokens``, and while each request (``group``) stays within its fair share of rows
        (called with the lock held):
        ``max_rows`` divided among the requests present. A request past its share waits and the
        next request's sequences go ahead of its others; a sequence that does not fit the batch
        stops admission (nobody smaller slips past it, so a large one is never starved)."""
        if self.mode == "request" and self._active:
            return []  # a static batch runs to its end
        if self._active and self._since_admit + 1 < self.admit_every:
            self._since_admit += 1
            return []  # newcomers wait for the next admitting step, to share its prefill
        self._since_admit = 0
        rows = sum(e.seq.rows for e in self._active)
        tokens = sum(e.seq.tokens * e.seq.rows for e in self._active)
        held: dict[object, int] = {}
        for e in self._active:
            held[e.group] = held.get(e.group, 0) + e.seq.rows
        groups = set(held) | set(self._group_rows)
        share = max(1, self.max_rows // max(1, len(groups))) if self.fair else self.max_rows
        new: list[_Entry[S]] = []
        for entry in list(self._waiting):
            need_rows, need_tokens = entry.seq.rows, entry.seq.tokens * entry.seq.rows
            if rows + need_rows > self.max_rows or tokens + need_tokens > self.max_tokens:
                break
            mine = held.get(entry.group, 0)
            if mine and mine + need_rows > share:
                continue  # this request has its share: the next request's turn
            self._dequeue(entry)
            entry.admitted = now
            rows += need_rows
            tokens += need_tokens
            held[entry.group] = mine + need_rows
            new.append(entry)
        if new:
            self._observer.on_queue_depth(len(self._waiting))
        return new

    def _prune(self, now: float) -> None:
        """Drop the sequences whose caller left and fail those past their deadline, waiting or
        decoding (on the decode thread, between steps)."""
        late: list[tuple[_Entry[S], DeadlineExceeded]] = []
        gone = [e for e in self._active if e.future.done() or e.deadline <= now]
        with self._lock:
            gone += [e for e in self._waiting if e.future.done() or e.deadline <= now]
            for entry in gone:
                where = "while decoding" if entry in self._active else "before decoding started"
                if entry in self._active:
                    self._active.remove(entry)
                else:
                    self._withdraw(entry)
                if not entry.future.done():
                    message = (
                        f"request deadline passed {where} in model {self.name} "
                        f"({entry.timeout_s:.3f} s); try a shorter text or fewer new tokens"
                    )
                    late.append((entry, DeadlineExceeded(message)))
        self._post(late)  # before the observer: answers first, whatever a metric does
        if gone:
            self._observer.on_active(len(self._active))

    def _withdraw(self, entry: _Entry[S]) -> None:
        """Take a waiting entry out of the line (called with the lock held); nothing if it is not
        waiting."""
        try:
            self._dequeue(entry)
        except ValueError:
            return
        self._observer.on_queue_depth(len(self._waiting))

    @staticmethod
    def _fail(entry: _Entry, exc: BaseException) -> None:
        """On the event loop only."""
        if not entry.future.done():
            entry.future.set_exception(exc)


async def gather_all(coros: Iterable[Awaitable[Any]]) -> list[Any]:
    """Run every job; if one fails, cancel the rest (their rows leave the batch) and raise."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
