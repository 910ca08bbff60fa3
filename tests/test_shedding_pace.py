"""The door of the HTTP protocol (service.server.Door): refusals for load are answered at a bounded
rate, the requests beyond it wait unread in arrival order, are let in when their model's queue
makes room first, and never wait past the longest wait. Fakes stand for uvicorn's protocol and the
request guard; time is the event loop's."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pytest

from service.api import middleware
from service.metrics import Metrics
from service.server import Door

pytestmark = pytest.mark.anyio


@dataclass
class FakeTransport:
    closing: bool = False

    def is_closing(self) -> bool:
        return self.closing


@dataclass
class FakeCycle:
    path: str
    name: str
    disconnected: bool = False
    method: str = "POST"

    @property
    def scope(self) -> dict:
        return {"path": self.path, "name": self.name, "method": self.method}


@dataclass
class FakeProtocol:
    loop: asyncio.AbstractEventLoop
    events: list = field(default_factory=list)
    transport: FakeTransport = field(default_factory=FakeTransport)

    def let_in(self, cycle: FakeCycle, app: object) -> None:
        self.events.append(("in", cycle.name, self.loop.time()))

    def refuse(self, cycle: FakeCycle, refusal: object) -> None:
        self.events.append(("429", cycle.name, self.loop.time()))


@dataclass
class FakeRefusal:
    error: object = None


class FakeGuard:
    """Every queue full until ``room`` names requests that find room when decided again; only a
    POST is ever refused for load (as the registry's admission)."""

    def __init__(self) -> None:
        self.room: set[str] = set()
        self.decided: list[str] = []

    def readmit(self, scope: dict, refusal: object) -> object | None:
        self.decided.append(scope["name"])
        if scope["name"] in self.room or scope["method"] != "POST":
            return None
        refusal.error = "overloaded"
        return refusal


def held(door: Door, loop: asyncio.AbstractEventLoop, names: list[str], path: str = "/v1/translation"):
    """Requests held back, each on a connection of its own."""
    events: list = []
    protocols = []
    for name in names:
        protocol = FakeProtocol(loop, events)
        door.hold(protocol, FakeCycle(path, name), app=None, refusal=FakeRefusal(), now=loop.time())
        protocols.append(protocol)
    return events, protocols


async def test_refusals_for_load_are_answered_no_faster_than_the_rate_and_in_arrival_order() -> None:
    loop = asyncio.get_running_loop()
    door = Door(FakeGuard(), per_s=100, max_wait_s=30)
    assert [door.may_answer("/v1/translation", loop.time()) for _ in range(12)] == [True] * 10 + [False] * 2
    names = [f"r{i}" for i in range(40)]
    started = loop.time()
    events, _ = held(door, loop, names)
    await asyncio.sleep(0.2)
    early = [e for e in events if e[0] == "429"]
    # 100 a second, the bucket spent: about 20 in 0.2 s, never more than the rate allows.
    assert 10 <= len(early) <= 0.2 * 100 + 3, len(early)
    await asyncio.sleep(0.4)
    assert [e[1] for e in events] == names  # every one answered, first come first answered
    assert events[-1][2] - started >= (40 - 1) / 100 * 0.9
    assert door.waiting == 0


async def test_a_full_line_asks_whether_there_is_room_once_a_tick_not_once_a_request() -> None:
    loop = asyncio.get_running_loop()
    guard = FakeGuard()
    door = Door(guard, per_s=1000, max_wait_s=30)
    door.may_answer("/v1/translation", loop.time())
    events, _ = held(door, loop, [f"r{i}" for i in range(200)])
    await asyncio.sleep(0.1)
    refused = [e for e in events if e[0] == "429"]
    ticks = 0.1 / Door.TICK_S
    assert len(refused) >= 50  # about 10 a tick
    assert len(guard.decided) <= ticks + 2 < len(refused)  # each refused one has the tick's answer


async def test_the_answer_a_tick_reuses_is_for_the_same_method_only() -> None:
    # /v1/faces takes GET and DELETE as well as POST: behind a POST refused for load they wait in
    # the same line, and are let in (never refused for load), not given the POST's 429.
    loop = asyncio.get_running_loop()
    door = Door(FakeGuard(), per_s=1000, max_wait_s=30)
    events: list = []
    for name, method in (("enroll", "POST"), ("list", "GET"), ("forget", "DELETE"), ("enroll-2", "POST")):
        cycle = FakeCycle("/v1/faces", name, method=method)
        door.hold(FakeProtocol(loop, events), cycle, app=None, refusal=FakeRefusal(), now=loop.time())
    await asyncio.sleep(0.05)
    assert [(kind, name) for kind, name, _ in events] == [
        ("429", "enroll"),
        ("in", "list"),
        ("in", "forget"),
        ("429", "enroll-2"),
    ]


async def test_a_held_request_is_let_in_when_its_queue_makes_room_first() -> None:
    loop = asyncio.get_running_loop()
    guard = FakeGuard()
    door = Door(guard, per_s=4, max_wait_s=30)
    assert door.may_answer("/v1/translation", loop.time())  # the bucket (one) spent; the next in 0.25 s
    events, _ = held(door, loop, ["a", "b", "c"])
    await asyncio.sleep(0.05)
    assert events == []  # no room, no refusal to spare: they wait
    guard.room = {"a", "b"}
    await asyncio.sleep(0.05)
    assert [(kind, name) for kind, name, _ in events] == [("in", "a"), ("in", "b")]
    await asyncio.sleep(0.3)
    assert [(kind, name) for kind, name, _ in events][-1] == ("429", "c")


async def test_no_request_waits_past_the_longest_wait() -> None:
    loop = asyncio.get_running_loop()
    door = Door(FakeGuard(), per_s=1, max_wait_s=0.15)
    door.may_answer("/v1/translation", loop.time())
    started = loop.time()
    events, _ = held(door, loop, [f"r{i}" for i in range(20)])
    await asyncio.sleep(0.3)
    assert len(events) == 20 and {kind for kind, _, _ in events} == {"429"}
    assert all(at - started <= 0.15 + 0.05 for _, _, at in events)


async def test_a_request_whose_client_left_is_dropped_and_the_line_goes_on() -> None:
    loop = asyncio.get_running_loop()
    guard = FakeGuard()
    door = Door(guard, per_s=1000, max_wait_s=30)
    door.tokens = 0
    events, protocols = held(door, loop, ["gone", "closed", "here"])
    protocols[0].transport.closing = True
    protocols[1].transport.closing = True
    await asyncio.sleep(0.05)
    assert [name for _, name, _ in events] == ["here"]
    assert "gone" not in guard.decided  # not decided again, not counted as answered


async def test_each_path_has_its_own_line() -> None:
    loop = asyncio.get_running_loop()
    guard = FakeGuard()
    door = Door(guard, per_s=5, max_wait_s=30)
    door.tokens = 0
    translation, _ = held(door, loop, ["t1", "t2"], path="/v1/translation")
    sentiment, _ = held(door, loop, ["s1"], path="/v1/sentiment")
    assert not door.may_answer("/v1/sentiment", loop.time())  # a line there: a newcomer joins it
    guard.room = {"s1"}  # room for sentiment only: it does not wait behind translation's line
    await asyncio.sleep(0.03)
    assert [(kind, name) for kind, name, _ in sentiment] == [("in", "s1")]
    assert translation == []


@pytest.mark.parametrize("per_s", [0.5, 2000.0])
def test_the_bucket_holds_a_tenth_of_a_seconds_refusals_and_at_least_one(per_s: float) -> None:
    door = Door(FakeGuard(), per_s=per_s, max_wait_s=1)
    assert door.capacity == max(1.0, per_s / 10)


def test_a_flood_of_429s_is_logged_once_a_second_per_route_with_the_count_not_written(monkeypatch, caplog) -> None:
    """Every refusal was a log line (500 a second at 1,024 connections, the log thread holding the
    interpreter lock the decode threads need); /metrics still counts each one."""
    metrics = Metrics()
    guard = middleware.RequestGuard(lambda *a: None, max_body_bytes=1024, metrics=metrics, access_log=False)
    clock = [100.0]
    monkeypatch.setattr(middleware.time, "monotonic", lambda: clock[0])
    scope = {"type": "http", "method": "POST", "path": "/v1/translation", "headers": [], "client": ("127.0.0.1", 1)}
    with caplog.at_level(logging.INFO, logger="neuroserve.access"):
        for _ in range(5):
            guard._record(scope, 429, 0.0)
        clock[0] += 1.5
        guard._record(scope, 429, 0.0)
        guard._record(scope, 400, 0.0)  # other errors are each logged
    lines = [r for r in caplog.records if r.name == "neuroserve.access"]
    assert [r.getMessage().split()[-1] for r in lines] == ["429", "429", "400"]
    assert not hasattr(lines[0], "unlogged_429s") and lines[1].unlogged_429s == 4
    counted = metrics.registry.get_sample_value(
        "neuroserve_http_requests_total", {"method": "POST", "route": "unmatched", "status": "429"}
    )
    assert counted == 6
