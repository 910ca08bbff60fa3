"""Loaded models: each model version gets an onnxruntime session behind its own dynamic batcher.

:class:`ModelRegistry` scans the repository, checks each model against its task (a registered
:class:`~service.tasks.Task`: its parameters parse, it can feed the graph), settles each task's
default model, loads and warms every model off the event loop, tracks each one's state (a broken
model is ``FAILED`` with its reason, the rest still serve), and answers lookups by name, version
and task. It names no task: what differs between tasks is asked of the task.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from service import tracing
from service.admission import Claim, Places
from service.batching import BatchResult, DynamicBatcher
from service.config import Settings
from service.errors import (
    InferenceFailed,
    InvalidTensor,
    ModelLoadError,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    NoDefaultModel,
    Overloaded,
    ServiceError,
    describe_validation,
    retry_phrase,
)
from service.memory import release_memory
from service.metrics import Metrics, ModelObserver
from service.repository import (
    V2_ONLY,
    VERSION_PATTERN,
    ModelEntry,
    ModelSpec,
    VersionEntry,
    check_graph,
    fingerprint,
    model_dirs,
    scan,
    scan_model,
)
from service.runtime import OnnxModel, RuntimeOptions
from service.tasks import TASKS, CannotFeed, Engine, Parameters, Task, check_labels

log = logging.getLogger(__name__)

Row = tuple[np.ndarray, ...]
# Triton's default too; on a small CPU machine batches form well from what queues while a batch
# runs, and any fixed wait only adds latency (bench/run.py compares 0 and 2 ms).
DEFAULT_QUEUE_DELAY_MS = 0.0


class ModelState(enum.StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNAVAILABLE = "UNAVAILABLE"  # unloaded by model control (Triton's name)


@dataclass(frozen=True)
class Inference:
    outputs: dict[str, np.ndarray]
    queue_ms: float
    compute_ms: float
    batch_size: int

    def timing_headers(self) -> dict[str, str]:
        return {
            "x-queue-time-ms": f"{self.queue_ms:.3f}",
            "x-inference-time-ms": f"{self.compute_ms:.3f}",
            "x-batch-size": str(self.batch_size),
        }


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a dynamic axis")


class ModelParameters(BaseModel):
    task: str
    default: bool
    description: str
    execution_provider: str
    execution_providers: list[str]
    max_batch_size: int
    max_queue_delay_ms: float
    metrics: dict[str, Any] = Field(description="Measured quality (metadata.json), with the split and command")
    dataset: dict[str, Any]
    training_command: str | None
    sha256: str | None


class ModelVersionMetadata(BaseModel):
    """The Open Inference Protocol's model metadata, with neuroserve's parameters."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: ModelParameters


