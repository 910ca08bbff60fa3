"""Places held in a queue for requests let in at the door before their size is known
(service.admission): the queue counts them as waiting, a request's own place does not count against
it, and the places are given up when its rows queue (in every queue it had a place in), when it
ends, or when its claim is dropped."""

from __future__ import annotations

import asyncio
import gc
import threading

import numpy as np
import pytest

from service.admission import Claim, Places, holding
from service.batching import DynamicBatcher
from service.errors import Overloaded
from tests.test_batching import Recorder, wait_until
from tests.test_decoding import FakeModel, FakeSeq

pytestmark = pytest.mark.anyio


async def test_places_held_fill_a_batchers_queue_and_the_holder_gets_in() -> None:
    gate = threading.Event()
    batcher = DynamicBatcher(Recorder(gate=gate), max_batch_size=1, max_queue_size=2)
    running = asyncio.ensure_future(batcher.submit([np.ones(3)]))
    await wait_until(lambda: batcher.queue_depth == 0)  # taken into a batch, blocked on the gate
    mine, other = Claim([batcher.places]), Claim([batcher.places])
    assert not batcher.saturated  # a claim not yet taken (its body still coming) holds nothing
    mine.take()
    other.take()
    assert batcher.saturated  # two requests on their way fill a queue of two
    with pytest.raises(Overloaded, match="0 requests queued and 2 on their way"):
        await batcher.submit([np.ones(3)])  # a request that holds no place
    other.release()

    async def holder() -> object:
        with holding(mine):
            return await batcher.submit([np.full(3, 2.0)])

    held = asyncio.ensure_future(holder())
    await wait_until(lambda: batcher.queue_depth == 1)
    assert batcher.places.held == 0  # its place became its entry in the queue
    gate.set()
    assert (await held).outputs[0].tolist() == [7.0, 7.0, 7.0]
    await running
    await batcher.close()


async def test_a_decoder_counts_places_as_one_row_waiting_but_not_the_askers_own() -> None:
    model = FakeModel(gate=threading.Event())
    sched = model.scheduler(max_rows=1, max_queue_size=2)
    busy = asyncio.ensure_future(sched.submit(FakeSeq("busy", 2)))
    await wait_until(lambda: sched.active == 1)
    first, second = Claim([sched.places]), Claim([sched.places])
    first.take()
    second.take()
    assert sched.saturated
    with pytest.raises(Overloaded):
        sched.admit(1)  # no place of its own: two ahead of it, and the line holds two
    with holding(first):
        sched.admit(1)  # its own place is not ahead of it
        assert sched.places.held == 2  # checked only: the place is kept until its rows queue
        job = asyncio.ensure_future(sched.submit(FakeSeq("mine", 1), admitted=True))
        await wait_until(lambda: sched.waiting == 1)
    assert sched.places.held == 1 and sched.waiting_rows == 1
    second.release()
    model.gate.set()
    await asyncio.gather(busy, job)
    await sched.close()


async def test_a_place_is_given_up_when_its_request_ends_without_queueing() -> None:
    places = Places()
    claim = Claim([places])
    with holding(claim):
        claim.take()
        assert places.held == 1
    assert places.held == 0
    claim.take()  # released once: never taken again
    assert places.held == 0
    failing = Claim([places])
    with pytest.raises(ValueError), holding(failing):
        failing.take()
        raise ValueError("the request failed before it reached the queue")
    assert places.held == 0


async def test_reaching_one_queue_gives_up_the_places_in_the_others() -> None:
    english, chinese = Places(), Places()
    batcher = DynamicBatcher(Recorder(), max_batch_size=4, max_queue_size=4)
    claim = Claim([english, batcher.places, chinese])
    claim.take()
    assert (english.held, batcher.places.held, chinese.held) == (1, 1, 1)
    with holding(claim):
        await batcher.submit([np.ones(2)])
    assert (english.held, batcher.places.held, chinese.held) == (0, 0, 0)
    await batcher.close()


def test_a_dropped_claim_gives_its_places_up() -> None:
    places = Places()
    claim = Claim([places])
    claim.take()
    claim.release()
    claim.release()  # once only
    assert places.held == 0
    Claim([places]).take()  # never released by anyone
    gc.collect()
    assert places.held == 0


def test_a_connection_refused_again_and_again_rests_1_2_4_seconds_and_is_told_so() -> None:
    from service.server import ConnectionLimits

    limits = ConnectionLimits(shed_rest_s=1.0, shed_rest_max_s=4.0)
    assert [limits.rest_after(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert ConnectionLimits(shed_rest_s=1.0, shed_rest_max_s=0.0).rest_after(3) == 1.0  # no growth
    assert ConnectionLimits(shed_rest_s=0.5, shed_rest_max_s=4.0).rest_after(10**6) == 4.0
    counted = []
    refused = Overloaded("every model of task 'x' has a full queue; retry after 1 s", headers={"Retry-After": "1"})
    refused.on_answer = lambda: counted.append(1)
    later = refused.later(4)
    assert later.message == "every model of task 'x' has a full queue; retry after 4 s"
    assert later.headers["Retry-After"] == "4" and refused.headers["Retry-After"] == "1"
    later.on_answer()
    assert counted == [1]  # still counted as its model's refusal
    assert refused.later(1) is refused  # never shorter than it says
    assert Overloaded("model m has a full queue").later(2).message == "model m has a full queue; retry after 2 s"
