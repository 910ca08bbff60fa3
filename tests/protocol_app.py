"""A tiny ASGI app served by the service's own HTTP protocol (``service.server``), for connection
tests that need answers of a chosen size: ``/big`` is ``BIG`` bytes in one write, anything else
"ok". ``python -m tests.protocol_app PORT`` with ``KA`` (keep-alive s) and ``ST`` (send timeout s)."""

from __future__ import annotations

import os
import sys

import uvicorn

from service.server import ConnectionLimits, protocol_class

BIG = int(os.environ.get("BIG", 4_000_000))


async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    body = b"x" * BIG if scope["path"] == "/big" else b"ok"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    limits = ConnectionLimits(
        keep_alive_s=float(os.environ.get("KA", 30)), send_timeout_s=float(os.environ.get("ST", 1))
    )
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        http=protocol_class(limits),  # type: ignore[arg-type]
        log_config=None,
        access_log=False,
        ws="none",
        timeout_keep_alive=int(limits.keep_alive_s),
    )
