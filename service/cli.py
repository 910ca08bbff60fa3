"""Command line: ``neuroserve serve`` (or ``python -m service serve``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from service.api.app import create_app
from service.api.auth import add_key
from service.api.crossorigin import LOOPBACK_NAMES
from service.config import Settings
from service.logs import LogWriter, configure
from service.memory import configure_allocator
from service.server import ConnectionLimits, run


def serve(settings: Settings) -> None:
    writer = configure(settings.log_level, settings.log_json)
    _write_logs_before_signal_exit(writer)
    configure_allocator()
    if settings.api_keys_file is None and settings.host not in LOOPBACK_NAMES:
        logging.getLogger("neuroserve").warning(
            "serving on %s without API keys: anyone who can reach it can use every model "
            "(set NEUROSERVE_API_KEYS_FILE; create keys with `neuroserve keys add NAME --scope infer`)",
            settings.host,
        )
    if not settings.allowed_hosts and settings.host in LOOPBACK_NAMES:
        # Reachable only from this machine, so only this machine's names: no DNS rebinding.
        settings = settings.model_copy(update={"allowed_hosts": LOOPBACK_NAMES})
    limits = ConnectionLimits(
        keep_alive_s=settings.keep_alive_s,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        body_min_rate=settings.body_min_rate,
        send_timeout_s=settings.send_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        max_connections=settings.max_connections,
        shed_per_s=settings.shed_per_s,
        shed_max_wait_s=settings.shed_max_wait_s,
        shed_rest_s=settings.shed_rest_s,
        shed_rest_max_s=settings.shed_rest_max_s,
    )
    run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        limits=limits,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )


def _write_logs_before_signal_exit(writer: LogWriter) -> None:
    """uvicorn ends a graceful shutdown by raising SIGTERM again under the handler it found, and
    the default handler ends the process without ``atexit``: the log writer's last lines (the
    queues drained, the server finished) would be lost. This handler writes them first. (SIGINT's
    default raises KeyboardInterrupt, and ``atexit`` stops the writer.) As PID 1 in a container
    the default action is ignored and the process goes on, with its writer still running."""

    def write_then_exit(sig: int, _frame: object) -> None:
        writer.flush()
        signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(sig)
        signal.signal(sig, write_then_exit)  # still here (PID 1): the next SIGTERM is handled alike

    signal.signal(signal.SIGTERM, write_then_exit)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="neuroserve", description="Serve the ONNX model repository.")
    sub = parser.add_subparsers(dest="command")
    p_serve = sub.add_parser("serve", help="start the HTTP server (settings from NEUROSERVE_* variables)")
    p_serve.add_argument("--repository", help="model repository folder (NEUROSERVE_REPOSITORY)")
    p_serve.add_argument("--host", help="interface to bind (NEUROSERVE_HOST)")
    p_serve.add_argument("--port", type=int, help="port (NEUROSERVE_PORT)")
    p_keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = p_keys.add_subparsers(dest="keys_command", required=True)
    p_add = keys_sub.add_parser("add", help="make a key: printed once, its hash appended to the keys file")
    p_add.add_argument("name", help="who the key is for (shown in errors and rate headers, never the key)")
    p_add.add_argument("--scope", action="append", choices=["infer", "metrics", "admin"], required=True)
    p_add.add_argument("--requests-per-minute", type=int, default=None)
    p_add.add_argument("--file", type=Path, help="keys file (default: NEUROSERVE_API_KEYS_FILE, else keys.json)")
    args = parser.parse_args(argv)
    try:
        _run(args)
    except ValidationError as exc:
        # pydantic's report names fields and ends in a URL; an operator set NEUROSERVE_* variables.
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "settings"
            print(f"neuroserve: NEUROSERVE_{field.upper()}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args: argparse.Namespace) -> None:
    if args.command == "keys":
        path = args.file or Settings().api_keys_file or Path("keys.json")
        key = add_key(path, args.name, args.scope, args.requests_per_minute)
        print(key)
        print(
            f"added {args.name!r} ({', '.join(args.scope)}) to {path}; the key is shown only this once", file=sys.stderr
        )
        return
    if args.command in (None, "serve"):
        overrides = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
        serve(Settings(**overrides))


if __name__ == "__main__":
    main()
