"""onnxruntime sessions: one :class:`OnnxModel` per loaded model version."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.errors import InvalidTensor, ModelLoadError

log = logging.getLogger(__name__)
_InvalidArgument = ort.capi.onnxruntime_pybind11_state.InvalidArgument

# KServe v2 datatypes <-> numpy <-> onnxruntime type strings.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str  # KServe v2 name, e.g. FP32
    shape: tuple[int, ...]  # -1 for dynamic axes
    # The graph's names for its dynamic axes (None where it has none): inputs that share a name
    # must agree on that axis's size, or onnxruntime fails inside the graph.
    symbols: tuple[str | None, ...] = ()

    @property
    def dtype(self) -> np.dtype:
        return V2_TO_NUMPY[self.datatype]


@dataclass(frozen=True)
class RuntimeOptions:
    providers: Sequence[str]
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    intra_op_spinning: bool = True
    cpu_memory_arena: str = "shared"  # "shared": one arena for every session; "per-model"; "off"


_shared_arena: bool | None = None  # None: not tried yet; False: onnxruntime refused it
_shared_arena_lock = threading.Lock()


def _register_shared_arena() -> bool:
    """One CPU arena in onnxruntime's environment for every session that asks for it. Each session's
    own arena kept what its largest batch had needed, model after model (the detector 151 MiB, the
    face embedder 76, sentiment 60, ...: ``python -m bench.arena``); a shared one holds what the
    largest runs need at once: every committed model warmed, 625 MiB against 834 (none at all: 396,
    but each run maps and faults its buffers again, MNIST at batch 64 30 ms against 18 ms). It grows
    by powers of two, as a session's own does: growing by what is asked (kSameAsRequested) left it
    larger, 642 MiB, and a model served alone larger than with its own arena (the detector 340
    against 282 MiB)."""
    global _shared_arena
    # Models load in threads at once, and a second registration adds a second arena (onnxruntime
    # 1.32 accepts it: 700 -> 1,351 MiB in a review's script), hence the lock.
    with _shared_arena_lock:
        if _shared_arena is None:
            try:
                cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                # max_mem 0 (no cap), kNextPowerOfTwo (0), default initial chunk and dead bytes per chunk.
                ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, 0, -1, -1))
                _shared_arena = True
            except Exception:  # this build cannot: each session keeps its own arena
                log.exception("onnxruntime refused a shared CPU arena; each model keeps its own")
                _shared_arena = False
    return _shared_arena


def select_providers(preferred: Sequence[str]) -> list[str]:
    """The preferred providers that this onnxruntime build offers, in order; CPU always last."""
    available = set(ort.get_available_providers())
    chosen = [p for p in preferred if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _tensor_infos(args: Sequence[ort.NodeArg], path: Path) -> list[TensorInfo]:
    infos = []
    for arg in args:
        if arg.type not in ORT_TO_V2:
            raise ModelLoadError(path, f"tensor {arg.name!r} has unsupported type {arg.type}")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
        symbols = tuple(d if isinstance(d, str) and d else None for d in (arg.shape or ()))
        infos.append(TensorInfo(arg.name, ORT_TO_V2[arg.type], shape, symbols))
    return infos


class OnnxModel:
    """One onnxruntime session. ``run`` is thread-safe (onnxruntime allows concurrent Run calls)."""

    def __init__(self, path: Path, options: RuntimeOptions) -> None:
        self.path = path
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = _OPT_LEVELS[options.graph_optimization]
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = options.cpu_memory_arena != "off"
        self.shares_arena = options.cpu_memory_arena == "shared" and _register_shared_arena()
        if self.shares_arena:
            so.add_session_config_entry("session.use_env_allocators", "1")
        if not options.intra_op_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = select_providers(options.providers)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(path, f"onnxruntime cannot load the graph: {exc}") from exc
        self.providers = self.session.get_providers()
        self.inputs = _tensor_infos(self.session.get_inputs(), path)
        self.outputs = _tensor_infos(self.session.get_outputs(), path)
        self._output_names = [o.name for o in self.outputs]
        log.info("loaded %s with providers %s", path, self.providers)

    def shrink_shared_arena(self) -> bool:
        """Free chunks of the shared arena handed back to the system: onnxruntime shrinks an arena
        at the end of a run that asks it to, so one run of this model (zeros at batch 1) does it.
        Called after a model is retired: the shared arena kept a retired model's peak for the
        others (a review measured MNIST after a batch of 2,048: 698 MiB held after unloading,
        against 60 MiB with its own arena, which closed with it). True when it ran."""
        if not self.shares_arena:
            return False
        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        try:
            self.session.run(self._output_names, self.dummy_feeds(1), options)
        except Exception:  # a graph that zeros do not fit: the memory stays for reuse, nothing worse
            log.warning("shrinking the shared memory arena with %s failed", self.path, exc_info=True)
            return False
        return True

    @property
    def provider(self) -> str:
        """The provider that runs the graph (the first one the session accepted)."""
        return self.providers[0]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self.session.run(self._output_names, dict(feeds))
        except _InvalidArgument:
            # onnxruntime refused the inputs themselves (shapes that do not fit together, say): the
            # caller's mistake, a 400, told without the graph's internals.
            shapes = {name: list(array.shape) for name, array in feeds.items()}
            raise InvalidTensor(f"the model cannot run inputs of these shapes and values: {shapes}") from None
        return dict(zip(self._output_names, results, strict=True))

    def check_shared_axes(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Inputs whose axes the graph names alike (``length`` of ``input_ids`` and of
        ``attention_mask``) must have the same size there: else onnxruntime fails deep in the
        graph, which read as a server error. A client's mistake, told before it is queued."""
        seen: dict[str, tuple[str, int, int]] = {}
        for info in self.inputs:
            array = feeds.get(info.name)
            if array is None:
                continue
            for axis, symbol in enumerate(info.symbols[: array.ndim]):
                if symbol is None:
                    continue
                size = array.shape[axis]
                first = seen.setdefault(symbol, (info.name, axis, size))
                if first[2] != size:
                    raise InvalidTensor(
                        f"input {info.name!r} axis {axis} is {size} but input {first[0]!r} axis {first[1]} is "
                        f"{first[2]}: the model takes the same size for both ({symbol!r})"
                    )

    def dummy_feeds(self, batch_size: int, dynamic_dim: int = 1) -> dict[str, np.ndarray]:
        """Zeros of every input at ``batch_size`` (other dynamic axes set to ``dynamic_dim``)."""
        feeds = {}
        for info in self.inputs:
            shape = [batch_size] + [d if d > 0 else dynamic_dim for d in info.shape[1:]]
            feeds[info.name] = np.zeros(shape, dtype=info.dtype)
        return feeds
