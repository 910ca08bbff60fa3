"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path).

:class:`RequestGuard` enforces the body-size limit (from Content-Length at once, and while the body
streams in for chunked uploads), records HTTP metrics by route template, and writes an access log.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import admission, tracing
from service.admission import SCOPE_KEY, Claim
from service.api.auth import KeyStore, presented_key, scope_of
from service.api.crossorigin import CrossOriginPolicy, HostAllowlist
from service.api.handlers import error_body, error_response
from service.errors import Overloaded, PayloadTooLarge, ServiceError
from service.logs import REQUEST_ID, log_request
from service.metrics import Metrics

_REQUEST_ID_CHARS = re.compile(r"[A-Za-z0-9._:@/+=-]+")
_QUIET_PATHS = ("/metrics", "/v2/health/live", "/v2/health/ready")


_ASKED = "neuroserve.method"  # scope key: the method the client sent, where it is served as another
_EARLY = "neuroserve.early"  # scope key: the guard's decision, taken by the protocol (see EarlyRefusals)


@dataclass(slots=True)
class Refusal:
    """A request the guard refuses before the application sees it, with what its answer needs."""

    error: ServiceError | None  # None: shedding not decided yet (the protocol holds it back first)
    started: float
    request_id: str
    extra_headers: list[tuple[bytes, bytes]]
    # Set by the protocol for a refusal for load: how long this connection rests, when that is longer
    # than the Retry-After the error carries (see service.server.GuardedProtocol._rest).
    retry_after_s: int | None = None

    @property
    def shed(self) -> bool:
        """Refused for load (every queue of its task full), not for anything about the request
        (an API key over its rate is refused for itself, at once)."""
        return self.error is None or type(self.error) is Overloaded


class EarlyRefusals:
    """The request guard's refusals, for the HTTP protocol to answer before an ASGI task exists.

    A refusal (a 429 when the model's queue is full, above all) answered through the whole stack
    costs a task, a dozen middleware calls and a response object on the event loop; under overload
    the refusals are most of the requests. The server's protocol asks :meth:`decide` once a
    request's headers are in: the guard takes exactly the decision it would take in the stack
    (body limit, key, shedding; once, so a key's rate is counted once) and, when it refuses, the
    protocol writes the answer (:meth:`render`) itself (the body that follows is read and dropped,
    and the connection stays open). Otherwise the decision rides in the scope to the guard, which
    does not take it again. A shed request the protocol holds back may be let in later
    (:meth:`readmit`); ``defer_shedding`` leaves shedding to that (a line waits already). A
    request with an ``Origin`` header gets the CORS headers the stack's ``CORSMiddleware`` would
    add (``cors``: one built with the same arguments), so a browser's requests are paced and
    answered here too (before, they went through the whole stack and took no turn at the door)."""

    def __init__(self) -> None:
        self.guard: RequestGuard | None = None  # set when the middleware stack is built
        self.cors: CORSMiddleware | None = None  # set by create_app when origins are allowed

    def decide(self, scope: Scope, *, defer_shedding: bool = False) -> Refusal | None:
        guard = self.guard
        if guard is None or scope["method"] != "POST":
            return None
        return guard.early(scope, defer_shedding=defer_shedding)

    def readmit(self, scope: Scope, refusal: Refusal) -> Refusal | None:
        """Shedding decided (again) for a request held back: None when it is let in now (its
        claim on places then waits in the scope for the protocol to take)."""
        assert self.guard is not None
        return self.guard.readmit(scope, refusal)

    def render(self, scope: Scope, refusal: Refusal) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """The refusal's status, headers and body; it is recorded (metrics, access log) as answered."""
        assert self.guard is not None
        status, headers, body = self.guard.render(scope, refusal)
        if self.cors is not None:
            headers = _with_cors(self.cors, _header(scope, b"origin"), headers)
        return status, headers, body


