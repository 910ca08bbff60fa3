"""Settings: the only module that reads the environment.

Every setting can be given as ``NEUROSERVE_<NAME>`` (e.g. ``NEUROSERVE_MAX_BATCH_SIZE=1``) or in a
``.env`` file. ``create_app(settings)`` takes an instance, so tests build their own and nothing is
read at import time.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEUROSERVE_", env_file=".env", extra="ignore")

    # Where and how to listen.
    repository: Path = Field(Path("models"), description="Model repository root.")
    host: str = Field("127.0.0.1", description="Interface to bind (0.0.0.0 in containers).")
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = Field(True, description="One JSON object per log line (false: plain text).")
    access_log: bool = Field(True, description="Log every request (errors are always logged).")
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1"],
        description="Proxies whose X-Forwarded-For names the client in the logs (a JSON list or comma-separated "
        "addresses or networks; '*': any, for a server only its proxy can reach).",
    )

    # Clients on the web: who may call, from which origins.
    api_keys_file: Path | None = Field(
        None,
        description="JSON list of API keys' hashes and scopes (neuroserve keys add); unset: every route is open.",
    )
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins browsers may call from (a JSON list or comma-separated; empty: no cross-origin access).",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host header names accepted (a JSON list or comma-separated; '.example.com' takes its "
        "subdomains too; '*': any). Empty: `neuroserve serve` bound to loopback takes only localhost, "
        "127.0.0.1 and ::1 (a page on another site cannot reach it by DNS rebinding); bound elsewhere, any.",
    )
    cross_origin_protection: bool = Field(
        True,
        description="Refuse a browser's POST or DELETE from another site unless its origin is in "
        "cors_allow_origins: a form or text/plain POST needs no CORS preflight, so CORS alone does not stop it.",
    )
    cors_max_age_s: int = Field(600, ge=0, description="How long a browser may cache a CORS preflight answer.")
    gzip_min_bytes: int = Field(
        1024, ge=0, description="JSON answers at least this large are gzip-compressed for clients that accept it."
    )

    # Connections (service/server.py): what one client can hold without making a request.
    keep_alive_s: float = Field(30.0, gt=0, description="Idle time a connection may stay open without a request.")
    header_timeout_s: float = Field(10.0, gt=0, description="Time for a request's line and headers, once begun (408).")
    body_timeout_s: float = Field(15.0, gt=0, description="Longest silence between two pieces of a request body (408).")
    body_min_rate: float = Field(
        500.0,
        ge=0,
        description="Bytes per second a request body must average once begun, after a first body_timeout_s of grace "
        "(408): a byte every few seconds held a connection for ever. 0: no floor.",
    )
    send_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest time an answer may wait for a client that takes none of it (a full send buffer "
        "and nothing read from it or the kernel's queue): then the connection is dropped and its request "
        "cancelled. A slow client that keeps reading is never cut.",
    )
    max_header_bytes: int = Field(65536, ge=1024, description="Bytes of a request's line and headers (431 beyond).")
    max_headers: int = Field(100, ge=8, description="Headers per request (431 beyond).")
    max_connections: int = Field(
        2048, ge=1, description="Open connections; beyond, a new one gets 503 and is closed at once."
    )
    shed_per_s: float = Field(
        500.0,
        ge=0,
        description="Requests refused for load (429 before they are read) answered per second at most; beyond, "
        "they wait unread, in arrival order, and are let in if their model's queue makes room first "
        "(0: no limit).",
    )
    shed_max_wait_s: float = Field(
        2.0, gt=0, description="Longest a request held back that way waits for its answer (429 once it is over)."
    )
    shed_rest_s: float = Field(
        1.0,
        ge=0,
        description="After a 429 for load, the connection is not read for this long (its Retry-After): a client "
        "that retries sooner waits for its answer instead of being refused again (0: read at once).",
    )
    shed_rest_max_s: float = Field(
        4.0,
        ge=0,
        description="A connection refused for load again before any of its requests was let in rests twice as "
        "long as the last time, up to this (its Retry-After says so): at 1,024 clients that retry 0.1 s after "
        "a 429, rests of 3 s halved the refusals (500 to 263 a second) and took goodput from 86-88 % to 92-93 % "
        "of saturation. At most NEUROSERVE_SHED_REST_S: no growth.",
    )

    # Model control (Triton's modes): none, the repository as found at start; explicit, also
    # POST /v2/repository/models/{name}/load and /unload; poll, the repository watched for changes.
    model_control: Literal["none", "explicit", "poll"] = Field(
        "none",
        description="none: the models found at start; explicit: also load/unload requests "
        "(/v2/repository/models/{name}/load, /unload; the admin scope where keys are configured); poll: the "
        "repository is watched, new or changed model folders (re)load and removed ones unload.",
    )
    model_poll_interval_s: float = Field(
        5.0, gt=0, description="poll: how often the repository is read; a change loads once it held for an interval."
    )

    # Tracing (service/tracing.py).
    otel_exporter: Literal["none", "otlp", "console", "provider"] = Field(
        "none",
        description="Where OpenTelemetry spans go: none (off), otlp (OTLP over HTTP; the tracing extra), console, "
        "or provider (the tracer provider the process already has).",
    )
    otel_endpoint: str | None = Field(
        None, description="otlp: the collector's traces URL (else the standard OTEL_EXPORTER_OTLP_* variables)."
    )
    otel_service_name: str = Field("neuroserve", description="The service.name of the spans.")

    # onnxruntime.
    providers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROVIDERS),
        description="Execution providers in order of preference; those the installed onnxruntime lacks are skipped.",
    )
    intra_op_threads: int | None = Field(
        None,
        ge=0,
        description="Threads inside one operator. Unset: one per CPU core less the one the event loop needs "
        "(at least 1); 0: onnxruntime's own default (a thread per physical core).",
    )
    inter_op_threads: int = Field(1, ge=0, description="Threads across operators (sequential execution).")
    intra_op_spinning: bool = Field(
        True,
        description="onnxruntime's intra-op threads spin while they wait for work (its default). Off, an idle "
        "thread sleeps: less CPU taken from the event loop and the decode threads between operators, a little "
        "more latency to wake it.",
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    cpu_memory_arena: Literal["shared", "per-model", "off"] = Field(
        "shared",
        description="onnxruntime's CPU memory arena: one for all models (shared), one per model session "
        "(onnxruntime's default), or none (buffers allocated and freed per run: smallest, slowest).",
    )
    model_instances: int = Field(1, ge=1, description="Batches one model may run at the same time.")

    # Dynamic batching defaults; a model's model.json may override them.
    max_batch_size: int | None = Field(
        None, ge=1, description="Force this max batch size on every model (1 turns batching off)."
    )
    max_queue_delay_ms: float | None = Field(
        None, ge=0, description="Force this queue delay on every model (default: each model.json's, else 0)."
    )
    max_queue_size: int = Field(
        256,
        ge=1,
        description="Requests waiting per model before new ones get 429 (for a decoding model: decoder rows, a "
        "beam of 5 counting 5, and a request is admitted or refused whole).",
    )
    request_timeout_ms: float = Field(10_000, gt=0, description="Deadline for a request to start running.")
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 429 and 503 answers.")

    # The face gallery (POST /v1/faces): enrolled vectors, never images. Replicas that open one file
    # (a shared volume on one host) share one gallery.
    gallery_path: Path = Field(
        Path("data/gallery.sqlite3"), description="SQLite file of the face gallery (created on first use)."
    )
    max_gallery_matches: int = Field(100, ge=1, description="Most matches one identification may ask for.")

    # Limits on what clients send.
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest request body.")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest single image file.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest image in pixels (decompression bombs).")
    max_images_per_request: int = Field(64, ge=1)
    max_request_pixels: int = Field(
        48_000_000,
        ge=1,
        description="Pixels of all a request's images together (413 beyond), read from their headers before any "
        "is decoded: with one image of a request decoded at a time, this bounds what one request can make the "
        "server hold (about 3 bytes a pixel at most, RGB).",
    )
    inline_decode_pixels: int = Field(
        65_536,
        ge=0,
        description="A request whose images hold at most this many pixels together is decoded on the event loop "
        "(cheaper than a worker thread for small images); larger ones decode on worker threads.",
    )
    image_decode_slots: int = Field(
        0, ge=0, description="Images decoding at once in the whole server (0: one per CPU core)."
    )
    max_top_k: int = Field(100, ge=1)
    max_tensor_elements: int = Field(
        1 << 22, ge=1, description="Values per v2 input tensor (413 beyond): a bound on what one request may queue."
    )
    max_texts_per_request: int = Field(64, ge=1)
    max_text_chars: int = Field(
        20_000, ge=1, description="Hard limit per text (413 beyond); longer than the model takes is truncated."
    )
    max_pairs_per_request: int = Field(1000, ge=1, description="Pairs per /v1/rating request.")
    max_recommendations: int = Field(100, ge=1, description="Largest k for /v1/recommendations.")
    max_generated_images: int = Field(16, ge=1, description="Largest n for /v1/image-generation.")
    max_generated_digits: int = Field(16, ge=1, description="Digits per generated image in /v1/image-generation.")

    # Step-level decoding: each model's model.json ``parameters.decoding`` says how it decodes; these
    # override a field for every decoding model (unset: the model's own).
    decode_batching: Literal["step", "request", "static"] | None = Field(
        None,
        description="step: sequences join and leave the decode batch at every step; request: a batch "
        "decodes to its last sequence before others join (request-level batching, for comparison); static "
        "(text generation only): request-level with finished rows still computed until the batch ends, as a "
        "static batch does.",
    )
    decode_max_rows: int | None = Field(None, ge=1, description="Decoder rows per step (a beam of 4 is 4 rows).")
    decode_max_tokens: int | None = Field(
        None, ge=16, description="Tokens (source + generated, per row) a decode batch may hold when it admits."
    )
    decode_timeout_ms: float | None = Field(
        None, gt=0, description="Deadline for a whole decode (waiting and decoding): 504 beyond."
    )
    decode_kv_cache: bool | None = Field(
        None, description="Decode with the model's key/value-cache graphs when it has them (else the full-prefix step)."
    )
    decode_threads: int | None = Field(
        None,
        ge=0,
        description="Threads that run a decode step's row groups (and a prefill's chunks) in parallel; 0: one "
        "per CPU core. Above 1, the decoding graphs run one intra-op thread each.",
    )
    decode_boost_after: int | None = Field(
        None,
        ge=0,
        description="Step-level decoding: sequences decoding for this many steps or more take extra steps "
        "alone in each iteration, the oldest first (0: off). Trades throughput for the longest requests' tail.",
    )
    decode_boost_steps: int | None = Field(None, ge=0, description="Extra steps per iteration for those old sequences.")
    decode_boost_rows: int | None = Field(
        None,
        ge=1,
        description="Most rows that take extra steps in one iteration (and at most a quarter of the batch's).",
    )
    stream_interval_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="Streamed completions: after a chunk, a stream waits this long before it sends the tokens "
        "that came meanwhile, as one chunk (the first goes at once). 0: a chunk whenever the stream finds new "
        "tokens.",
    )
    decode_admit_every: int | None = Field(
        None,
        ge=1,
        description="Step-level text generation: while a batch decodes, newcomers join at most every this many "
        "steps, so that one prefill call serves several.",
    )
    decode_fair: bool | None = Field(
        None,
        description="Requests share a decode batch's rows (max_rows divided among the requests present); "
        "false: pure arrival order.",
    )
    max_beam_size: int = Field(5, ge=1, description="Largest beam_size a translation request may ask for.")

    require_all_models: bool = Field(
        True,
        description="Report not ready while any model failed to load, so a load balancer sends its traffic "
        "to replicas that serve every model (false: ready once at least one serves; failed ones answer 503).",
    )
    warmup: bool = Field(True, description="Run dummy batches of every size before reporting ready.")

    default_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models that are their task's default (a JSON list of names), overriding model.json's "
        "default flag within their task.",
    )

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        """An empty variable (compose's "${VAR:-}") means no keys file, not the current folder."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("default_models", "cors_allow_origins", "allowed_hosts", "forwarded_allow_ips", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        """A JSON list or comma-separated names (``mnist,sentiment-zh``)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [name.strip() for name in text.split(",") if name.strip()]
        return value

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        """Each an origin as browsers send it, or "*": browsers send the scheme and host in lower
        case and leave out a default port, and the CORS answer compares strings, so
        ``HTTPS://App.example:443`` is written ``https://app.example``. "null" is refused: it is the
        opaque origin of every sandboxed iframe and file:// page, on any site, so listing it trusts
        them all (the Fetch standard's warning). Any scheme: an app in a web view sends its own
        (capacitor://localhost, ionic://localhost)."""
        return [origin if origin == "*" else _origin(origin) for origin in origins]

    def intra_op_threads_or_default(self) -> int:
        """The event loop (HTTP, JSON, responses) is busy for most of every request on a small
        machine: with onnxruntime's default of a thread per core, its threads took that core's
        time, and 1 thread served the MNIST v2 benchmark about 10 % faster on 2 cores (bench/run.py)."""
        if self.intra_op_threads is not None:
            return self.intra_op_threads
        return max(1, self.cpu_cores() - 1)

    @staticmethod
    def cpu_cores() -> int:
        """The CPU cores this process may run on: its affinity, and within a container the CPU
        quota of its cgroup (a pod limited to 4 CPUs on a 64-core node has 4)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        quota = _cgroup_cpu_quota()
        return max(1, min(cores, quota)) if quota is not None else cores


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _origin(text: str) -> str:
    """``text`` as the Origin header a browser would send for it; ValueError when it cannot be one."""
    if text.strip().lower() == "null":
        raise ValueError(
            "'null' cannot be a trusted origin: any site's sandboxed iframe sends it; serve the page from an "
            "http(s) origin and list that"
        )
    example = "scheme://host[:port] with no path, query or wildcard, e.g. https://app.example.com"
    scheme, sep, rest = text.strip().rstrip("/").partition("://")
    host, _, port = rest.rpartition(":") if re.search(r":\d*$", rest) else (rest, "", "")
    valid = (
        sep
        and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme)
        and re.fullmatch(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]", host)
        and (port == "" or (port.isdigit() and 0 < int(port) < 65536))
    )
    if not valid:
        raise ValueError(f"{text!r} is not an origin: {example}")
    scheme, host = scheme.lower(), host.lower()
    if host.startswith("["):  # as browsers write it: [2001:db8:0:0::1] is sent as [2001:db8::1]
        try:
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise ValueError(f"{text!r} is not an origin: {host} is not an IPv6 address") from None
    keep_port = port and int(port) != _DEFAULT_PORTS.get(scheme)
    return f"{scheme}://{host}:{int(port)}" if keep_port else f"{scheme}://{host}"


def _cgroup_cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """CPUs allowed by the cgroup v2 quota (``cpu.max``: "quota period", or "max"), rounded up."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None
