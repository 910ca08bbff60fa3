"""The registered tasks: the one place that lists them. A task is a :class:`~service.tasks.base.Task`
in its own module here, with its routes in ``service/api/routes/`` (see the README's "Add your own
model"); ``model.json`` may name exactly these in its ``task`` (or ``"none"`` for v2 only)."""

from __future__ import annotations

from service.tasks import (
    face_embedding,
    image_classification,
    image_generation,
    image_ood,
    object_detection,
    rating,
    sentiment,
    text_generation,
    translation,
)
from service.tasks.base import CannotFeed, Engine, Parameters, Task, check_labels

TASKS: dict[str, Task] = {
    module.TASK.name: module.TASK
    for module in (
        image_classification,
        object_detection,
        sentiment,
        rating,
        translation,
        image_generation,
        image_ood,
        text_generation,
        face_embedding,
    )
}

__all__ = ["TASKS", "CannotFeed", "Engine", "Parameters", "Task", "check_labels"]
