"""StepScheduler unit tests with a fake model: sequences that emit a fixed number of tokens."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.decoding import StepScheduler
from service.errors import DeadlineExceeded, InferenceFailed, Overloaded, PayloadTooLarge, ShuttingDown
from service.search import Search, new_search

pytestmark = pytest.mark.anyio


class FakeSeq:
    def __init__(self, name: str, length: int, *, src: int = 4, rows: int = 1, poison: bool = False) -> None:
        self.name, self.length, self.src, self._rows, self.poison = name, length, src, rows, poison
        self.out: list[str] = []
        self.prefilled = 0

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def tokens(self) -> int:
        return self.src + len(self.out)

    @property
    def done(self) -> bool:
        return len(self.out) >= self.length


class FakeModel:
    """Records each step's sequences; a step takes ``delay_s``; a poisoned sequence fails its step."""

    def __init__(self, delay_s: float = 0.002, gate: threading.Event | None = None) -> None:
        self.delay_s = delay_s
        self.gate = gate
        self.steps: list[list[str]] = []
        self.prefills: list[list[str]] = []

    def prefill(self, seqs: list[FakeSeq]) -> None:
        self.prefills.append([s.name for s in seqs])
        if any(s.name.startswith("unreadable") for s in seqs):
            raise ValueError("cannot encode")
        for s in seqs:
            s.prefilled += 1

    def step(self, seqs: list[FakeSeq]) -> None:
        if self.gate is not None:
            assert self.gate.wait(10)
        time.sleep(self.delay_s)
        self.steps.append([s.name for s in seqs])
        if any(s.poison for s in seqs):
            raise RuntimeError("poisoned sequence")
        for s in seqs:
            assert s.prefilled == 1, "a sequence stepped before (or without) its prefill"
            s.out.append(f"{s.name}{len(s.out)}")

    def scheduler(self, **kw) -> StepScheduler[FakeSeq]:
        kw.setdefault("max_rows", 64)
        kw.setdefault("max_tokens", 10_000)
        return StepScheduler(self.prefill, self.step, **kw)

    def steps_with(self, name: str) -> list[int]:
        return [i for i, names in enumerate(self.steps) if name in names]


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


async def test_each_sequence_gets_its_own_tokens() -> None:
    model = FakeModel(delay_s=0)
    sched = model.scheduler()
    rng = np.random.default_rng(3)
    seqs = [FakeSeq(f"s{i}-", int(n)) for i, n in enumerate(rng.integers(1, 20, size=40))]
    stats = await asyncio.gather(*(sched.submit(s) for s in seqs))
    for s, st in zip(seqs, stats, strict=True):
        assert s.out == [f"{s.name}{k}" for k in range(s.length)]
        assert st.steps == s.length  # it took part in exactly the steps it needed
    await sched.close()


async def test_short_sequence_joins_a_running_batch_and_leaves_before_the_long_one() -> None:
    model = FakeModel(delay_s=0.003)
    sched = model.scheduler()
    long = FakeSeq("long", 40)
    long_task = asyncio.ensure_future(sched.submit(long))
    await wait_until(lambda: len(long.out) >= 5)
    short = FakeSeq("short", 3)
    short_stats = await sched.submit(short)
    assert not long.done, "the short sequence had to wait for the long one"
    joined = model.steps_with("short")
    assert len(joined) == 3 and joined == list(range(joined[0], joined[0] + 3))
    assert all("long" in model.steps[i] for i in joined)  # it shared the long one's steps
    assert short_stats.max_rows == 2
    await long_task
    assert model.steps[joined[-1] + 1] == ["long"]  # it left the batch as soon as it ended
    # The short one was encoded on its own, when it joined: the long one's prefill is not redone.
    assert model.prefills == [["long"], ["short"]]
    await sched.close()


