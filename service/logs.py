"""Structured logs: one JSON object per line (or one escaped plain line), with whatever ``extra``
fields the caller gave, written by a thread of their own.

Formatting a record and a flushed ``write`` per request on the event loop took 12 % of its time at
64 clients on 2 cores (py-spy, the v2 MNIST benchmark), time every request waited through. So
:func:`configure` puts a handler on the root logger that only queues each record, and
:class:`LogWriter` formats and writes them on its own thread, up to :data:`LINES_PER_WRITE` lines
per write. The access log does even less on the loop: :func:`log_request` queues a tuple, and the
record is built on the writer's thread.
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import queue
import sys
import threading
import time
from typing import Any, TextIO

import orjson

# The request a log line belongs to (set by the request guard, carried into worker threads).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
ACCESS = logging.getLogger("neuroserve.access")
# Bounded so that the writer never holds the GIL for long: formatting a line takes about 10 us.
LINES_PER_WRITE = 64
# How long the writer lets lines gather before it writes: lines reach the log this much later.
GATHER_S = 0.05


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()

    def access(self, created: float, level: int, method: str, path: str, status: int, fields: dict) -> str:
        """The line :meth:`format` would write for this access-log entry, without building a
        LogRecord for it (a third of the writer's time per line)."""
        entry = {
            "ts": _timestamp(created),
            "level": logging.getLevelName(level).lower(),
            "logger": ACCESS.name,
            "message": f"{method} {path} {status}",
            **fields,
        }
        return orjson.dumps(entry, default=str).decode()


class PlainFormatter(logging.Formatter):
    """One line per record: control characters in the message (a path a client chose, say) are
    escaped, so nobody can forge a log line; tracebacks keep their own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        return line.encode("unicode_escape").decode("ascii") if not line.isprintable() else line


class _Enqueue(logging.Handler):
    """The root logger's handler: resolves what the caller's thread must (the request id, the
    message's arguments, which may change later) and queues the record for the writer."""

    def __init__(self, writer: LogWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.message = record.getMessage()
        except Exception:  # a bad format string is logging's problem, not the caller's
            self.handleError(record)
            return
        record.msg, record.args = record.message, None
        self.writer.queue.put(record)


_STOP = object()


class LogWriter(threading.Thread):
    def __init__(self, stream: TextIO, formatter: logging.Formatter) -> None:
        super().__init__(name="log-writer", daemon=True)
        self.stream = stream
        self.formatter = formatter
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._filter = RequestIdFilter()

    def run(self) -> None:
        while True:
            pending = [self.queue.get()]
            # Let lines gather: woken for each one, this thread took the GIL from the event loop
            # once per request (the v2 benchmark lost 10 % of its throughput that way).
            time.sleep(GATHER_S)
            while True:
                try:
                    pending.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            for start in range(0, len(pending), LINES_PER_WRITE):
                if self._write(pending[start : start + LINES_PER_WRITE]):
                    return

    def _write(self, batch: list) -> bool:
        """Format and write ``batch``; True when it held the stop mark."""
        lines = []
        stop = False
        for item in batch:
            if item is _STOP:
                stop = True
                continue
            try:
                if isinstance(item, logging.LogRecord):
                    lines.append(self.formatter.format(item))
                elif isinstance(self.formatter, JsonFormatter):
                    lines.append(self.formatter.access(*item))
                else:
                    lines.append(self.formatter.format(_access_record(*item)))
            except Exception:  # one unformattable record must not stop the log
                lines.append(f"(unformattable log record {item!r:.200})")
        if lines:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # the stream is closed (shutdown): nowhere to write
                pass
        return stop

    def stop(self, timeout_s: float = 2.0) -> None:
        """Write what is queued, then end."""
        self.queue.put(_STOP)
        self.join(timeout_s)


def _access_record(created: float, level: int, method: str, path: str, status: int, fields: dict) -> logging.LogRecord:
    record = ACCESS.makeRecord(ACCESS.name, level, __file__, 0, "%s %s %d", (method, path, status), None, extra=fields)
    record.created, record.msecs = created, (created % 1) * 1000
    return record


_writer: LogWriter | None = None


def log_request(level: int, method: str, path: str, status: int, fields: dict) -> None:
    """One access-log line (``fields`` holds ``request_id`` and the rest): a tuple on the writer's
    queue when :func:`configure` has set it up, else an ordinary record (tests, embedding)."""
    if not ACCESS.isEnabledFor(level):
        return
    if _writer is not None:
        _writer.queue.put((time.time(), level, method, path, status, fields))
    else:
        ACCESS.log(level, "%s %s %d", method, path, status, extra=fields)


def configure(level: str, json_lines: bool, stream: TextIO | None = None) -> LogWriter:
    global _writer
    if _writer is not None:
        _writer.stop()
    if json_lines:
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = PlainFormatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
    writer = LogWriter(stream or sys.stderr, formatter)
    writer.start()
    handler = _Enqueue(writer)
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our middleware logs each request
    _writer = writer
    atexit.register(writer.stop)
    return writer
