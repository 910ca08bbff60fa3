"""The task interface: what the core (registry, repository, app) knows of a task.

A task is a :class:`Task` subclass in its own module of ``service/tasks/``, registered in
``service/tasks/__init__.py``; its HTTP side (routes, request and response models) is the module
its ``routes`` names. The core asks a task, at load time and in this order:

1. ``parameters(spec)``: ``model.json``'s ``parameters`` parsed into the task's own pydantic model
   (a misspelt or mistyped field fails the model with the reason);
2. ``check(spec, parameters)``: whether the task can feed the graph ``model.json`` declares (its
   inputs, outputs and labels); a model it cannot feed is FAILED at load, never a per-request 400;
3. ``default_scope(parameters)``: the scope in which a model may be its task's default (the
   language of a sentiment model, say; ``None`` for one default per task);
4. ``session_options`` and ``load_assets`` when the graph is opened (in a worker thread), then
   ``make_engine`` for a task with its own scheduler (step-level decoding); the rest are served
   through the model's dynamic batcher.

Nothing here knows HTTP; ``router()`` imports the route module only when the app is built.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from service.config import Settings
from service.repository import ModelSpec
from service.runtime import RuntimeOptions

if TYPE_CHECKING:
    from fastapi import APIRouter

    from service.admission import Places
    from service.registry import ServedModel


class Engine(Protocol):
    """A task's own scheduler around a loaded model (started once the model is warm)."""

    def start(self) -> None: ...
    async def close(self, *, drain: bool = True) -> None: ...
    @property
    def saturated(self) -> bool: ...  # its waiting line is full: a new request would be refused
    @property
    def places(self) -> Places: ...  # held in that line by requests on their way (service.admission)


class Parameters(BaseModel):
    """``model.json`` ``parameters`` of a task; unknown keys are an error (a typo must not pass)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CannotFeed(ValueError):
    """The task cannot feed the model's declared tensors (the message says why)."""


P = TypeVar("P", bound=Parameters)


class Task(Generic[P]):
    name: ClassVar[str]
    parameters_model: ClassVar[type[Parameters]] = Parameters
    routes: ClassVar[str | None] = None  # the module whose ``router`` serves the task's endpoints

    def parameters(self, spec: ModelSpec) -> P:
        """Raises pydantic's ``ValidationError``; the registry reports it against model.json."""
        return self.parameters_model.model_validate(spec.parameters)  # type: ignore[return-value]

    def check(self, spec: ModelSpec, parameters: P) -> None:
        """Raise :class:`CannotFeed` when the graph is not one this task can feed. By default the
        labels must name the first output's last axis (class scores)."""
        check_labels(spec)

    def default_scope(self, parameters: P) -> str | None:
        return None

    def session_options(self, parameters: P, options: RuntimeOptions, settings: Settings) -> RuntimeOptions:
        return options

    def load_assets(
        self, spec: ModelSpec, parameters: P, version_dir: Path, options: RuntimeOptions, settings: Settings
    ) -> Any:
        """The task's files beside the graph, read and checked at load (runs in a worker thread)."""
        return None

    def make_engine(self, served: ServedModel, settings: Settings) -> Engine | None:
        return None

    def router(self) -> APIRouter | None:
        return importlib.import_module(self.routes).router if self.routes else None


def check_labels(spec: ModelSpec) -> None:
    """Labels name the first output's last axis (class scores): the rule for v2-only models too."""
    if spec.labels is not None:
        width = spec.outputs[0].shape[-1]
        if width != -1 and width != len(spec.labels):
            raise CannotFeed(f"{len(spec.labels)} labels for an output of width {width}")


def require(condition: bool, problem: str) -> None:
    """``check`` helper: raise :class:`CannotFeed` with ``problem`` unless ``condition``."""
    if not condition:
        raise CannotFeed(problem)
