"""Places held in a model's waiting line for requests let in before their size is known.

Shedding is decided when a request's headers are in, before its body is read or parsed (a 429
must cost less than the work it saves). But a request let in then reaches the queue only after
it is parsed and tokenised, a millisecond or more later; meanwhile the queue looked as empty to
every other request checked at the door. Each time the decode batch took a few waiting rows,
a burst of requests saw room, went through the whole stack, and all but a few were refused at
the queue after all: at 1,024 connections 4,244 of 38,749 refusals in 10 s were such full-stack
429s (``/metrics``, route ``/v1/translation``), each costing the event loop what a served
request costs before its inference.

So a request let in holds a place (:meth:`Places.hold`, one row or one queued request) from the
door until it reaches the queue, where its place turns into its real rows (:func:`redeem`, when
they are queued: not when they are merely checked, since the sequences of a request queue a loop
turn after their check), or until it ends without queueing. A queue counts the places held as
waiting. The ticket travels in a context variable (:func:`holding`), so neither the queue nor the
route code knows HTTP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar


class Places:
    """The places held in one waiting line (only the event loop's thread touches it)."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0

    def hold(self) -> Ticket:
        self.held += 1
        return Ticket(self)


class Ticket:
    """One held place; released once, by whichever comes first: the queue taking the request
    (:func:`redeem`), the request ending, or the ticket being dropped."""

    __slots__ = ("_places",)

    def __init__(self, places: Places) -> None:
        self._places: Places | None = places

    def holds(self, places: Places) -> bool:
        return self._places is places

    def release(self) -> None:
        places, self._places = self._places, None
        if places is not None:
            places.held -= 1

    def __del__(self) -> None:  # a ticket lost on some unforeseen path must not shrink the line for good
        self.release()


_TICKET: ContextVar[Ticket | None] = ContextVar("neuroserve_ticket", default=None)


@contextlib.contextmanager
def holding(ticket: Ticket | None) -> Iterator[None]:
    """Run the request with its ticket in context; its place is released when it ends."""
    if ticket is None:
        yield
        return
    token = _TICKET.set(ticket)
    try:
        yield
    finally:
        ticket.release()
        _TICKET.reset(token)


def holds(places: Places) -> bool:
    """Whether the calling request holds a place in ``places``."""
    ticket = _TICKET.get()
    return ticket is not None and ticket.holds(places)


def redeem(places: Places) -> None:
    """The calling request reaches the line of ``places``: the place it held there (if any) is
    given up, for its real size to be counted instead."""
    ticket = _TICKET.get()
    if ticket is not None and ticket.holds(places):
        ticket.release()
