"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path).

:class:`RequestGuard` enforces the body-size limit (from Content-Length at once, and while the body
streams in for chunked uploads), records HTTP metrics by route template, and writes an access log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.handlers import error_response
from service.errors import PayloadTooLarge, ServiceError
from service.metrics import Metrics

log = logging.getLogger("neuroserve.access")
_QUIET_PATHS = ("/metrics", "/v2/health/live", "/v2/health/ready")


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        metrics: Metrics,
        access_log: bool = True,
        refuse: Callable[[str, str], ServiceError | None] | None = None,
    ) -> None:
        self.app = app
        # Load shedding before routing: a 429 under overload must cost less than the work it saves.
        self.refuse = refuse
        self.access_log = access_log
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self._series: dict[tuple[str, str, int], tuple] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        limit = self.max_body_bytes

        declared = _content_length(scope)
        if declared is not None and declared > limit:
            response = error_response(PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit}"))
            response.headers["connection"] = "close"
            await response(scope, receive, send)
            self._record(scope, 413, started)
            return

        refusal = self.refuse(scope["method"], scope["path"]) if self.refuse is not None else None
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            self._record(scope, refusal.status_code, started)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        finally:
            self._record(scope, status, started)

    def _record(self, scope: Scope, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope["method"]
        key = (method, template, status)
        series = self._series.get(key)
        if series is None:  # labels() takes a lock and builds a tuple: do it once per series
            series = self._series[key] = (
                self.metrics.http_requests.labels(method, template, str(status)),
                self.metrics.http_latency.labels(method, template),
            )
        series[0].inc()
        series[1].observe(elapsed)
        if status >= 400 or (self.access_log and scope["path"] not in _QUIET_PATHS):
            log.info(
                "%s %s %d",
                method,
                scope["path"],
                status,
                extra={
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "route": template,
                    "client": (scope.get("client") or ("-",))[0],
                },
            )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