async def test_with_admit_every_newcomers_join_a_decoding_batch_together_every_k_steps() -> None:
    model = FakeModel(delay_s=0.002)
    sched = model.scheduler(admit_every=4)
    first = FakeSeq("first", 3)
    await sched.submit(first)  # nothing was decoding: it joined at once
    assert model.steps_with("first") == [0, 1, 2]
    long = FakeSeq("long", 60)
    long_task = asyncio.ensure_future(sched.submit(long))
    await wait_until(lambda: len(long.out) >= 2)
    newcomers = [FakeSeq(f"n{i}", 2) for i in range(6)]
    tasks = []
    for seq in newcomers:  # arriving one or two steps apart
        tasks.append(asyncio.ensure_future(sched.submit(seq)))
        await asyncio.sleep(0.003)
    await asyncio.gather(*tasks)
    joined = sorted({model.steps_with(s.name)[0] for s in newcomers})
    long_steps = model.steps_with("long")
    # newcomers joined only at every fourth step of the long one's batch, several to a prefill
    assert all((long_steps.index(step) - long_steps.index(joined[0])) % 4 == 0 for step in joined)
    assert len(joined) < len(newcomers)
    assert any(len(p) > 1 for p in model.prefills)
    await long_task
    await sched.close()


async def test_request_mode_runs_a_static_batch_to_its_end_before_admitting() -> None:
    model = FakeModel(delay_s=0.002)
    sched = model.scheduler(mode="request")
    long = FakeSeq("long", 20)
    long_task = asyncio.ensure_future(sched.submit(long))
    await wait_until(lambda: len(long.out) >= 3)
    short_stats = await sched.submit(FakeSeq("short", 3))
    assert long.done, "request-level batching admitted a sequence into a running batch"
    assert max(model.steps_with("long")) < min(model.steps_with("short"))
    assert short_stats.queue_s > 0
    await long_task
    await sched.close()


