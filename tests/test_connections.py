"""Connection limits in the server process itself: what a client can hold without making a
request. Raw sockets to a real server on 127.0.0.1, every limit set to about a second."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import orjson
import pytest

from bench.harness import free_port, neuroserve
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

LIMITS = {
    "NEUROSERVE_KEEP_ALIVE_S": "1",
    "NEUROSERVE_HEADER_TIMEOUT_S": "1",
    "NEUROSERVE_BODY_TIMEOUT_S": "1",
    "NEUROSERVE_SEND_TIMEOUT_S": "1",
    "NEUROSERVE_MAX_HEADER_BYTES": "8192",
    "NEUROSERVE_MAX_HEADERS": "50",
    "NEUROSERVE_MAX_CONNECTIONS": "40",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(ROOT / "models" / "mnist", repo / "mnist")
    with neuroserve(repo, **LIMITS) as running:
        yield running


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def answer(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    started, chunks = time.monotonic(), []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - started


def read_until_dropped(sock: socket.socket, seconds: float = 10) -> bytes:
    """What the server sent before it closed or reset the connection; fails if it keeps it open."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the connection is still open after {len(data)} bytes")
    return data


def test_a_connection_that_never_sends_a_request_is_closed(server) -> None:
    with connect(server) as sock:
        data, seconds = answer(sock)
    assert data == b"" and 0.5 < seconds < 5


def test_headers_sent_slowly_get_408(server) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n")
        time.sleep(0.2)
        sock.sendall(b"X-Slow: 1\r\n")  # and never the blank line
        data, seconds = answer(sock)
    assert data.startswith(b"HTTP/1.1 408") and b'"error_type":"request_timeout"' in data and seconds < 5


def test_empty_lines_dripped_between_requests_do_not_hold_a_connection(server) -> None:
    # The parser skips empty lines before a request line, and every piece of data stopped the idle
    # timer: a client sending "\r\n" every 0.3 s held its connection for ever (a slot of 2,048).
    with connect(server) as sock:
        sock.settimeout(0.3)
        started, data = time.monotonic(), b""
        while time.monotonic() - started < 8:
            try:
                sock.sendall(b"\r\n")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # closed (reset) after the answer
                break
            if not chunk:
                break
            data += chunk
    seconds = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408") and seconds < 5, (data, seconds)


def test_a_declared_body_that_never_comes_gets_408(server) -> None:
    with connect(server) as sock:
        head = b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        sock.sendall(head + b"Content-Length: 30000000\r\n\r\n" + b'{"inputs": [}')
        data, seconds = answer(sock)
    assert data.startswith(b"HTTP/1.1 408") and seconds < 5


def test_a_body_dripped_a_byte_at_a_time_gets_408(server) -> None:
    """Each byte came well within the silence allowed between pieces (1 s here), so a body sent a
    byte every 0.4 s held its connection for ever; now it must average 500 bytes a second after a
    first second of grace."""
    with connect(server) as sock:
        head = b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        sock.sendall(head + b"Content-Length: 100000\r\n\r\n")
        started, data = time.monotonic(), b""
        sock.settimeout(0.4)
        while time.monotonic() - started < 8 and not data:
            try:
                sock.sendall(b" ")
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        seconds = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408") and b"bytes a second" in data, data[:300]
    assert seconds < 4


def stream_chunks(server, head: bytes, most: int = 512 << 20) -> tuple[int, bytes]:
    """``head`` (a chunked request's), then 1 MiB chunks until the server closes or ``most`` are
    sent: how many bytes went, and the answer (empty when the reset lost it)."""
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b"1" * (1 << 20))
    sent = 0
    with connect(server) as sock:
        sock.sendall(head)
        try:
            while sent < most:
                sock.sendall(chunk)
                sent += 1 << 20
        except OSError:  # reset or broken pipe: the server closed
            pass
        try:
            data, _ = answer(sock)
        except ConnectionResetError:
            data = b""
    return sent, data


