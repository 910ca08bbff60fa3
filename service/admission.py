"""Places held in a model's waiting line for requests let in before their size is known.

Shedding is decided when a request's headers are in, before its body is read or parsed (a 429
must cost less than the work it saves). But a request let in then reaches the queue only after
it is parsed and tokenised, a millisecond or more later; meanwhile the queue looked as empty to
every other request checked at the door. Each time the decode batch took a few waiting rows,
a burst of requests saw room, went through the whole stack, and all but a few were refused at
the queue after all: at 1,024 connections 4,244 of 38,749 refusals in 10 s were such full-stack
429s (``/metrics``, route ``/v1/translation``), each costing the event loop what a served
request costs before its inference.

So a request let in gets a :class:`Claim` on a place (one row, or one queued request) in the
queue of each model it may go to (those of its task with room: which one is only known once its
body is parsed, so for those milliseconds it counts as waiting in each). The HTTP protocol
takes the places (:meth:`Claim.take`) as soon as the body is complete, in the same turn of the
event loop as the decision for a body that came with its headers; a body still arriving holds
nothing, so slow uploads cannot fill a queue with places. The places are
given up when the request's rows queue (:func:`redeem`, when they are queued: not when they are
merely checked, since the sequences of a request queue a loop turn after their check), or when
the request ends without queueing. A queue counts the places held as waiting. The claim travels
in a context variable (:func:`holding`), so neither the queue nor the route code knows HTTP.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

SCOPE_KEY = "neuroserve.claim"  # the ASGI scope's entry for a request's claim (the protocol takes it)


class Places:
    """The places held in one waiting line. The event loop holds and releases them; a claim
    dropped without release gives its places up wherever the collector runs, hence the lock."""

    __slots__ = ("_lock", "held")

    def __init__(self) -> None:
        self.held = 0
        self._lock = threading.RLock()  # the collector may release a claim on a thread inside _add

    def _add(self, n: int) -> None:
        with self._lock:
            self.held += n


class Claim:
    """A request's places, one in each of ``places``, from :meth:`take` until :meth:`release`
    (once: a claim released is never taken again)."""

    __slots__ = ("_places", "_state")

    def __init__(self, places: Sequence[Places]) -> None:
        self._places = tuple(places)
        self._state = 0  # 0 not taken, 1 held, 2 released

    def take(self) -> None:
        if self._state == 0:
            self._state = 1
            for places in self._places:
                places._add(1)

    def holds(self, places: Places) -> bool:
        return self._state == 1 and any(p is places for p in self._places)

    def release(self) -> None:
        state, self._state = self._state, 2
        if state == 1:
            for places in self._places:
                places._add(-1)

    def __del__(self) -> None:  # a claim lost on some unforeseen path must not shrink the line for good
        self.release()


_CLAIM: ContextVar[Claim | None] = ContextVar("neuroserve_claim", default=None)


@contextlib.contextmanager
def holding(claim: Claim | None) -> Iterator[None]:
    """Run the request with its claim in context; its places are released when it ends."""
    if claim is None:
        yield
        return
    token = _CLAIM.set(claim)
    try:
        yield
    finally:
        claim.release()
        _CLAIM.reset(token)


def holds(places: Places) -> bool:
    """Whether the calling request holds a place in ``places``."""
    claim = _CLAIM.get()
    return claim is not None and claim.holds(places)


def redeem(places: Places) -> None:
    """The calling request reaches the line of ``places``: the places it held (there, and in the
    lines of the other models it might have gone to) are given up, for its real size to count."""
    claim = _CLAIM.get()
    if claim is not None and claim.holds(places):
        claim.release()
