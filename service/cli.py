"""Command line: ``neuroserve serve`` (or ``python -m service serve``)."""

from __future__ import annotations

import argparse

import uvicorn

from service.api.app import create_app
from service.config import Settings
from service.logs import configure
from service.memory import configure_allocator


def serve(settings: Settings) -> None:
    configure(settings.log_level, settings.log_json)
    configure_allocator()
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
        timeout_keep_alive=30,
    )


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