def test_a_chunked_body_past_the_limit_gets_413_and_the_connection_closes_unread(server) -> None:
    """With no Content-Length the limit is found while reading: the 413 said nothing of the
    connection, and the server read on through whatever the client kept sending."""
    sent, data = stream_chunks(
        server,
        b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
    )
    assert sent < 128 << 20, f"the server read {sent >> 20} MiB past a 32 MiB limit"
    if data:  # the answer may be lost to the reset when the client is still sending
        assert data.startswith(b"HTTP/1.1 413") and b"connection: close" in data.lower()


@pytest.mark.parametrize("path", ["/v2/models/nope/infer", "/v2/health/live"])  # 404; 405 (a GET route)
def test_a_chunked_body_behind_an_early_answer_is_not_read_for_ever(server, path: str) -> None:
    """Answered before its body is read, a request's body was drained to its end, and a chunked
    one has none: 512 MiB behind a 401 were all read. Up to 256 KiB are dropped, then it closes."""
    head = b"POST %s HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n" % path.encode()
    sent, data = stream_chunks(server, head)
    assert sent < 64 << 20, f"the server read {sent >> 20} MiB of a body it had answered"
    if data:
        assert data.split(b" ")[1] in (b"404", b"405")


@pytest.mark.parametrize(
    "headers",
    [b"X-Big: " + b"a" * 20_000 + b"\r\n", b"".join(b"X-%d: 1\r\n" % i for i in range(200))],
    ids=["one huge header", "too many headers"],
)
def test_oversized_headers_get_431(server, headers: bytes) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\n")
        data, _ = answer(sock)
    assert data.startswith(b"HTTP/1.1 431") and b"headers_too_large" in data


def test_connections_beyond_the_cap_are_refused_and_the_server_still_serves(server) -> None:
    held = [connect(server) for _ in range(40)]
    try:
        time.sleep(0.2)
        with connect(server) as extra:
            data, _ = answer(extra)
        assert data.startswith(b"HTTP/1.1 503") and b"too many open connections" in data
        assert b"\r\nretry-after: 1\r\n" in data.lower()  # it will pass by itself
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    status, body, _ = server.request("GET", "/v2/health/live")
    assert status == 200 and body == {"live": True}


def test_a_normal_keep_alive_client_is_unaffected(server) -> None:
    with connect(server) as sock:
        for _ in range(3):
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
            reply = b""
            while not reply.endswith(b'{"live":true}'):
                reply += sock.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200")
            time.sleep(0.3)  # well within the idle limit between requests


