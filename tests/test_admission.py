"""Places held in a queue for requests let in at the door before their size is known
(service.admission): the queue counts them as waiting, a request's own place does not count against
it, and the place is given up when its rows queue, when it ends, or when its ticket is dropped."""

from __future__ import annotations

import asyncio
import gc
import threading

import numpy as np
import pytest

from service.admission import Places, holding
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
    mine, other = batcher.places.hold(), batcher.places.hold()
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
    first, second = sched.places.hold(), sched.places.hold()
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
    with holding(places.hold()):
        assert places.held == 1
    assert places.held == 0
    with pytest.raises(ValueError), holding(places.hold()):
        raise ValueError("the request failed before it reached the queue")
    assert places.held == 0


def test_a_dropped_ticket_gives_its_place_up() -> None:
    places = Places()
    ticket = places.hold()
    ticket.release()
    ticket.release()  # once only
    assert places.held == 0
    places.hold()  # never released by anyone
    gc.collect()
    assert places.held == 0