def _with_cors(
    cors: CORSMiddleware, origin: str | None, headers: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """What ``CORSMiddleware.send`` adds to a simple (not preflight) request's answer, with its
    own attributes and helpers (tests/test_early_refusals.py compares with the whole stack):
    ``Vary: Origin`` on every answer, the CORS headers for an allowed origin."""
    message: Message = {"type": "http.response.start", "headers": list(headers)}
    out = MutableHeaders(scope=message)
    if origin is not None:
        out.update(cors.simple_headers)
    if origin is not None and (
        (cors.allow_all_origins and cors.allow_credentials)
        or (not cors.allow_all_origins and cors.is_allowed_origin(origin=origin))
    ):
        cors.allow_explicit_origin(out, origin)
    else:
        out["Vary"] = ", ".join([*out.getlist("Vary"), "Origin"])
    return message["headers"]


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        metrics: Metrics,
        access_log: bool = True,
        admit: Callable[[str, str], Claim | ServiceError | None] | None = None,
        keys: KeyStore | None = None,
        fast: Callable[[Scope], ASGIApp | None] | None = None,
        early: EarlyRefusals | None = None,
        cross_origin: CrossOriginPolicy | None = None,
        hosts: HostAllowlist | None = None,
    ) -> None:
        if early is not None:
            early.guard = self
        self.app = app
        # Routes served straight from here, past the inner middleware (see v2.fast_path).
        self.fast = fast
        self.cross_origin = cross_origin  # None: browsers' cross-site POSTs are not checked
        self.hosts = hosts  # None: any Host header
        self.keys = keys  # None: no keys file, every route open (as before keys existed)
        # Load shedding before routing: a 429 under overload must cost less than the work it saves.
        # It answers a refusal (Overloaded), or lets the request in with a claim on places in queues.
        self.admit = admit
        self.access_log = access_log
        self._shed_log: dict[str, list] = {}  # route -> [when its last 429 was logged, 429s not logged since]
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self._series: dict[tuple[str, str, int], tuple] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        decided = scope.pop(_EARLY, None)  # the protocol asked already, and it was not a refusal
        if decided is not None:
            started, request_id, extra_headers, claim = decided
        else:
            claim = None
            started = time.perf_counter()
            request_id = _request_id(scope)
            extra_headers = [(b"x-request-id", request_id.encode())]
        outer_send = send
        head = scope["method"] == "HEAD"
        if head:
            # HEAD is GET without the body (RFC 9110, 9.3.2), for every GET route: monitors and
            # link checkers probe with it, and FastAPI's routes answered 405. A copy, so that the
            # server, which reads its own scope, still leaves the body out.
            scope = {**scope, "method": "GET", _ASKED: "HEAD"}

        async def send(message: Message) -> None:  # every answer, errors included, carries the id
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra_headers]
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await outer_send(message)

        token = REQUEST_ID.set(request_id)
        try:
            if decided is None:
                # The whole stack (no early decision: served without service.server's protocol,
                # as under a test client): the claim's places are never taken, since only the
                # protocol knows when the body is complete.
                refusal, claim = self._refusal(scope, extra_headers)
            else:
                refusal = None
            if refusal is not None:
                response = error_response(refusal, scope["path"])
                if isinstance(refusal, PayloadTooLarge):
                    response.headers["connection"] = "close"
                _answered(refusal)
                await response(scope, receive, send)
                self._record(scope, refusal.status_code, started, request_id)
                return
            with admission.holding(claim):
                await self._serve(scope, receive, send, started, request_id)
        finally:
            REQUEST_ID.reset(token)

    def early(self, scope: Scope, *, defer_shedding: bool = False) -> Refusal | None:
        """:meth:`_refusal` for the protocol (see :class:`EarlyRefusals`): the refusal, else None
        with the decision (and the request's claim, for the protocol to take) left in the scope.
        ``defer_shedding``: a request let in so far is returned as a refusal whose error is None,
        for :meth:`readmit` to decide on load later."""
        started = time.perf_counter()
        request_id = _request_id(scope)
        extra_headers = [(b"x-request-id", request_id.encode())]
        token = REQUEST_ID.set(request_id)
        try:
            refusal, claim = self._refusal(scope, extra_headers, shed=not defer_shedding)
        finally:
            REQUEST_ID.reset(token)
        if refusal is None and defer_shedding:
            return Refusal(None, started, request_id, extra_headers)
        if refusal is None:
            self._let_in(scope, started, request_id, extra_headers, claim)
            return None
        return Refusal(refusal, started, request_id, extra_headers)

    @staticmethod
    def _let_in(
        scope: Scope, started: float, request_id: str, extra_headers: list[tuple[bytes, bytes]], claim: Claim | None
    ) -> None:
        scope[_EARLY] = (started, request_id, extra_headers, claim)
        if claim is not None:
            scope[SCOPE_KEY] = claim

    def readmit(self, scope: Scope, refusal: Refusal) -> Refusal | None:
        """Load shedding alone, again, for a request :meth:`early` refused for load (its key was
        checked and counted then)."""
        assert self.admit is not None
        decision = self.admit(scope["method"], scope["path"])
        if isinstance(decision, ServiceError):
            refusal.error = decision
            return refusal
        self._let_in(scope, refusal.started, refusal.request_id, refusal.extra_headers, decision)
        return None

    def render(self, scope: Scope, refusal: Refusal) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        error = refusal.error
        assert error is not None, "a refusal whose shedding was deferred is decided before it is answered"
        if refusal.retry_after_s is not None and type(error) is Overloaded:
            error = error.later(refusal.retry_after_s)
        body = orjson.dumps(error_body(error, scope["path"]))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (error.headers or {}).items()),
            *refusal.extra_headers,
        ]
        if isinstance(error, PayloadTooLarge):
            headers.append((b"connection", b"close"))
        _answered(error)
        self._record(scope, error.status_code, refusal.started, refusal.request_id)
        return error.status_code, headers, body

    def _refusal(
        self, scope: Scope, extra_headers: list[tuple[bytes, bytes]], *, shed: bool = True
    ) -> tuple[ServiceError | None, Claim | None]:
        """What is refused before the application sees the request: a Host the server does not
        answer to, a declared body over the limit, a browser's cross-site POST from an origin not
        allowed, a missing or wrong key, and
        (``shed``) load shedding; or, when let in, its claim
        on places in queues."""
        if self.hosts is not None:
            wrong_host = self.hosts.refusal(scope["headers"])
            if wrong_host is not None:
                return wrong_host, None
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            return PayloadTooLarge(f"request body of {declared} bytes is over the limit of {self.max_body_bytes}"), None
        if self.cross_origin is not None:
            forged = self.cross_origin.refusal(scope["method"], scope["headers"])
            if forged is not None:
                return forged, None
        if self.keys is not None:
            needed = scope_of(scope["method"], scope["path"])
            if needed is not None:
                try:
                    _, rate = self.keys.authorize(presented_key(scope["headers"]), needed)
                except ServiceError as exc:  # without its traceback: that and this frame form a cycle
                    return exc.with_traceback(None), None
                extra_headers += [(k.lower().encode(), v.encode()) for k, v in rate.items()]
        if self.admit is not None and shed:
            decision = self.admit(scope["method"], scope["path"])
            return (decision, None) if isinstance(decision, ServiceError) else (None, decision)
        return None, None

    async def _serve(self, scope: Scope, receive: Receive, send: Send, started: float, request_id: str) -> None:
        status = 500
        limit = self.max_body_bytes

        received = 0
        over_limit = False

        async def limited_receive() -> Message:
            nonlocal received, over_limit
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over_limit = True
                    raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if over_limit:
                    # A chunked body past the limit: the rest is never read, so the connection
                    # cannot carry another request (it read on through gigabytes before).
                    message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        app = (self.fast(scope) if self.fast is not None else None) or self.app
        if not tracing.enabled():
            try:
                await app(scope, limited_receive, tracking_send)
            finally:
                self._record(scope, status, started, request_id)
            return
        with tracing.server_span(scope["method"], scope["path"], scope["headers"], request_id) as span:
            try:
                await app(scope, limited_receive, tracking_send)
            finally:
                tracing.finish_server_span(span, status, getattr(scope.get("route"), "path", None))
                self._record(scope, status, started, request_id)

    def _record(self, scope: Scope, status: int, started: float, request_id: str = "-") -> None:
        elapsed = time.perf_counter() - started
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope.get(_ASKED) or scope["method"]  # a HEAD is logged and counted as one
        key = (method, template, status)
        series = self._series.get(key)
        if series is None:  # labels() takes a lock and builds a tuple: do it once per series
            series = self._series[key] = (
                self.metrics.http_requests.labels(method, template, str(status)),
                self.metrics.http_latency.labels(method, template),
            )
        series[0].inc()
        series[1].observe(elapsed)
        fields: dict = {}
        failed = (scope.get("state") or {}).get(_STREAM_ERROR)
        if failed is not None:
            fields["stream_error"] = failed.error_type
            fields["stream_error_status"] = failed.status_code
        if status == 429:
            # Under a flood every refusal was a line: 500 a second at 1,024 connections, identical
            # but for ids (43 million a day; the log thread busy 3 % of the time, py-spy). One a
            # second per route, with how many went unwritten; /metrics counts all.
            skipped = self._shed_log.get(template)
            now = time.monotonic()
            if skipped is not None and now - skipped[0] < 1.0:
                skipped[1] += 1
                return
            self._shed_log[template] = [now, 0]
            if skipped and skipped[1]:
                fields["unlogged_429s"] = skipped[1]
        if status >= 400 or failed is not None or (self.access_log and scope["path"] not in _QUIET_PATHS):
            log_request(
                # A 5xx at warning: an operator who logs at warning still sees the server's failures
                # (a 504, a 503), not the clients' mistakes.
                logging.WARNING if max(status, failed.status_code if failed else 0) >= 500 else logging.INFO,
                method,
                scope["path"],
                status,
                {
                    "request_id": request_id,
                    "traceparent": _traceparent(scope),
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "route": template,
                    # from X-Forwarded-For behind a trusted proxy: whatever a client put there
                    "client": str((scope.get("client") or ("-",))[0])[:_MAX_CLIENT_CHARS],
                    **({"trace_id": trace_id} if (trace_id := tracing.current_trace_id()) else {}),
                    **fields,
                },
            )