async def test_old_sequences_take_extra_steps_alone_in_a_large_batch() -> None:
    model = FakeModel(delay_s=0.001)
    sched = model.scheduler(boost_after=5, boost_steps=2, boost_rows=2)
    old = FakeSeq("old", 40)
    old_task = asyncio.ensure_future(sched.submit(old))
    await wait_until(lambda: len(old.out) >= 6)
    young = [FakeSeq(f"young{i}", 100) for i in range(7)]
    young_tasks = [asyncio.ensure_future(sched.submit(y)) for y in young]
    stats = await old_task
    assert old.out == [f"old{k}" for k in range(40)] and stats.steps == 40
    alone = [i for i, names in enumerate(model.steps) if names == ["old"] and i > model.steps_with("young0")[0]]
    assert alone, "the old sequence never took an extra step"
    # Three tokens per iteration for the old one against one for the young: they lag far behind
    # (once past 5 steps the first young one shares the 2 boosted rows: the oldest go first).
    lengths = sorted(len(y.out) for y in young)
    assert all(n <= (40 - 6) // 3 + 3 for n in lengths[:-1]), lengths
    for t in young_tasks:
        t.cancel()
    await sched.close(drain=False)


async def test_no_extra_steps_in_a_small_batch_or_in_request_mode() -> None:
    for mode in ("step", "request"):
        model = FakeModel(delay_s=0)
        sched = model.scheduler(boost_after=2, boost_steps=2, boost_rows=8, mode=mode)
        await asyncio.gather(sched.submit(FakeSeq("a", 20)), sched.submit(FakeSeq("b", 20)))
        assert all(names == ["a", "b"] for names in model.steps) and len(model.steps) == 20, mode
        await sched.close()


async def test_rows_bound_admits_in_arrival_order_as_sequences_leave() -> None:
    model = FakeModel(delay_s=0.001)
    sched = model.scheduler(max_rows=4)
    seqs = [FakeSeq("a", 6, rows=2), FakeSeq("b", 2, rows=2), FakeSeq("c", 3, rows=1), FakeSeq("d", 2, rows=3)]
    await asyncio.gather(*(sched.submit(s) for s in seqs))
    rows = {s.name: s.rows for s in seqs}
    assert all(sum(rows[n] for n in names) <= 4 for names in model.steps)
    # c must not jump ahead of nothing: a and b fill the batch, c joins when b leaves.
    assert model.steps_with("c")[0] == model.steps_with("b")[-1] + 1
    # d (3 rows) waits for room, and nobody behind it would have been let past.
    assert model.steps_with("d")[0] > model.steps_with("c")[0]


async def test_tokens_bound_limits_the_batch() -> None:
    model = FakeModel(delay_s=0.001)
    sched = model.scheduler(max_tokens=20)
    seqs = [FakeSeq(f"s{i}", 3, src=8) for i in range(5)]  # 9 tokens each at admission
    await asyncio.gather(*(sched.submit(s) for s in seqs))
    assert max(len(names) for names in model.steps) == 2
    with pytest.raises(PayloadTooLarge):  # a sequence that can never fit is refused, not queued forever
        await sched.submit(FakeSeq("huge", 1, src=30))
    await sched.close()


async def test_deadline_mid_decode_removes_the_sequence_and_spares_the_others() -> None:
    model = FakeModel(delay_s=0.005)
    sched = model.scheduler()
    slow = FakeSeq("slow", 1000)
    fine = FakeSeq("fine", 30)
    results = await asyncio.gather(sched.submit(slow, timeout_s=0.1), sched.submit(fine), return_exceptions=True)
    assert isinstance(results[0], DeadlineExceeded) and "while decoding" in str(results[0])
    assert fine.done and not isinstance(results[1], Exception)
    assert 0 < len(slow.out) < 1000
    last_slow = model.steps_with("slow")[-1]
    assert model.steps_with("fine")[-1] > last_slow  # the batch went on without it
    await sched.close()


async def test_deadline_while_waiting() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    sched = model.scheduler(max_rows=1)
    first = asyncio.ensure_future(sched.submit(FakeSeq("first", 2)))
    await wait_until(lambda: sched.active == 1)
    with pytest.raises(DeadlineExceeded):
        await asyncio.gather(sched.submit(FakeSeq("late", 2), timeout_s=0.05), _open_after(gate, 0.2))
    await first
    assert model.steps_with("late") == []
    await sched.close()


async def _open_after(gate: threading.Event, seconds: float) -> None:
    await asyncio.sleep(seconds)
    gate.set()


async def test_failed_step_fails_exactly_its_sequences() -> None:
    model = FakeModel(delay_s=0.002)
    sched = model.scheduler(max_rows=2)
    batch1 = [FakeSeq("ok1", 3), FakeSeq("bad", 3, poison=True)]
    later = FakeSeq("later", 2)
    results = await asyncio.gather(*(sched.submit(s) for s in [*batch1, later]), return_exceptions=True)
    assert isinstance(results[0], InferenceFailed) and isinstance(results[1], InferenceFailed)
    assert not isinstance(results[2], Exception) and later.done  # the loop went on
    await sched.close()


async def test_failed_prefill_fails_only_the_newcomers() -> None:
    model = FakeModel(delay_s=0.002)
    sched = model.scheduler()
    running = FakeSeq("running", 30)
    task = asyncio.ensure_future(sched.submit(running))
    await wait_until(lambda: len(running.out) >= 3)
    with pytest.raises(InferenceFailed):
        await sched.submit(FakeSeq("unreadable", 3))
    await task  # the sequence already decoding was not touched
    assert running.out == [f"running{k}" for k in range(30)]
    await sched.close()


async def test_cancelled_caller_leaves_the_batch() -> None:
    model = FakeModel(delay_s=0.003)
    sched = model.scheduler()
    gone = FakeSeq("gone", 1000)
    stay = FakeSeq("stay", 40)
    gone_task = asyncio.ensure_future(sched.submit(gone))
    stay_task = asyncio.ensure_future(sched.submit(stay))
    await wait_until(lambda: len(gone.out) >= 3)
    gone_task.cancel()
    await stay_task
    assert len(gone.out) < 15  # left within a step or so, not after 1000
    assert sched.active == 0
    await sched.close()


async def test_waiting_line_is_bounded() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    sched = model.scheduler(max_rows=1, max_queue_size=2)
    tasks = [asyncio.ensure_future(sched.submit(FakeSeq("running", 1)))]
    await wait_until(lambda: sched.active == 1)
    tasks += [asyncio.ensure_future(sched.submit(FakeSeq(f"s{i}", 1))) for i in range(2)]
    await wait_until(lambda: sched.waiting == 2)
    with pytest.raises(Overloaded):
        await sched.submit(FakeSeq("extra", 1))
    gate.set()
    await asyncio.gather(*tasks)
    await sched.close()


async def test_close_drains_then_refuses() -> None:
    model = FakeModel(delay_s=0.001)
    sched = model.scheduler(max_rows=2)
    seqs = [FakeSeq(f"s{i}", 5) for i in range(5)]
    tasks = [asyncio.ensure_future(sched.submit(s)) for s in seqs]
    await wait_until(lambda: sched.active > 0)
    await sched.close(drain=True)
    await asyncio.gather(*tasks)
    assert all(s.done for s in seqs)
    with pytest.raises(ShuttingDown):
        await sched.submit(FakeSeq("after", 1))


def _job(beam: int, max_new: int = 5) -> Search:
    return new_search(beam, bos=1, eos=2, max_new_tokens=max_new)


def _lp(rows: list[dict[int, float]], vocab: int = 8) -> np.ndarray:
    out = np.full((len(rows), vocab), np.log(1e-6))
    for i, row in enumerate(rows):
        for tok, p in row.items():
            out[i, tok] = np.log(p)
    return out


def test_beam_search_finds_what_greedy_misses() -> None:
    # Step 1: token 4 (0.6) beats 5 (0.4). After 4 the best is 0.3; after 5 it is EOS at 0.9:
    # greedy says 4 ..., beam 2 finds [5] (0.36) over [4, x] (at most 0.18).
    greedy, beam = _job(1), _job(2)
    greedy.advance(_lp([{4: 0.6, 5: 0.4}]))
    beam.advance(_lp([{4: 0.6, 5: 0.4}]))
    assert greedy.result() == [4] and sorted(b[-1] for b in beam.beams) == [4, 5]
    rows = {4: {6: 0.3, 7: 0.3, 2: 0.1}, 5: {2: 0.9, 6: 0.05}}
    beam.advance(_lp([rows[b[-1]] for b in beam.beams]))
    while not beam.done:
        beam.advance(_lp([{2: 0.5, 6: 0.5} for _ in beam.beams]))
    assert beam.result() == [5]


def test_jobs_stop_at_max_new_tokens_and_at_eos() -> None:
    job = _job(1, max_new=3)
    for _ in range(3):
        assert not job.done
        job.advance(_lp([{6: 0.9}]))
    assert job.done and job.result() == [6, 6, 6]
    ended = _job(1)
    ended.advance(_lp([{2: 0.9}]))
    assert ended.done and ended.result() == []


@pytest.mark.parametrize("fair", [True, False])
async def test_a_heavy_request_cannot_hold_every_row_while_a_light_one_waits(fair: bool) -> None:
    # One request of 20 sequences of 4 rows (beams) each, 10 steps long, in a batch of 16 rows;
    # then a one-row, one-step request. Fair shares admit it as soon as the first heavy sequences
    # leave; arrival order alone makes it wait for all but the last of the heavy ones.
    model = FakeModel(delay_s=0.0005)
    sched = model.scheduler(max_rows=16, max_queue_size=1000, fair=fair)
    heavy_group = object()
    heavy = [FakeSeq(f"h{i}", 10, rows=4) for i in range(20)]
    heavy_tasks = [asyncio.ensure_future(sched.submit(s, group=heavy_group)) for s in heavy]
    await wait_until(lambda: sched.active > 0)
    light = FakeSeq("light", 1)
    await sched.submit(light, group=object())
    first_light_step = model.steps_with("light")[0]
    await asyncio.gather(*heavy_tasks)
    if fair:
        assert first_light_step <= 12, first_light_step
    else:
        assert first_light_step >= 40, first_light_step
    await sched.close()


async def test_the_waiting_line_is_bounded_by_rows_and_a_request_is_refused_whole() -> None:
    model = FakeModel(gate=threading.Event())
    sched = model.scheduler(max_rows=4, max_queue_size=10)
    running = asyncio.ensure_future(sched.submit(FakeSeq("busy", 3, rows=4)))
    await wait_until(lambda: sched.active == 1)
    waiting = [asyncio.ensure_future(sched.submit(FakeSeq(f"w{i}", 1, rows=4))) for i in range(2)]
    await wait_until(lambda: sched.waiting == 2)
    with pytest.raises(Overloaded, match="8 decoder rows waiting ahead of a request of 4"):
        sched.admit(4)  # 8 + 4 > 10: the whole request is refused before any of it queues
    sched.admit(2)
    sched.admit(1)  # waiting requests larger than it do not count against a small one
    model.gate.set()
    await asyncio.gather(running, *waiting)
    await sched.close()


async def test_the_waiting_lines_books_match_the_line_through_admissions_cancellations_and_deadlines() -> None:
    # Admission reads running totals instead of scanning the line; after random traffic (requests
    # of several sequences and beam widths, some cancelled, some timing out, the rest decoded) the
    # totals must equal what a scan of the line gives, at every point and at the end.
    rng = np.random.default_rng(3)
    model = FakeModel(delay_s=0.0005)
    sched = model.scheduler(max_rows=8, max_queue_size=12)  # small: some requests are refused

    def scanned() -> tuple[int, dict[object, int]]:
        groups: dict[object, int] = {}
        for entry in sched._waiting:
            groups[entry.group] = groups.get(entry.group, 0) + entry.seq.rows
        return sum(groups.values()), groups

    tasks = []
    for i in range(60):
        group, width = object(), int(rng.integers(1, 5))
        timeout = 0.01 if rng.random() < 0.2 else None
        for j in range(int(rng.integers(1, 4))):
            seq = FakeSeq(f"r{i}.{j}", int(rng.integers(1, 6)), rows=width)
            tasks.append(asyncio.ensure_future(sched.submit(seq, group=group, timeout_s=timeout)))
        await asyncio.sleep(0)
        if rng.random() < 0.3:
            tasks[int(rng.integers(len(tasks)))].cancel()
        total, groups = scanned()
        assert sched.waiting_rows == total and sched._group_rows == groups
        for rows in (1, 2, 4, 8):
            ahead = sum(r for r in groups.values() if r <= rows)
            refused = bool(ahead and ahead + rows > 12) or bool(total and total + rows > 48)
            assert (sched._ahead(rows) is not None) == refused
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert any(isinstance(o, Overloaded) for o in outcomes) and any(not isinstance(o, Exception) for o in outcomes)
    assert sched.waiting_rows == 0 and not sched._group_rows and not sched._size_rows
    await sched.close()


async def test_decoding_goes_on_while_the_event_loop_is_busy() -> None:
    # The decode loop runs on its own thread: a step never waits for the event loop, so a loop
    # busy answering other requests (here: blocked outright for 0.3 s) does not stall decoding.
    model = FakeModel(delay_s=0.002)
    sched = model.scheduler()
    seq = FakeSeq("long", 10_000)
    task = asyncio.ensure_future(sched.submit(seq))
    await wait_until(lambda: len(seq.out) >= 2)
    before = len(seq.out)
    time.sleep(0.3)  # the event loop does nothing else for 0.3 s
    during = len(seq.out) - before
    assert during >= 30, f"only {during} steps while the event loop was busy"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await wait_until(lambda: sched.active == 0)
    await sched.close()


class RecordingObserver:
    def __init__(self) -> None:
        self.depth, self.active = 0, 0

    def on_queue_depth(self, depth: int) -> None:
        self.depth = depth

    def on_step(self, rows: int, sequences: int, seconds: float) -> None:
        self.active = sequences

    def on_active(self, sequences: int) -> None:
        self.active = sequences


async def test_the_gauges_return_to_zero_after_a_failed_step_and_after_close() -> None:
    observer = RecordingObserver()
    model = FakeModel(delay_s=0.001)
    sched = model.scheduler(observer=observer)
    with pytest.raises(InferenceFailed):
        await sched.submit(FakeSeq("bad", 5, poison=True))
    await wait_until(lambda: observer.active == 0 and observer.depth == 0)
    gate = threading.Event()
    blocked = FakeModel(gate=gate)
    sched2 = blocked.scheduler(observer=observer, max_rows=1)
    tasks = [asyncio.ensure_future(sched2.submit(FakeSeq(f"s{i}", 3))) for i in range(3)]
    await wait_until(lambda: sched2.active == 1 and sched2.waiting == 2)
    gate.set()
    await sched2.close(drain=False)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert (observer.active, observer.depth) == (0, 0)
    await sched.close()


def test_a_sequence_from_another_event_loop_is_refused_before_it_queues() -> None:
    model = FakeModel()
    sched = model.scheduler()

    async def one(name: str) -> None:
        await sched.submit(FakeSeq(name, 2))

    asyncio.run(one("first"))  # the scheduler now answers on that (closed) loop
    with pytest.raises(RuntimeError, match="another event loop"):
        asyncio.run(one("second"))
    assert sched.waiting == 0 and sched.active == 0