class ServedModel:
    """One model version that serves: session + batcher + its metrics, and what its task loaded."""

    def __init__(
        self,
        spec: ModelSpec,
        entry: VersionEntry,
        runtime: OnnxModel,
        settings: Settings,
        observer: ModelObserver,
        assets: Any = None,
        *,
        task: Task | None = None,
        parameters: Parameters | None = None,
        default: bool = False,
    ) -> None:
        self.spec = spec
        self.task = task  # None: served on the Open Inference Protocol only
        self.parameters = parameters  # model.json parameters, parsed by the task
        self.default = default
        self.assets = assets  # the task's files (tokenizer, id maps), loaded with the model
        self.engine: Engine | None = None  # the task's own scheduler (step-level decoding), if any
        self.name = spec.name
        self.version = entry.version
        self.entry = entry
        self.runtime = runtime
        self.observer = observer
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]
        self.warmed_batch_sizes: list[int] = []
        self.warmed_lengths: list[int] = []
        batching = spec.dynamic_batching
        self.batched = spec.max_batch_size > 0
        self.max_batch_size = (settings.max_batch_size or spec.max_batch_size) if self.batched else 1
        delays = (settings.max_queue_delay_ms, batching.max_queue_delay_ms, DEFAULT_QUEUE_DELAY_MS)
        self.max_queue_delay_ms = next(d for d in delays if d is not None)
        self.timeout_s = (batching.timeout_ms or settings.request_timeout_ms) / 1000.0
        self.batcher: DynamicBatcher[Row, Row] = DynamicBatcher(
            self._run_batch if self.batched else self._run_single,
            max_batch_size=self.max_batch_size,
            max_queue_delay_ms=self.max_queue_delay_ms,
            max_queue_size=batching.max_queue_size or settings.max_queue_size,
            instances=settings.model_instances,
            name=spec.name,
            observer=observer,
            retry_after_s=settings.retry_after_s,
        )

    # Runs in the batcher's worker thread.
    def _run_batch(self, rows: list[Row]) -> list[Row]:
        feeds = {name: np.stack([row[i] for row in rows]) for i, name in enumerate(self.input_names)}
        results = self.runtime.run(feeds)
        arrays = [results[name] for name in self.output_names]
        for name, array in zip(self.output_names, arrays, strict=True):
            if array.ndim == 0 or array.shape[0] != len(rows):
                raise InferenceFailed(
                    f"model {self.name} output {name!r} has shape {array.shape} for a batch of {len(rows)}"
                )
        return list(zip(*arrays, strict=True))

    def _run_single(self, rows: list[Row]) -> list[Row]:
        feeds = dict(zip(self.input_names, rows[0], strict=True))
        results = self.runtime.run(feeds)
        return [tuple(results[name] for name in self.output_names)]

    def warmup(self) -> None:
        """A dummy batch at 1, 2, 4, ... and the largest batch size, and, for inputs with dynamic
        non-batch axes (token sequences), at every length of ``parameters.length_buckets`` (else
        length 1). Not every size: after the largest batch, onnxruntime's memory arena holds what
        any smaller one needs, and warming every size (2,048 runs for the rating model) made
        start-up take 14 s on 2 cores (``python -m bench.startup``)."""
        sizes = warm_sizes(self.max_batch_size) if self.batched else [1]
        dynamic = any(d == -1 for t in self.spec.inputs for d in t.shape[1:])
        lengths = [int(n) for n in self.spec.parameters.get("length_buckets", [1])] if dynamic else [1]
        for length in lengths:
            for size in sizes:
                feeds = self.runtime.dummy_feeds(size, dynamic_dim=length)
                if self.batched:
                    self._run_batch(list(zip(*(feeds[n] for n in self.input_names), strict=True)))
                else:
                    self.runtime.run(feeds)
            self.warmed_lengths.append(length)
        self.warmed_batch_sizes = list(sizes)

    async def close(self, *, drain: bool = True) -> None:
        if self.engine is not None:
            await self.engine.close(drain=drain)
        await self.batcher.close(drain=drain)

    def metadata(self) -> ModelVersionMetadata:
        return ModelVersionMetadata(
            name=self.name,
            versions=[str(self.version)],
            platform="onnx_onnxv1",  # the Open Inference Protocol's name for ONNX Runtime
            inputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in self.spec.inputs],
            outputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in self.spec.outputs],
            parameters=ModelParameters(
                task=self.spec.task,
                default=self.default,
                description=self.spec.description,
                execution_provider=self.runtime.provider,
                execution_providers=self.runtime.providers,
                max_batch_size=self.max_batch_size,
                max_queue_delay_ms=self.max_queue_delay_ms,
                metrics=self.entry.metadata.get("metrics", {}),
                dataset=self.entry.metadata.get("dataset", {}),
                training_command=self.entry.metadata.get("training", {}).get("command"),
                sha256=self.entry.metadata.get("sha256"),
            ),
        )

    @property
    def saturated(self) -> bool:
        """Its queue (or its engine's) is full: a new request would get 429."""
        return self.engine.saturated if self.engine is not None else self.batcher.saturated

    @property
    def places(self) -> Places:
        """The places held in that queue by requests let in on their way to it."""
        return self.engine.places if self.engine is not None else self.batcher.places

    async def infer_rows(self, feeds: Mapping[str, np.ndarray]) -> Inference:
        """Like :meth:`infer` for inputs whose first axis counts items (images, texts): a model
        without a batch axis (``max_batch_size`` 0, a fixed first axis of 1) runs them one at a time."""
        first = {t.shape[0] for t in self.spec.inputs}
        rows = {a.shape[0] for a in feeds.values()}
        if self.batched or first != {1} or rows == {1} or len(rows) != 1:
            return await self.infer(feeds)
        parts = [await self.infer({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(rows.pop())]
        outputs = {name: np.concatenate([p.outputs[name] for p in parts]) for name in parts[0].outputs}
        return Inference(
            outputs, sum(p.queue_ms for p in parts), sum(p.compute_ms for p in parts), max(p.batch_size for p in parts)
        )

    async def infer(self, feeds: Mapping[str, np.ndarray]) -> Inference:
        """Run ``feeds`` (arrays keyed by input name, batch axis first) through the batcher."""
        self.runtime.check_shared_axes(feeds)
        submitted = tracing.now_ns() if tracing.enabled() else 0
        with self.observer.track():
            result = await self._submit(feeds)
        if tracing.enabled():
            ran = submitted + int(result.queue_s * 1e9)
            where = {"neuroserve.model": self.name, "neuroserve.version": self.version}
            tracing.record("queue", submitted, ran, where)
            batch = {**where, "neuroserve.batch_size": result.batch_size}
            tracing.record("batch", ran, ran + int(result.compute_s * 1e9), batch)
        if self.batched:
            outputs = {name: np.stack([row[i] for row in result.outputs]) for i, name in enumerate(self.output_names)}
        else:
            outputs = dict(zip(self.output_names, result.outputs[0], strict=True))
        return Inference(outputs, result.queue_s * 1000, result.compute_s * 1000, result.batch_size)

    async def _submit(self, feeds: Mapping[str, np.ndarray]) -> BatchResult[Row]:
        arrays = [feeds[name] for name in self.input_names]
        if not self.batched:
            return await self.batcher.submit([tuple(arrays)], timeout_s=self.timeout_s)
        sizes = {a.shape[0] for a in arrays}
        if len(sizes) != 1:
            raise InvalidTensor(f"inputs of model {self.name} differ in batch size: {sorted(sizes)}")
        key = tuple(a.shape[1:] for a in arrays)
        rows = list(zip(*arrays, strict=True))
        return await self.batcher.submit(rows, key=key, timeout_s=self.timeout_s)


@dataclass
class ModelStatus:
    name: str
    task: str | None
    state: ModelState
    reason: str | None = None
    versions: dict[int, ServedModel] = field(default_factory=dict)
    entry: ModelEntry | None = None
    parameters: Parameters | None = None  # parsed by its task
    scope: str | None = None  # its task's default scope (a sentiment model's language)
    default: bool = False
    # One load or unload of this model at a time (model control); requests never wait on it.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)
    # First found by model control (a load request or the poller), not at start: if it fails to
    # load it is reported, but it does not take the replica out of readiness.
    controlled: bool = False

    def fail(self, reason: str) -> None:
        self.state, self.reason = ModelState.FAILED, reason
        log.error("model %s cannot be served: %s", self.name, reason)

    @property
    def latest(self) -> ServedModel | None:
        return self.versions[max(self.versions)] if self.versions else None


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ModelStatus] = {}
        self.error: str | None = None  # the repository itself could not be read
        self.loading_done = asyncio.Event()
        self._retiring: set[asyncio.Task] = set()  # versions replaced or unloaded, draining
        self.options = RuntimeOptions(
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads_or_default(),
            inter_op_threads=settings.inter_op_threads,
            graph_optimization=settings.graph_optimization,
            intra_op_spinning=settings.intra_op_spinning,
            cpu_memory_arena=settings.cpu_memory_arena,
        )

    # -- loading ------------------------------------------------------------------------------

    def discover(self) -> None:
        """Scan the repository, check every model against its task, and settle the defaults."""
        try:
            entries = scan(self.settings.repository)
        except ModelLoadError as exc:
            self.error = f"the model repository cannot be read: {exc.problem}"
            log.error("model repository cannot be read: %s", exc.message)
            return
        for entry in entries:
            task = entry.spec.task if entry.spec else None
            status = ModelStatus(entry.name, task, ModelState.LOADING, entry=entry)
            self.models[entry.name] = status
            if entry.error is not None:
                self._fail(status, entry.error.message)
            else:
                self._check_task(status)
        self._settle_defaults()

    def _fail(self, status: ModelStatus, reason: str) -> None:
        """FAILED with ``reason``, its files named relative to the repository: the reason is shown
        to clients (/v2/models, 503 bodies), the server's own paths are not theirs to know."""
        root = self.settings.repository
        for prefix in {str(root.resolve()), str(root.absolute()), str(root)}:
            reason = reason.replace(prefix.rstrip("/") + "/", "")
        status.fail(reason)

    def _check_task(self, status: ModelStatus) -> None:
        """The task exists, its parameters parse, and it can feed the graph model.json declares."""
        assert status.entry is not None and status.entry.spec is not None
        spec, where = status.entry.spec, status.entry.path / "model.json"
        if spec.task == V2_ONLY:
            try:
                check_labels(spec)
            except CannotFeed as exc:
                self._fail(status, f"{where}: {exc}")
            return
        task = TASKS.get(spec.task)
        if task is None:
            known = ", ".join(sorted(TASKS))
            self._fail(status, f"{where}: unknown task {spec.task!r}; known tasks: {known} (or 'none' for v2 only)")
            return
        try:
            status.parameters = task.parameters(spec)
            task.check(spec, status.parameters)
        except ValidationError as exc:
            self._fail(status, f"{where}: parameters: {describe_validation(exc.errors())}")
            return
        except CannotFeed as exc:
            self._fail(
                status,
                f'{where}: task {task.name} cannot feed this model: {exc} (set "task": "none" to serve it on v2 only)',
            )
            return
        status.scope = task.default_scope(status.parameters)

    def _settle_defaults(self) -> None:
        """One default per task and scope: the model whose model.json says ``"default": true`` (or
        that ``default_models`` names, which then decides its task alone). Two defaults in one scope
        fail both: which one answers must never depend on the order models are found in."""
        groups: dict[tuple[str, str | None], list[ModelStatus]] = {}
        for status in self.models.values():
            if status.state is ModelState.LOADING and status.task != V2_ONLY and status.task is not None:
                groups.setdefault((status.task, status.scope), []).append(status)
        named = set(self.settings.default_models)
        unknown = sorted(named - set(self.models))
        if unknown:
            log.error("NEUROSERVE_DEFAULT_MODELS names models that are not in the repository: %s", unknown)
        named_scopes = {(s.task, s.scope) for s in self.models.values() if s.name in named}
        for (task, scope), members in groups.items():
            by_setting = (task, scope) in named_scopes
            if by_setting:
                chosen = [s for s in members if s.name in named]
            else:
                chosen = [s for s in members if s.entry is not None and s.entry.spec and s.entry.spec.default]
            if len(chosen) == 1:
                chosen[0].default = True
            elif len(chosen) > 1:
                names = ", ".join(s.name for s in chosen)
                where = f" ({scope})" if scope else ""
                how = "named by NEUROSERVE_DEFAULT_MODELS" if by_setting else 'marked "default": true'
                for status in chosen:
                    self._fail(status, f"models {names} are all {how} for task {task}{where}; keep one")

    async def load_all(self) -> None:
        """Load and warm every discovered model off the event loop, as many at once as there are
        cores (each model's onnxruntime session uses its own threads), each serving as soon as it
        is warm."""
        slots = asyncio.Semaphore(max(1, Settings.cpu_cores()))

        async def load(status: ModelStatus) -> None:
            async with slots:
                await self._load(status)

        try:
            await asyncio.gather(*(load(s) for s in self.models.values() if s.state is ModelState.LOADING))
        finally:
            self.loading_done.set()

    async def _load(self, status: ModelStatus) -> None:
        entry = status.entry
        assert entry is not None and entry.spec is not None
        try:
            status.versions = await self._open_versions(entry, status.parameters, status.default)
            status.state = ModelState.READY
        except ModelLoadError as exc:
            self._fail(status, exc.message)
        except Exception as exc:  # a model must never take the server down with it
            log.exception("model %s failed to load", entry.name)
            self._fail(status, f"{type(exc).__name__}: {exc}")

    async def _open_versions(
        self, entry: ModelEntry, parameters: Parameters | None, default: bool
    ) -> dict[int, ServedModel]:
        """Every version of ``entry`` loaded, warmed and started, or (if one fails) none: what was
        started is closed and the error raised."""
        assert entry.spec is not None
        versions: dict[int, ServedModel] = {}
        try:
            for version in entry.versions:
                started = time.perf_counter()
                runtime, assets = await asyncio.to_thread(self._open, entry.spec, parameters, version)
                observer = self.metrics.observer(entry.name)
                served = ServedModel(
                    entry.spec,
                    version,
                    runtime,
                    self.settings,
                    observer,
                    assets,
                    task=TASKS.get(entry.spec.task),
                    parameters=parameters,
                    default=default,
                )
                if self.settings.warmup:
                    await asyncio.to_thread(served.warmup)
                served.batcher.start()
                if served.task is not None:
                    served.engine = served.task.make_engine(served, self.settings)
                if served.engine is not None:
                    served.engine.start()
                versions[version.version] = served
                log.info(
                    "model %s version %d ready on %s in %.2f s (max batch %d)",
                    entry.name,
                    version.version,
                    runtime.provider,
                    time.perf_counter() - started,
                    served.max_batch_size,
                )
        except BaseException:
            await asyncio.gather(*(served.close(drain=False) for served in versions.values()))
            raise
        for number in versions:
            self.metrics.model_ready.labels(entry.name, str(number)).set(1)
        return versions

    # -- model control (load, unload, poll) ----------------------------------------------------------

    async def load_model(self, name: str, override: dict[str, Any] | None = None) -> ModelStatus:
        """(Re)load model ``name`` from its folder, ``override`` replacing fields of its model.json.
        The new versions load and warm beside those that serve, then requests switch to them at
        once; requests already given the old versions (running or queued) finish on them, which
        then close. If loading fails, what served goes on serving and ModelLoadFailed says why
        (the reason also shows in the index)."""
        if name not in {d.name for d in model_dirs(self.settings.repository)}:
            raise ModelNotFound(f"no model folder {name!r} in the repository")
        status = self.models.get(name)
        if status is None:
            status = self.models[name] = ModelStatus(name, None, ModelState.LOADING, controlled=True)
        async with status.lock:
            try:
                entry = await asyncio.to_thread(scan_model, self.settings.repository / name, override)
            except Exception as exc:  # an unreadable folder: what serves goes on serving
                log.exception("model %s: its folder cannot be read", name)
                entry = ModelEntry(name, self.settings.repository / name)
                entry.error = ModelLoadError(entry.path, f"cannot be read: {type(exc).__name__}: {exc}")
            candidate = ModelStatus(name, entry.spec.task if entry.spec else None, ModelState.LOADING, entry=entry)
            if entry.error is not None:
                self._fail(candidate, entry.error.message)
            else:
                self._check_task(candidate)
            if candidate.state is not ModelState.FAILED:
                self._claim_default(candidate)
            versions: dict[int, ServedModel] = {}
            if candidate.state is not ModelState.FAILED:
                assert entry.spec is not None
                try:
                    versions = await self._open_versions(entry, candidate.parameters, candidate.default)
                except ModelLoadError as exc:
                    self._fail(candidate, exc.message)
                except Exception as exc:
                    log.exception("model %s failed to load", name)
                    self._fail(candidate, f"{type(exc).__name__}: {exc}")
            if candidate.state is ModelState.FAILED:
                reason = candidate.reason or "cannot be loaded"
                if status.versions:  # the versions that serve go on serving
                    status.reason = f"a new load failed, the loaded versions serve: {reason}"
                    log.error("model %s: load failed, versions %s still serve", name, sorted(status.versions))
                else:
                    status.task, status.entry = candidate.task, entry
                    self._fail(status, reason)
                raise ModelLoadFailed(f"model {name!r} failed to load: {reason}")
            old = status.versions
            # The switch: one set of assignments on the event loop, between two requests.
            status.entry, status.task, status.parameters = entry, candidate.task, candidate.parameters
            status.scope, status.default = candidate.scope, candidate.default
            status.versions, status.state, status.reason = versions, ModelState.READY, None
            self._retire(name, old, keep=set(versions))
            log.info("model %s serves versions %s", name, sorted(versions))
            return status

    async def unload_model(self, name: str, *, reason: str = "unloaded") -> ModelStatus:
        """Stop serving model ``name``: new requests get 503 at once; those already given a
        version finish on it, then it closes."""
        status = self.status(name)
        async with status.lock:
            old = status.versions
            status.versions, status.state, status.reason = {}, ModelState.UNAVAILABLE, reason
            self._retire(name, old, keep=set())
            log.info("model %s unloaded (%s)", name, reason)
            return status

    def _arena_runners(self) -> list[OnnxModel]:
        """The loaded models whose sessions use the shared arena (one of them shrinks it), the
        cheapest run first (fewest input values at batch 1: MNIST, not the detector's 61 ms)."""
        runners = [
            runtime
            for status in list(self.models.values())
            if status.state is ModelState.READY
            for served in list(status.versions.values())
            if isinstance(runtime := served.runtime, OnnxModel) and runtime.shares_arena
        ]
        return sorted(runners, key=lambda r: sum(a.size for a in r.dummy_feeds(1).values()))

    def _retire(self, name: str, versions: dict[int, ServedModel], *, keep: set[int]) -> None:
        """Drain and close ``versions`` in the background (their queued requests are answered),
        then give their memory back."""
        for number, served in versions.items():
            if number not in keep:
                self.metrics.model_ready.labels(name, str(number)).set(0)
            task = asyncio.create_task(_close_and_reclaim(served, self._arena_runners), name=f"retire-{name}-{number}")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _claim_default(self, candidate: ModelStatus) -> None:
        """A (re)loaded model is its task's default if its model.json or NEUROSERVE_DEFAULT_MODELS
        says so, unless another model already is (then it fails: which model answers must not
        change under clients by a load)."""
        spec = candidate.entry.spec if candidate.entry is not None else None
        if spec is None or candidate.task in (None, V2_ONLY):
            return
        named = set(self.settings.default_models)
        group = (candidate.task, candidate.scope)
        by_setting = candidate.name in named or any(
            s.name in named and (s.task, s.scope) == group for s in self.models.values()
        )
        wants = candidate.name in named if by_setting else bool(spec.default)
        if not wants:
            return
        holders = [
            s.name
            for s in self.models.values()
            if s.name != candidate.name
            and s.default
            and (s.task, s.scope) == (candidate.task, candidate.scope)
            and s.state in (ModelState.READY, ModelState.LOADING)
        ]
        if holders:
            where = f" ({candidate.scope})" if candidate.scope else ""
            self._fail(candidate, f"model {holders[0]} is already the default for task {candidate.task}{where}")
            return
        candidate.default = True
        for status in self.models.values():  # an unloaded or failed default gives its place up
            if status.name != candidate.name and status.default and (status.task, status.scope) == group:
                status.default = False

    async def poll_repository(self, interval_s: float) -> None:
        """Watch the repository (model control ``poll``): a model folder that appears or changes
        is (re)loaded, one that disappears is unloaded. A change is acted on once it has stayed
        the same for one whole interval (a copy in progress is not loaded half-written)."""
        await self.loading_done.wait()
        root = self.settings.repository
        seen = await asyncio.to_thread(self._fingerprints, root)
        pending: dict[str, tuple | None] = {}
        while True:
            await asyncio.sleep(interval_s)
            try:
                now = await asyncio.to_thread(self._fingerprints, root)
            except OSError as exc:
                log.error("model repository cannot be read: %s", exc)
                continue
            for name in sorted(set(now) | set(seen)):
                current = now.get(name)
                if current == seen.get(name):
                    pending.pop(name, None)
                    continue
                if name not in pending or pending[name] != current:
                    pending[name] = current  # changed: wait one interval for it to settle
                    continue
                del pending[name]
                seen[name] = current
                try:
                    if current is None:
                        if name in self.models:
                            await self.unload_model(name, reason="removed from the repository")
                    else:
                        await self.load_model(name)
                except ServiceError as exc:
                    log.error("polling: model %s: %s", name, exc.message)
                except Exception:  # the poller must outlive any one model
                    log.exception("polling: model %s", name)

    @staticmethod
    def _fingerprints(root: Path) -> dict[str, tuple | None]:
        return {d.name: fingerprint(d) for d in model_dirs(root)}

    def _open(self, spec: ModelSpec, parameters: Parameters | None, version: VersionEntry) -> tuple[OnnxModel, Any]:
        task = TASKS.get(spec.task)
        options = self.options
        if task is not None:
            options = task.session_options(parameters, options, self.settings)
        runtime = OnnxModel(version.onnx_path, options)
        check_graph(spec, version.onnx_path, runtime.inputs, runtime.outputs)
        if task is None:
            return runtime, None
        return runtime, task.load_assets(spec, parameters, version.path, options, self.settings)

    async def close(self, *, drain: bool = True) -> None:
        """Stop every batcher; with ``drain`` the queued requests are answered first."""
        await asyncio.gather(
            *(s.close(drain=drain) for status in self.models.values() for s in status.versions.values()),
            *self._retiring,
        )

    # -- readiness and lookup ----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        if not self.loading_done.is_set():
            return False
        # A model an operator unloaded, or one that model control found and could not load, is not
        # a failure of this replica (what it served at start still serves).
        states = [
            s.state
            for s in self.models.values()
            if s.state is not ModelState.UNAVAILABLE and not (s.controlled and s.state is ModelState.FAILED)
        ]
        if self.settings.require_all_models and any(s is not ModelState.READY for s in states):
            return False
        return ModelState.READY in states

    def status(self, name: str) -> ModelStatus:
        try:
            return self.models[name]
        except KeyError:
            raise ModelNotFound(f"unknown model {name!r}; available: {sorted(self.models)}") from None

    def get(self, name: str, version: str | int | None = None) -> ServedModel:
        status = self.status(name)
        if status.state is not ModelState.READY:
            detail = f": {status.reason}" if status.reason else ""
            # A model still loading will serve soon; one that failed will not until it is fixed and
            # the server restarted, so no Retry-After invites clients to hammer it.
            loading = status.state is ModelState.LOADING
            raise ModelNotReady(
                f"model {name!r} is {status.state.value}{detail}",
                headers={"Retry-After": str(self.settings.retry_after_s)} if loading else None,
            )
        if version is None or version == "":
            served = status.latest
            assert served is not None
            return served
        try:
            if not (isinstance(version, int) or VERSION_PATTERN.fullmatch(version)):
                raise ValueError(version)
            return status.versions[int(version)]
        except (KeyError, ValueError):
            raise ModelNotFound(
                f"model {name!r} has no served version {version!r}; served: {sorted(status.versions)}"
            ) from None

    def admission(self, task: str) -> Claim | Overloaded | None:
        """Let a task request in before it is read, parsed or tokenised, or refuse it (an
        :class:`Overloaded` to answer, a 429) when every model of the task that serves is saturated:
        refusing must cost less than the work it saves, or overload feeds on itself. (Which model
        a request names is only known after parsing; when some model of the task has room, the
        request goes on and that model's own queue decides.) A request let in gets a claim on a
        place in each model of the task with room, since any of them may be the one it names
        (see :mod:`service.admission`: for the milliseconds of its parse it counts as waiting in
        each); None when no model of the task serves.
        (The refusal is returned, not raised: a raised one holds its traceback's frames in a
        reference cycle that only the garbage collector frees, thousands a second under overload.)"""
        # The latest version of each: the one a task request is served by.
        serving = [
            served
            for status in self.models.values()
            if status.task == task and status.state is ModelState.READY and (served := status.latest) is not None
        ]
        if not serving:
            return None
        room = [served for served in serving if not served.saturated]
        if not room:
            chosen = next((s for s in serving if s.default), serving[0])
            return Overloaded(
                f"every model of task {task!r} has a full queue" + retry_phrase(self.settings.retry_after_s),
                headers={"Retry-After": str(self.settings.retry_after_s)},
                on_answer=chosen.observer.shed,
            )
        return Claim([served.places for served in room])

    def infer_admission(self, name: str) -> Claim | Overloaded | None:
        """The same for a v2 inference request to model ``name`` (its latest version)."""
        status = self.models.get(name)
        served = status.latest if status is not None and status.state is ModelState.READY else None
        if served is None:
            return None
        if served.batcher.saturated:
            return Overloaded(
                f"model {name} has a full queue",
                headers={"Retry-After": str(self.settings.retry_after_s)},
                on_answer=served.observer.shed,
            )
        return Claim([served.batcher.places])

    def for_task(self, task: str, name: str | None = None, *, scope: str | None = None) -> ServedModel:
        """The model a task endpoint uses: the one named, else the task's default (in ``scope``,
        e.g. a language). A request that names no model never gets a model that is not a default,
        so adding a model never changes which model answers it."""
        if name is not None:
            named = self.status(name)
            if named.task != task:  # before its state: a failed model of another task is still not this task's
                raise ModelNotFound(f"model {name!r} serves {named.task!r}, not {task!r}")
            return self.get(name)
        members = [s for s in self.models.values() if s.task == task and s.scope == scope]
        if not members and scope is not None:
            # No model of this scope (a language): a scope-less model of the task may take it.
            if any(s.task == task and s.scope is None for s in self.models.values()):
                return self.for_task(task)
            raise ModelNotFound(f"no model for task {task!r} ({scope}) in this repository")
        for status in members:
            if status.default:
                return self.get(status.name)  # raises ModelNotReady with its reason
        where = f" ({scope})" if scope is not None else ""
        failed = [s.name for s in members if s.state is ModelState.FAILED]
        if not members:
            raise ModelNotFound(f"no model for task {task!r}{where} in this repository")
        if failed and len(failed) == len(members):
            return self.get(failed[0])  # raises ModelNotReady with why it failed
        names = sorted(s.name for s in members if s.state is not ModelState.FAILED)
        several = "several models and " if len(names) > 1 else ""
        raise NoDefaultModel(f"task {task!r}{where} has {several}no default model; name one with 'model': {names}")


async def _close_and_reclaim(served: ServedModel, arena_runners: Callable[[], list[OnnxModel]]) -> None:
    """A retired version: its queue drained and it closed, then its memory (onnxruntime's arenas,
    freed to malloc) handed back to the system. Without the trim, 5 reloads of the language model
    took a server from 319 to 626 MB; with it the size stays flat after the first reload
    (tests/test_model_control.py's reload test, run once with the trim taken out). With the
    shared arena, its free chunks are handed back by a run of a model still loaded: every free
    chunk, what the loaded models had warmed too, so each grows it again on its next largest batch
    (a review measured MNIST at batch 256: 104 ms once, then 75 ms as before)."""
    await served.close(drain=True)
    del served
    await asyncio.to_thread(_reclaim, arena_runners)


def _reclaim(arena_runners: Callable[[], list[OnnxModel]]) -> None:
    gc.collect()
    for runner in arena_runners():  # the first whose run succeeds
        if runner.shrink_shared_arena():
            break
    release_memory()


def warm_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to and including ``max_batch_size``."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch_size]