_STREAM_ERROR = "neuroserve.stream_error"


def stream_failed(scope: Scope, error: ServiceError) -> None:
    """A streamed answer that failed after its 200 was sent (the client got an error event): the
    access line says so, and is written whatever the access-log setting, at warning for a 5xx."""
    scope.setdefault("state", {})[_STREAM_ERROR] = error


def _answered(error: ServiceError) -> None:
    if isinstance(error, Overloaded) and error.on_answer is not None:
        error.on_answer()


# W3C trace context: version 00, a 32-hex trace id, a 16-hex parent id, 2-hex flags (55 characters).
# Anything else is not logged: a 60,000-byte "traceparent" made a 60,237-byte access line.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_MAX_CLIENT_CHARS = 64  # an IPv6 address with a zone is under 64


def _traceparent(scope: Scope) -> str | None:
    value = _header(scope, b"traceparent")
    return value if value is not None and _TRACEPARENT.fullmatch(value) else None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _request_id(scope: Scope) -> str:
    """The client's ``X-Request-ID`` when it is a sane token, else a new one."""
    given = _header(scope, b"x-request-id")
    if given and len(given) <= 128 and _REQUEST_ID_CHARS.fullmatch(given):
        return given
    return _random_ids.next()


class _RandomIds:
    """Ids of 16 random bytes, as uuid4 has, without building a UUID object (3 % of the event loop's
    time at 64 clients, py-spy); random, so that an id tells nobody how many requests came before.
    The bytes come from ``os.urandom`` 4 KiB at a time: one ``getrandom`` call per 256 ids, where a
    call per id took 5.8 % of the loop at 512 connections (py-spy). Used on the event loop only."""

    _BLOCK = 4096

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0

    def next(self) -> str:
        if self._at >= len(self._hex):
            self._hex, self._at = os.urandom(self._BLOCK).hex(), 0
        self._at += 32
        return self._hex[self._at - 32 : self._at]


_random_ids = _RandomIds()
os.register_at_fork(after_in_child=_random_ids.__init__)  # a forked child must not repeat its parent's ids


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
