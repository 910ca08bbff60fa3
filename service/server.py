"""The HTTP server: uvicorn with httptools, and connection limits in the process itself.

uvicorn bounds a keep-alive connection's idle time after a response, but not a connection that
never sends a request, nor one that sends its headers or body slowly (slowloris), nor the size
and count of headers, nor the number of open connections: a few clients could hold every file
descriptor, or megabytes each, without ever making a request. :class:`GuardedProtocol` (a
subclass of uvicorn's httptools protocol, so the fast C parser stays) adds:

* an idle timeout from the moment a connection opens (as after each response);
* a deadline for a request's line and headers once they begin (``header_timeout_s``), and a
  limit on their bytes and count (``max_header_bytes``, ``max_headers``): 408 / 431, then close;
* a limit on the silence between two pieces of a body (``body_timeout_s``): 408, then close;
* a cap on open connections (``max_connections``): beyond it a new connection gets 503 at once
  and is closed, before it can hold a descriptor for long;
* refusals answered here, before an ASGI task exists (``early``, the request guard's own decision,
  see ``service.api.middleware.EarlyRefusals``): under overload most requests are 429s, and through
  the whole stack each cost the event loop a task, a dozen middleware calls and a response object;
* refusals for load answered at a bounded rate (``shed_per_s``, :class:`Door`): beyond it a request
  waits, in arrival order, and is let in if its task's queues make room first.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import logging
import math
import os
import re
import struct
import termios
from collections import deque
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.admission import SCOPE_KEY as CLAIM
from service.api.handlers import error_body, error_status
from service.errors import HeadersTooLarge, InvalidInput, RequestTimeout, ServiceError, TooManyConnections

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    keep_alive_s: float = 30.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 15.0
    body_min_rate: float = 500.0  # bytes/s a body must average after body_timeout_s of grace (0: none)
    send_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_connections: int = 2048
    shed_per_s: float = 500.0  # refusals for load answered per second at most (0: no limit); see Door
    shed_max_wait_s: float = 2.0
    shed_rest_s: float = 1.0  # a connection refused for load is not read for this long (0: read at once)
    shed_rest_max_s: float = 4.0  # refused again before any request was let in: twice the last rest, up to this

    def rest_after(self, refusals: int) -> float:
        """How long a connection rests after its ``refusals``-th refusal for load in a row (no
        request let in between): ``shed_rest_s``, doubling with each further one up to
        ``shed_rest_max_s``."""
        longest = max(self.shed_rest_s, self.shed_rest_max_s)
        return min(self.shed_rest_s * 2.0 ** min(refusals - 1, 30), longest)


def _reply(transport: asyncio.BaseTransport, error: ServiceError, path: str | None = None) -> None:
    """The whole answer, then close. ``path``: the request's, when known (the OpenAI routes answer
    in OpenAI's error shape, which its client libraries parse)."""
    body = orjson.dumps(error_body(error, path))
    status = error_status(error, path)
    extra = b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in (error.headers or {}).items())
    transport.write(  # type: ignore[attr-defined]
        STATUS_LINE[status]
        + extra
        # Every answer carries an id (README), these too; nothing of the request was read to log it by.
        + b"x-request-id: "
        + os.urandom(16).hex().encode()
        + b"\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    transport.close()


@dataclass(slots=True)
class _Held:
    protocol: GuardedProtocol
    cycle: Any
    app: Any
    refusal: Any  # service.api.middleware.Refusal
    since: float


# An ``Upgrade`` header line (with ``Connection: upgrade``, llhttp then stops at the end of the headers,
# skips the body and hands the rest to the new protocol). No route here speaks another protocol, so
# the offer is ignored, as HTTP allows (RFC 9110 7.8): the header's name is changed, same length,
# before the parser sees it. ``curl --http2`` (h2c) and Java's HttpClient send it; their bodies were
# lost (400 "request body is empty") and requests pipelined behind never answered.
_UPGRADE_LINE = re.compile(rb"\r\nupgrade:", re.IGNORECASE)
_UPGRADE_HOLD = len(b"\r\nupgrade:") - 1  # bytes of a partial head held back: a split header name


class Proxies:
    """The peers trusted as proxies (``NEUROSERVE_FORWARDED_ALLOW_IPS``: addresses, networks, '*')."""

    def __init__(self, allowed: list[str] | str | None) -> None:
        items = [allowed] if isinstance(allowed, str) else list(allowed or [])
        items = [part.strip() for item in items for part in item.split(",") if part.strip()]
        self.anyone = "*" in items
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.names: set[str] = set()
        for item in items:
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.names.add(item)

    def __contains__(self, host: object) -> bool:
        if self.anyone:
            return True
        if not isinstance(host, str):
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host in self.names
        return any(address in network for network in self.networks)


def _through_proxy(scope: dict, proxies: Proxies) -> bool:
    """A request a trusted proxy forwarded: its connection carries other clients' requests too (nginx
    keeps a pool of them), which must not wait out this client's rest. Only from a peer trusted as a
    proxy: any client can send X-Forwarded-For, and with it skipped every rest (a review's probe)."""
    client = scope.get("client")
    if client is None or client[0] not in proxies:
        return False
    return any(name in (b"x-forwarded-for", b"forwarded", b"via") for name, _ in scope["headers"])


DRAIN_BYTES = 256 * 1024  # body bytes dropped after an early answer before the connection is closed


class Door:
    """Refusals for load answered at a bounded rate; the requests beyond it wait for their answer.

    A refusal answered at the door still costs the event loop about 50 us (parsing, the answer,
    its metrics and log line: 19,500 refusals/s on one core, an API-key 401 through the same
    path), and the event loop shares one interpreter lock with the decode threads. Clients that
    retry 100 ms after each 429 come back as fast as they are refused: at 1,024 such connections
    the server answered 6,300 429s/s and served 128 requests/s, against 580/s with 64 clients and
    none refused (the interpreter lock, not the CPU, was the limit both times: a quarter of the 2
    cores stayed idle). So refusals for load beyond ``per_s`` a second (a bucket of a tenth of a
    second's worth) are delayed: such a request waits, undecided, in a line per path, and so does
    every request that comes for that path while the line is not empty (arrival order). Every tick
    (10 ms) each line is decided again from its first request, the paths taken in turn: a request
    whose task's queues have room by then is let in (its model's queue decides as for any other),
    otherwise it is answered 429 while the bucket lasts, or once it has waited ``max_wait_s`` (to
    the tick after). A client that leaves meanwhile is dropped (seen at once unless its body is
    over uvicorn's 64 KiB read-ahead, which pauses reading: then when its turn comes). Refusals for
    anything about the request itself (a key, its rate, a body over the limit) are answered at
    once. The lines are per path: ``/v1/...`` and ``/v2/models/<m>/infer`` to one model are two."""

    TICK_S = 0.01

    def __init__(self, early, per_s: float, max_wait_s: float) -> None:  # type: ignore[no-untyped-def]
        self.early = early
        self.per_s = per_s
        self.capacity = max(1.0, per_s / 10)
        self.max_wait_s = max_wait_s
        self.tokens = self.capacity
        self.stamp: float | None = None
        self.lines: dict[str, deque[_Held]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._turn = 0  # which path's line is decided first at the next tick

    @property
    def waiting(self) -> int:
        return sum(len(line) for line in self.lines.values())

    def queued(self, path: str) -> bool:
        """Whether requests for ``path`` wait: a newcomer waits behind them."""
        return bool(self.lines.get(path))

    def may_answer(self, path: str, now: float) -> bool:
        """Whether a refusal for load on ``path`` may be answered now (spending the bucket)."""
        return not self.lines.get(path) and self._take(now)

    def _take(self, now: float) -> bool:
        if self.stamp is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.per_s)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def hold(self, protocol: GuardedProtocol, cycle, app, refusal, now: float) -> None:  # type: ignore[no-untyped-def]
        # The connection is still read: its body comes in, and a client that leaves is seen.
        self.lines.setdefault(cycle.scope["path"], deque()).append(_Held(protocol, cycle, app, refusal, now))
        if self._timer is None:
            self._timer = protocol.loop.call_later(self.TICK_S, self._tick, protocol.loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        paths = list(self.lines)
        first = self._turn % len(paths) if paths else 0
        self._turn += 1
        for path in paths[first:] + paths[:first]:  # in turn: no path takes the whole bucket each tick
            line = self.lines[path]
            # One "no room" per path, method and tick: the heads after the first refused one get the
            # same answer without asking the registry again (about 36 us a request, py-spy at 512
            # connections); room a decode thread makes meanwhile is seen at the next tick. (Per
            # method, though only POSTs are held today: admission refuses no other method.)
            full: dict[str, ServiceError] = {}
            while line:
                held = line[0]
                if held.protocol.transport.is_closing() or held.cycle.disconnected:
                    line.popleft()  # its client left (or it timed out): nothing to answer
                    continue
                method = held.cycle.scope["method"]
                if method in full:
                    held.refusal.error = full[method]
                    refusal = held.refusal
                else:
                    try:
                        refusal = self.early.readmit(held.cycle.scope, held.refusal)
                    except Exception:  # a bug here must not keep the request waiting forever
                        log.exception("deciding a held-back request again failed; the application answers it")
                        line.popleft()
                        held.protocol.let_in(held.cycle, held.app)
                        continue
                    if refusal is not None:
                        full[method] = refusal.error
                if refusal is None:
                    line.popleft()
                    held.protocol.let_in(held.cycle, held.app)
                elif now - held.since >= self.max_wait_s or self._take(now):
                    line.popleft()
                    held.protocol.refuse(held.cycle, refusal)
                else:
                    break  # the bucket is spent: the rest of the line waits for the next tick
            if not line:
                del self.lines[path]
        if self.lines:
            self._timer = loop.call_later(self.TICK_S, self._tick, loop)


class _Deadlines:
    """The header and body deadlines of every connection, checked by one timer a few times a second.
    A timer per phase (the line, the headers, each piece of a body) cost the event loop three
    timers made and cancelled per request, about 5 % of its time under overload (py-spy, 512
    connections on translation); a deadline is now a number set on the connection, and a request
    that times out is answered up to ``RESOLUTION_S`` late."""

    RESOLUTION_S = 0.25

    def __init__(self, loop: asyncio.AbstractEventLoop, connections: set) -> None:  # type: ignore[type-arg]
        self.loop = loop
        self.connections = connections  # uvicorn's: the open connections' protocols
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(self.RESOLUTION_S, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = self.loop.time()
        for protocol in list(self.connections):
            deadline = getattr(protocol, "_deadline", None)
            if deadline is not None:
                flow = getattr(protocol, "flow", None)
                if flow is not None and flow.read_paused:
                    # The server stopped reading (a pipelined request waits its turn, or a body
                    # buffered ahead of the application): the client is not late, and a prompt
                    # pipelined POST got 408 behind a slow request.
                    protocol._deadline = (now + deadline[2], deadline[1], deadline[2])
                elif now >= deadline[0]:
                    protocol._deadline = None
                    protocol._reject(RequestTimeout(deadline[1]))
            if getattr(protocol, "_stalled", None) is not None:
                protocol._check_stall(now)
        if self.connections:
            self.start()


class GuardedProtocol(HttpToolsProtocol):
    limits = ConnectionLimits()
    early = None  # an EarlyRefusals: answers a request the guard refuses, before the application
    door: Door | None = None  # paces refusals for load (None: each answered at once)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._header_count = 0
        self._dropped = 0  # body bytes dropped after an early answer (see on_body)
        self._rejected = False
        self._deadline: tuple[float, str, float] | None = None  # when this phase times out, why, its length
        deadlines = getattr(self.server_state, "deadlines", None)
        if deadlines is None:
            deadlines = self.server_state.deadlines = _Deadlines(self.loop, self.connections)
        self._deadlines = deadlines
        self._running = None  # the request the application is answering (self.cycle: the newest read)
        self._in_headers = False  # reading a request's line and headers (no cycle of its own yet)
        self._reading_head = True  # no request's headers complete since the last one ended
        self._held = b""  # the end of a partial head, fed with the next data (see _UPGRADE_LINE)
        self._resting: asyncio.TimerHandle | None = None  # reading paused after a 429 for load (see _rest)
        self._refused_in_row = 0  # refusals for load since a request on this connection was last let in
        self._rest_until = 0.0  # when the rest in progress ends (loop time)
        self._close_after = False  # shutting down: close once the request read now is answered
        self._stalled: float | None = None  # when a full send buffer that has not drained times out
        self._stall_size = 0  # its size when last seen shrinking
        self._lost = False
        self._pending: tuple[ServiceError, str | None] | None = None  # a refusal owed after earlier answers
        if len(self.connections) > self.limits.max_connections:
            self._reject(
                TooManyConnections(
                    "the server has too many open connections; retry later", headers={"Retry-After": "1"}
                )
            )
            return
        # No request yet: the same idle limit as between two requests.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._resting is not None:
            self._resting.cancel()
            self._resting = None
        self._stalled = None
        self._cancel_phase()
        # uvicorn tells only self.cycle, the newest request read, that the client is gone; with
        # requests pipelined behind it, that is one not started, and the one running was computed
        # and then written to the closed socket (an error logged, a 200 counted).
        running = self._running
        if running is not None and running is not self.cycle and not running.response_complete:
            running.disconnected = True
            running.message_event.set()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            # Bytes between requests start the header deadline at once: the parser skips empty
            # lines without beginning a request, and each piece of data stops the idle timer, so a
            # client sending "\r\n" every half second held its connection for ever.
            self._arm(self.limits.header_timeout_s, "the request's headers did not arrive in time")
        # uvicorn's data_received, keeping the parser's reason for the 400 (uvicorn drops it).
        self._unset_keepalive_if_required()
        if self._reading_head:
            data = self._without_upgrade(data)
            if not data:
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.send_400_response(str(exc) or "Invalid HTTP request received.")
        except httptools.HttpParserUpgrade as upgrade:
            # An Upgrade header that reached the parser (in a head pipelined behind another in the
            # same read): its request was taken as plain HTTP, and what follows it is read as the
            # next requests (dropped, they were never answered).
            rest = data[upgrade.args[0] :] if upgrade.args else b""
            if rest and not self._rejected:
                self.data_received(rest)

    def _without_upgrade(self, data: bytes) -> bytes:
        """``data`` with any ``Upgrade`` header line of the head it carries renamed; the last bytes of
        a head not yet complete are held back for the next data, in case a header name is split."""
        data, self._held = self._held + data, b""
        start = len(data) - len(data.lstrip(b"\r\n"))  # empty lines before a request are skipped
        end = data.find(b"\r\n\r\n", start)
        head = data if end < 0 else data[: end + 2]
        if _UPGRADE_LINE.search(head):
            data = _UPGRADE_LINE.sub(b"\r\nupgradx:", head) + (b"" if end < 0 else data[end + 2 :])
        if end < 0:
            data, self._held = data[:-_UPGRADE_HOLD], data[-_UPGRADE_HOLD:]
        return data

    # -- a client that stops reading --------------------------------------------------------

    def pause_writing(self) -> None:
        """The socket's send buffer is full: the client reads slower than the answer comes, or not
        at all. A stream of 64 choices whose client never read was held for ever (2.8 MB waiting,
        its rows decoding, and shutdown waiting 30 s for it). While the buffer is over its mark,
        the sweep checks that it shrinks: ``send_timeout_s`` without any of it read, the
        connection is dropped and its request cancelled. A slow reader that reads is never cut."""
        super().pause_writing()
        self._stalled = self.loop.time() + self.limits.send_timeout_s
        self._stall_size = self._unsent()
        self._deadlines.start()

    def resume_writing(self) -> None:
        self._stalled = None
        super().resume_writing()

    def _unread(self) -> int:
        """Bytes the client sent that nobody has read yet (the kernel's receive queue)."""
        sock = self.transport.get_extra_info("socket")
        try:
            return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        except (AttributeError, OSError, ValueError):
            return 0

    def _unsent(self) -> int:
        """Bytes of answers not yet taken by the client: the transport's buffer and the kernel's
        send queue. The kernel's alone held 2.8 MB on loopback: a client reading 375 KB/s took
        7.5 s before the transport's buffer moved at all, and was cut as if it read nothing."""
        size = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                size += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except (OSError, ValueError):  # not Linux, or the socket is gone: the transport's alone
                pass
        return size

    def _check_stall(self, now: float) -> None:
        size = self._unsent()
        if size < self._stall_size:  # the client read some: its time starts again
            self._stall_size = size
            self._stalled = now + self.limits.send_timeout_s
        elif now >= self._stalled:  # type: ignore[operator]
            self._stalled = None
            self._abandon()

    def _abandon(self) -> None:
        if self._lost:
            return
        log.info("dropped a connection whose client read nothing for %.0f s", self.limits.send_timeout_s)
        # Also when closing (an answer with Connection: close, the idle timer, a refusal): close()
        # waits for the buffer to drain, for ever when the client reads nothing.
        self.transport.abort()  # connection_lost follows: the running request sees the client gone

    def send_400_response(self, msg: str) -> None:
        # The parser's refusals (a malformed request line or header, "Transfer-Encoding: identity",
        # both Content-Length and chunked) in the service's one wire shape: uvicorn's own is text/plain.
        if not self._rejected:  # a refusal of ours already answered and closed
            # A callback that raised: uvicorn's URL split (ours raise only after answering).
            reason = "the request target (URL) is not valid" if "callback" in msg else msg.rstrip(".")
            error = InvalidInput(f"malformed HTTP request: {reason}")
            if not self._after_earlier(error):
                self._rejected = True
                self._cancel_phase()
                _reply(self.transport, error, self._path())

    # -- phases ------------------------------------------------------------------------------

    def _arm(self, seconds: float, message: str) -> None:
        self._deadline = (self.loop.time() + seconds, message, seconds)
        self._deadlines.start()

    def _cancel_phase(self) -> None:
        self._deadline = None

    def _path(self) -> str | None:
        """The path of the request being read, as far as it has come ("" before its line)."""
        url = getattr(self, "url", b"")
        return url.split(b"?", 1)[0].decode("latin-1") if url else None

    def _after_earlier(self, error: ServiceError) -> bool:
        """Hold ``error`` back when it answers a pipelined request that earlier ones are still owed
        answers before (HTTP answers in order): the malformed request after a running translation
        closed the connection, the translation was cancelled and the client read the 400 as its
        answer. Reading stops; the refusal is written, and the connection closed, after the last."""
        culprit = None if self._in_headers else self.cycle  # a request whose headers are in has a cycle
        if culprit is None:
            earlier = self.cycle is not None and not self.cycle.response_complete
        else:
            running = self._running
            earlier = (running is not None and running is not culprit and not running.response_complete) or any(
                c is not culprit for c, _ in self.pipeline
            )
        if not earlier:
            return False
        self._rejected = True  # nothing more is read
        self._cancel_phase()
        self._pending = (error, self._path())
        if culprit is not None:  # queued behind the others: it never runs
            self.pipeline = type(self.pipeline)(item for item in self.pipeline if item[0] is not culprit)
            culprit.response_started = culprit.response_complete = True
            culprit.disconnected = True
            culprit.message_event.set()
        return True

    def shutdown(self) -> None:
        """uvicorn closes a connection whose newest request is answered: with a refusal held
        behind a running request, that newest one is the refused one, and the running answer was
        lost. Then the running request ends the connection (the refusal follows it)."""
        if self._resting is not None:
            # A request may wait unread in the socket: closing now would reset it. Read it, answer
            # it, then close (see on_response_complete); with nothing there, close as usual.
            self._resting.cancel()
            self._wake()
            if self._unread():
                self._close_after = True
                return
        if self._pending is not None:
            running = self._running
            if running is not None and not running.response_complete:
                running.keep_alive = False
                return
            if self.pipeline:
                return
        super().shutdown()

    def _flush_pending(self) -> None:
        running = self._running
        if self.pipeline or (running is not None and not running.response_complete):
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # held at the door
        pending, self._pending = self._pending, None
        if pending is not None and not self.transport.is_closing():
            _reply(self.transport, *pending)

    def _reject(self, error: ServiceError) -> None:
        if self._rejected or self.transport.is_closing():
            return
        if self._after_earlier(error):
            return
        self._rejected = True
        self._cancel_phase()
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # the answer has begun: nothing else can be said
        else:
            if self.cycle is not None:
                self.cycle.disconnected = True  # the application sees the client gone
                self.cycle.message_event.set()
            _reply(self.transport, error, self._path())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = self._header_count = self._dropped = 0
        self._arm(self.limits.header_timeout_s, "the request's headers did not arrive in time")

    def on_url(self, url: bytes) -> None:
        self._header_bytes += len(url)
        self._check_headers()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        self._header_count += 1
        self._check_headers()
        super().on_header(name, value)

    def _check_headers(self) -> None:
        if self._header_bytes > self.limits.max_header_bytes or self._header_count > self.limits.max_headers:
            self._reject(
                HeadersTooLarge(
                    f"request headers over the limit ({self.limits.max_headers} headers, "
                    f"{self.limits.max_header_bytes} bytes)"
                )
            )
            raise _Refused

    def on_headers_complete(self) -> None:
        # After uvicorn's: it can still fail here (a request target the parser took but cannot
        # split, "GET http://a:b/"), and that refusal is this request's, behind the earlier ones.
        super().on_headers_complete()
        self._in_headers = self._reading_head = False
        self._body_began, self._body_bytes = self.loop.time(), 0
        self._arm(self.limits.body_timeout_s, "the request's body stopped arriving")

    def _start_asgi_task(self, cycle, app) -> None:  # type: ignore[no-untyped-def]
        """Answer here what the guard refuses; hand the rest to the application as uvicorn does.
        (Called for each request in turn, pipelined ones after the answer before them.)"""
        if self.early is not None:
            door = self.door
            path = cycle.scope["path"]
            behind = door is not None and door.queued(path)
            try:
                refusal = self.early.decide(cycle.scope, defer_shedding=behind)
            except Exception:  # a bug here must not cost the request: the whole stack answers it
                log.exception("answering a refusal early failed; the application answers instead")
                refusal = None
            if refusal is not None:
                if door is not None and refusal.shed and (behind or not door.may_answer(path, self.loop.time())):
                    door.hold(self, cycle, app, refusal, self.loop.time())
                else:
                    self.refuse(cycle, refusal)
                return
            self._claim_if_complete(cycle)
        self._refused_in_row = 0
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def let_in(self, cycle, app) -> None:  # type: ignore[no-untyped-def]
        """A request held at the door goes to the application after all."""
        self._refused_in_row = 0
        self._claim_if_complete(cycle)
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    @staticmethod
    def _claim_if_complete(cycle) -> None:  # type: ignore[no-untyped-def]
        """A request let in takes its places once its body is complete (see service.admission):
        here when it already is (a pipelined request, one held at the door), else when it ends."""
        claim = cycle.scope.get(CLAIM)
        if claim is not None and not cycle.more_body:
            claim.take()

    def refuse(self, cycle, refusal) -> None:  # type: ignore[no-untyped-def]
        """Write the refusal's answer; the request is complete, the connection serves its next one."""
        rest = 0.0
        if refusal.shed and self.limits.shed_rest_s > 0 and not _through_proxy(cycle.scope, self._proxies()):
            self._refused_in_row += 1
            rest = self.limits.rest_after(self._refused_in_row)
            refusal.retry_after_s = math.ceil(rest)  # the answer says how long the connection rests
        try:
            data, close = self._early_answer(cycle, refusal)
        except Exception:  # a bug here must not cost the request: the whole stack answers it
            log.exception("answering a refusal early failed; the application answers instead")
            super()._start_asgi_task(cycle, self.app)
            return
        self.transport.write(data)
        # As uvicorn does for an answer given before the body is read: the rest of the body is
        # dropped as it arrives, and the connection serves its next request.
        cycle.response_started = cycle.response_complete = True
        cycle.message_event.set()
        if close:
            self.transport.close()
        self.on_response_complete()
        if rest and not close:
            self._rest(rest)

    def _proxies(self) -> Proxies:
        proxies = getattr(self.server_state, "proxies", None)
        if proxies is None:
            proxies = self.server_state.proxies = Proxies(getattr(self.config, "forwarded_allow_ips", None))
        return proxies

    def _rest(self, seconds: float) -> None:
        """The connection is not read for ``seconds`` after a 429 for load: the Retry-After it was
        given, kept for it. A client that retries 0.1 s after each 429 came back as fast as it was
        refused, and every refusal cost the event loop (parsing, the answer, its write: about 56 us
        a write on loopback, py-spy), the decode threads' share of the interpreter lock with it;
        its next request now waits in the socket, unread and free, and is answered after. Refused
        again before any request was let in, it rests twice as long, up to ``shed_rest_max_s``
        (:meth:`ConnectionLimits.rest_after`): at 1,024 connections a rest of 1 s still left 500
        refusals a second (the door's rate), one of 3 s 263 (``bench/results/overload-20261205-001448.json``)."""
        if self.transport.is_closing():
            return
        until = self.loop.time() + seconds
        self.flow.pause_reading()
        # Not idle by the client's choice: its retry may wait unread in the socket. The keep-alive
        # timer runs again from the rest's end (a keep-alive shorter than a rest closed the
        # connection with the retry unread: a review's probe, NEUROSERVE_KEEP_ALIVE_S=3).
        self._unset_keepalive_if_required()
        if self._resting is not None:
            if self._rest_until >= until:  # a longer rest already runs (a later refusal's): it stands
                return
            self._resting.cancel()
        self._rest_until = until
        self._resting = self.loop.call_at(until, self._wake)

    def _wake(self) -> None:
        self._resting = None
        if not self.transport.is_closing():
            self.flow.resume_reading()
            idle = self.cycle is None or self.cycle.response_complete
            if self.timeout_keep_alive_task is None and not self.pipeline and idle:
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

    def on_response_complete(self) -> None:
        """uvicorn's, iterative: an early answer completes its request at once and calls this,
        which starts the next pipelined request, which may be answered early too. Recursing, a
        client that pipelined a few hundred refused requests behind a slow one overflowed the stack
        and lost its connection; here each call from within the loop below is one more turn."""
        if getattr(self, "_completing", False):
            self._complete_again = True
            return
        self._completing = True
        try:
            while True:
                self._complete_again = False
                super().on_response_complete()
                if not self._complete_again:
                    break
        finally:
            self._completing = False
        if self._resting is not None and not self.transport.is_closing():
            # uvicorn's on_response_complete resumes reading and arms the keep-alive timer: a
            # refusal answered inside the loop above (a pipelined request behind one let in) set
            # its rest, which that undid.
            self.flow.pause_reading()
            self._unset_keepalive_if_required()
        if self._pending is not None:
            self._flush_pending()
        if self._close_after and not self.transport.is_closing():
            self.transport.close()  # shutting down: the request that waited out its rest is answered

    def _early_answer(self, cycle, refusal) -> tuple[bytes, bool]:  # type: ignore[no-untyped-def]
        """The whole answer's bytes for a refusal, and whether to close."""
        status, headers, body = self.early.render(cycle.scope, refusal)  # type: ignore[union-attr]
        head = [STATUS_LINE[status], *(b"%s: %s\r\n" % pair for pair in cycle.default_headers)]
        head += [b"%s: %s\r\n" % pair for pair in headers]
        # A client that waits for "100 Continue" may never send the body it announced: closing is
        # the only way not to read that body as its next request (RFC 9110, 10.1.1).
        closing = (b"connection", b"close") in headers
        close = closing or not cycle.keep_alive or cycle.waiting_for_100_continue
        if close and not closing:
            head.append(b"connection: close\r\n")
        return b"".join(head) + b"\r\n" + body, close

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        # Each piece buys the next body_timeout_s, but never past the time the bytes so far earn at
        # body_min_rate (after one body_timeout_s of grace), as Apache's mod_reqtimeout does: 3
        # connections sending a byte every 2 s held the server's every connection for good.
        seconds, why = self.limits.body_timeout_s, "the request's body stopped arriving"
        if self.limits.body_min_rate > 0:
            now = self.loop.time()
            earned = self._body_began + self.limits.body_timeout_s + self._body_bytes / self.limits.body_min_rate
            if earned - now < seconds:
                seconds = earned - now
                why = f"the request's body arrived slower than {self.limits.body_min_rate:g} bytes a second"
        if seconds <= 0:
            self._reject(RequestTimeout(why))
            raise _Refused
        self._arm(seconds, why)
        cycle = self.cycle
        if cycle is not None and cycle.response_complete:
            # Answered before its body was read (a refusal, a 401, a 404): the rest is dropped as it
            # comes, for the connection to serve its next request. Up to DRAIN_BYTES, as Go's
            # net/http drains; beyond, close: a chunked body has no end to wait for (512 MiB sent
            # behind a 401 were all read).
            self._dropped += len(body)
            if self._dropped > DRAIN_BYTES:
                if not self.transport.is_closing():
                    self.transport.close()
                return
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._reading_head = True
        self._cancel_phase()
        super().on_message_complete()
        claim = self.cycle.scope.get(CLAIM) if self.cycle is not None else None
        if claim is not None:  # let in, and now its body is complete
            claim.take()


class _Refused(Exception):
    """Stops the parser after a refusal (httptools reports it as a parser error, ignored then)."""


def protocol_class(limits: ConnectionLimits, early=None) -> type[GuardedProtocol]:  # type: ignore[no-untyped-def]
    door = Door(early, limits.shed_per_s, limits.shed_max_wait_s) if early is not None and limits.shed_per_s else None
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits, "early": early, "door": door})


def run(  # type: ignore[no-untyped-def]
    app, *, host: str, port: int, limits: ConnectionLimits, forwarded_allow_ips: list[str] | None = None
) -> None:
    uvicorn.run(
        app,
        host=host,
        port=port,
        # Behind nginx the peer is nginx: the client's address comes from X-Forwarded-For, taken
        # only from these proxies (uvicorn's default: 127.0.0.1).
        forwarded_allow_ips=forwarded_allow_ips or ["127.0.0.1"],
        http=protocol_class(limits, getattr(app.state, "early_refusals", None)),  # type: ignore[arg-type]
        log_config=None,
        access_log=False,
        # No WebSocket route exists: with a WebSocket library installed, an Upgrade got uvicorn's own
        # 403 in text/plain; without one, the header is ignored and the request answered as HTTP.
        ws="none",
        timeout_graceful_shutdown=30,
        timeout_keep_alive=int(limits.keep_alive_s),
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )
