"""Command line: ``neuroserve serve`` (or ``python -m service serve``)."""

from __future__ import annotations

import argparse

from service.api.app import create_app
from service.config import Settings
from service.logs import configure
from service.memory import configure_allocator
from service.server import ConnectionLimits, run


def serve(settings: Settings) -> None:
    configure(settings.log_level, settings.log_json)
    configure_allocator()
    limits = ConnectionLimits(
        keep_alive_s=settings.keep_alive_s,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        max_connections=settings.max_connections,
    )
    run(create_app(settings), host=settings.host, port=settings.port, limits=limits)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="neuroserve", description="Serve the ONNX model repository.")
    sub = parser.add_subparsers(dest="command")
    p_serve = sub.add_parser("serve", help="start the HTTP server (settings from NEUROSERVE_* variables)")
    p_serve.add_argument("--repository", help="model repository folder (NEUROSERVE_REPOSITORY)")
    p_serve.add_argument("--host", help="interface to bind (NEUROSERVE_HOST)")
    p_serve.add_argument("--port", type=int, help="port (NEUROSERVE_PORT)")
    args = parser.parse_args(argv)
    if args.command in (None, "serve"):
        overrides = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
        serve(Settings(**overrides))


if __name__ == "__main__":
    main()