def test_a_server_on_loopback_answers_only_to_its_own_names(server) -> None:
    """DNS rebinding: a page on evil.example whose name then resolves to 127.0.0.1 is "same-origin"
    with a keyless server on loopback, and would read every answer. Its Host header gives it away."""
    for method, path in (("GET", "/v2/models"), ("POST", "/v2/models/mnist/infer")):
        with connect(server) as sock:
            head = f"{method} {path} HTTP/1.1\r\nHost: evil.example:{server.port}\r\nContent-Length: 2\r\n"
            sock.sendall(head.encode() + b"Connection: close\r\n\r\n{}")
            data, _ = answer(sock)  # the whole answer: headers and body may come in two pieces
        assert data.startswith(b"HTTP/1.1 400") and b"invalid_host" in data, data[:300]
    for host in ("localhost", f"127.0.0.1:{server.port}", f"[::1]:{server.port}"):
        with connect(server) as sock:
            sock.sendall(f"GET /v2/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data, _ = answer(sock)
        assert data.startswith(b"HTTP/1.1 200"), (host, data[:300])


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v1/sentiment HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: identity\r\n\r\n{}",
        b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n",
        b"POST /v1/sentiment HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    ],
    ids=["transfer-encoding-identity", "header-without-colon", "two-content-lengths"],
)
def test_a_request_the_parser_refuses_gets_the_json_error_shape(server, request_bytes: bytes) -> None:
    # uvicorn answers its parser's refusals in text/plain; a client parsing {"error", "error_type"} broke.
    with connect(server) as sock:
        sock.sendall(request_bytes)
        data, _ = answer(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head
    assert orjson.loads(body)["error_type"] == "invalid_input"
    assert orjson.loads(body)["error"].startswith("malformed HTTP request")
    assert b"x-request-id: " in head  # as every answer


@pytest.mark.parametrize(
    "second",
    [
        b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: identity\r\n\r\n",
        b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n" + b"X-Many: 1\r\n" * 60 + b"\r\n",
        b"GET http://a:b/ HTTP/1.1\r\nHost: localhost\r\n\r\n",  # taken by the parser, not by the URL split
    ],
    ids=["malformed", "too-many-headers", "unsplittable-url"],
)
def test_a_refused_pipelined_request_waits_for_the_answer_owed_before_it(server, second: bytes) -> None:
    """HTTP answers in order: the refusal closed the connection while the request before it ran,
    which was cancelled, and its client read the 400 as that request's answer."""
    body = orjson.dumps(
        {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    )
    first = (
        b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with connect(server) as sock:
        sock.sendall(first + second)  # one read: the second is refused while the first runs
        data, _ = answer(sock)
    answers = data.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 2, data[:400]
    assert answers[0].startswith(b"200") and b'"outputs"' in answers[0]
    assert answers[1].startswith((b"400", b"431")) and b'"error_type"' in answers[1]


def test_a_websocket_upgrade_is_answered_as_plain_http(server) -> None:
    """No route speaks WebSocket: uvicorn's handshake library answered a text/plain 403 instead."""
    with connect(server) as sock:
        sock.sendall(
            b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: close\r\n\r\n"
        )
        data, _ = answer(sock)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'{"live":true}'), data[:300]


def test_a_client_that_stops_reading_its_answers_is_dropped(server) -> None:
    """Nothing timed out a full send buffer: a stream nobody read was held for ever, its rows decoding.
    Here many pipelined requests whose answers the client never reads fill the buffers."""
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n"
    count = 50_000
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    with sock:
        sock.connect(("127.0.0.1", server.port))
        sock.settimeout(3)
        try:
            sock.sendall(request * count)
        except (TimeoutError, OSError):
            pass  # the server stopped reading: it owes answers first
        time.sleep(4)  # past the 1 s send timeout, reading nothing
        data = read_until_dropped(sock)
    assert data.count(b"HTTP/1.1 200") < count


@pytest.mark.parametrize(("trusted", "logged"), [("*", "203.0.113.7"), ("10.9.9.9", "127.0.0.1")])
def test_only_a_trusted_proxy_names_the_client_in_the_log(tmp_path, trusted: str, logged: str) -> None:
    """Behind nginx every access line named nginx: uvicorn trusts X-Forwarded-For from 127.0.0.1 only."""
    shutil.copytree(ROOT / "models" / "mnist", tmp_path / "mnist")
    env = {"NEUROSERVE_FORWARDED_ALLOW_IPS": trusted, "NEUROSERVE_ACCESS_LOG": "true", "NEUROSERVE_LOG_LEVEL": "info"}
    with neuroserve(tmp_path, **env) as proxied, connect(proxied) as sock:
        sock.sendall(
            b"GET /v2/models HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 203.0.113.7\r\n"
            b"X-Request-ID: forwarded-client-check\r\nConnection: close\r\n\r\n"
        )
        data, _ = answer(sock)
        assert data.startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 5
        while "forwarded-client-check" not in proxied.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        (line,) = [line for line in proxied.output().splitlines() if "forwarded-client-check" in line]
    assert f'"client":"{logged}"' in line.replace(" ", ""), line


def test_the_openai_routes_refusals_before_the_application_come_in_openais_shape(server) -> None:
    """An OpenAI client parses {"error": {"message", "type", "code"}}: a 431 or a parser 400 on
    /v1/completions came in the house shape, which it could not read."""
    for request_bytes, status in (
        (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n" + b"X-Many: 1\r\n" * 60 + b"\r\n", b"431"),
        (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: identity\r\n\r\n", b"400"),
    ):
        with connect(server) as sock:
            sock.sendall(request_bytes)
            data, _ = answer(sock)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status), data[:300]
        error = orjson.loads(body)["error"]
        assert error["code"] in ("headers_too_large", "invalid_input") and error["message"], body


@pytest.fixture
def big_answers():
    """A server of the service's protocol (tests/protocol_app.py) whose /big is 4 MB in one write,
    more than the kernel's buffers hold; keep-alive and send timeouts 1 s."""
    port = free_port()
    env = {**os.environ, "KA": "1", "ST": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.protocol_app", str(port)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _small_window(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


def _body_and_length(data: bytes) -> tuple[bytes, int]:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    length = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return body, int(length.split(b":")[1])


def test_a_slow_client_that_keeps_reading_is_not_dropped(big_answers: int) -> None:
    """The send timeout ran from a full buffer until it drained below its mark, and the kernel's
    own buffer hid the progress: a client reading a large answer steadily was cut as if it read nothing."""
    with _small_window(big_answers) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        started = time.monotonic()
        while len(data) < 4_000_000:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            time.sleep(0.01)
        seconds = time.monotonic() - started
    body, length = _body_and_length(data)
    assert len(body) == length and seconds > 1.5, (len(body), length, seconds)


@pytest.mark.parametrize("close", [False, True], ids=["idle-timer-closes", "connection-close"])
def test_a_client_that_reads_nothing_is_dropped_even_once_its_connection_is_closing(big_answers: int, close) -> None:
    """close() waits for the buffer to drain: when the idle timer or Connection: close came first,
    the never-reading client was held for ever (the drop skipped connections already closing)."""
    with _small_window(big_answers) as sock:
        close_header = b"Connection: close\r\n" if close else b""
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: localhost\r\n" + close_header + b"\r\n")
        time.sleep(4)  # reading nothing, past the 1 s timeouts
        data = read_until_dropped(sock)
    body, length = _body_and_length(data)
    assert len(body) < length  # dropped: the rest never came


def test_an_http2_upgrade_offer_is_ignored_and_the_body_and_the_next_request_are_served(server) -> None:
    """curl --http2 and Java's HttpClient offer h2c on plain http; llhttp then skipped the body (400
    "request body is empty") and nothing after it on the connection was answered. The offer is
    ignored, as HTTP allows, even with the header's name split between two sends."""
    body = json.dumps(
        {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    ).encode()
    first = (
        b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    second = b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    split = first.index(b"Upgrade: h2c") + 3  # "\r\nUpg" | "rade: h2c"
    with connect(server) as sock:
        sock.sendall(first[:split])
        time.sleep(0.2)
        sock.sendall(first[split:] + second)
        data, _ = answer(sock)
    answers = data.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 2, data[:600]
    assert answers[0].startswith(b"200") and b'"outputs"' in answers[0], answers[0][:400]
    assert answers[1].startswith(b"200") and answers[1].endswith(b'{"live":true}')


@pytest.mark.parametrize("before", [b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n", b"\r\n\r\n"])
def test_an_upgrade_offer_behind_another_request_or_blank_lines_leaves_the_next_request_answered(
    server, before: bytes
) -> None:
    """A head pipelined behind another in one read (or after empty lines) reached the parser with
    its Upgrade header: what followed it was dropped, and the connection hung until its idle timeout."""
    upgrade = b"GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    last = b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(before + upgrade + last)
        data, seconds = answer(sock)
    answers = data.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == (3 if before.startswith(b"GET") else 2) and seconds < 5, (data[:500], seconds)
    assert answers[-1].startswith(b"200") and answers[-1].endswith(b'{"live":true}')
