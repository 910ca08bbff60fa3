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
import json
import logging
import queue
import sys
import threading
import time
from typing import Any, TextIO

import orjson

from service import tracing

# The request a log line belongs to (set by the request guard, carried into worker threads).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
ACCESS = logging.getLogger("neuroserve.access")
# Bounded so that the writer never holds the GIL for long: formatting a line takes about 10 us.
LINES_PER_WRITE = 64
# How long the writer lets lines gather before it writes: lines reach the log this much later
# (a warning or an error is written at once).
GATHER_S = 0.05
# Lines waiting at most: when the log's reader stalls, further lines are counted and dropped
# rather than held in memory without bound (a line holds a client's path of up to 64 KB).
MAX_QUEUED = 10_000
# The longest path an access-log line keeps.
MAX_PATH_CHARS = 1024


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        if not hasattr(record, "trace_id"):
            trace_id = tracing.current_trace_id()  # None unless tracing is on and a trace is current
            if trace_id is not None:
                record.trace_id = trace_id
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
        return _dumps(entry)

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
        return _dumps(entry)


def _dumps(entry: dict) -> str:
    try:
        return orjson.dumps(entry, default=str).decode()
    except TypeError:  # what orjson cannot write (an integer over 64 bits, a non-string key)
        return json.dumps(entry, default=str)


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
        self.writer.put(record, urgent=record.levelno >= logging.WARNING)


_STOP = object()
_FLUSH = object()


def _dropped_record(count: int) -> logging.LogRecord:
    return logging.makeLogRecord(
        {
            "name": "neuroserve.logs",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": f"{count} log lines dropped: the log's reader fell behind by {MAX_QUEUED} lines",
            "request_id": "-",
        }
    )


class LogWriter(threading.Thread):
    def __init__(self, stream: TextIO, formatter: logging.Formatter) -> None:
        super().__init__(name="log-writer", daemon=True)
        self.stream = stream
        self.formatter = formatter
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.dropped = 0  # lines not queued because MAX_QUEUED were waiting
        self._urgent = threading.Event()
        self._flushed = threading.Condition()
        self._written = 0  # flush marks written so far

    def put(self, item: Any, *, urgent: bool = False) -> None:
        """Queue a record or an access entry; a warning or worse is written without waiting."""
        if self.queue.qsize() >= MAX_QUEUED:
            self.dropped += 1
            return
        self.queue.put(item)
        if urgent:
            self._urgent.set()

    def flush(self, timeout_s: float = 2.0) -> None:
        """Write everything queued so far, and wait (at most ``timeout_s``) until it is written;
        the writer goes on afterwards."""
        with self._flushed:
            target = self._written + 1
            self.queue.put(_FLUSH)
            self._urgent.set()
            self._flushed.wait_for(lambda: self._written >= target, timeout_s)

    def run(self) -> None:
        while True:
            pending = [self.queue.get()]
            # Let lines gather: woken for each one, this thread took the GIL from the event loop
            # once per request (the v2 benchmark lost 10 % of its throughput that way).
            self._urgent.wait(GATHER_S)
            self._urgent.clear()
            while True:
                try:
                    pending.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                pending.insert(0, _dropped_record(dropped))
            for start in range(0, len(pending), LINES_PER_WRITE):
                if self._write(pending[start : start + LINES_PER_WRITE]):
                    return

    def _write(self, batch: list) -> bool:
        """Format and write ``batch``; True when it held the stop mark."""
        lines = []
        stop = False
        flushes = 0
        for item in batch:
            if item is _STOP:
                stop = True
                continue
            if item is _FLUSH:
                flushes += 1
                continue
            try:
                if isinstance(item, logging.LogRecord):
                    lines.append(self.formatter.format(item))
                elif isinstance(self.formatter, JsonFormatter):
                    lines.append(self.formatter.access(*item))
                else:
                    lines.append(self.formatter.format(_access_record(*item)))
            except Exception:  # one unformattable record must not stop the log
                lines.append(f"(unformattable log record: {ascii(str(getattr(item, 'msg', item)))[:200]})")
        if lines:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # the stream is closed (shutdown): nowhere to write
                pass
        if flushes:
            with self._flushed:
                self._written += flushes
                self._flushed.notify_all()
        return stop

    def stop(self, timeout_s: float = 2.0) -> None:
        """Write what is queued, then end."""
        self.queue.put(_STOP)
        self._urgent.set()
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
    if len(path) > MAX_PATH_CHARS:
        path = path[:MAX_PATH_CHARS] + "..."
    if _writer is not None:
        _writer.put((time.time(), level, method, path, status, fields), urgent=level >= logging.WARNING)
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
