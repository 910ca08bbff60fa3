"""Out-of-distribution scores: a companion model that tells how unlike its training images an input is.

The graph (``training/digit_ood.py``: an autoencoder trained on MNIST, and a Gaussian mixture
fitted on training digits over its reconstruction errors and ink and texture features, all in the
graph) takes exactly what its classifier takes and returns ``score`` ``[batch]``, the negative
log-likelihood under that mixture: higher is less like the training data (digits score about -30
to 0; a blank page about 6e4). A classifier names its companion in ``model.json``
(``parameters.ood``, image classification), and ``/v1/image-classification`` then reports, per
image, the score and whether it passes the ``threshold`` calibrated on held-out digits
(``parameters.threshold`` here). The task has no endpoint of its own; the graph is also served on
the Open Inference Protocol.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from service.repository import ModelSpec
from service.tasks.base import Parameters, Task, require

SCORE = "score"


class ImageOodParameters(Parameters):
    threshold: float = Field(description="Scores above it are flagged (calibrated on validation images)")
    preprocessing: Literal["mnist"] = Field("mnist", description="What its inputs are: the classifier's own")


class ImageOod(Task[ImageOodParameters]):
    name = "image-ood"
    parameters_model = ImageOodParameters

    def check(self, spec: ModelSpec, parameters: ImageOodParameters) -> None:
        require(len(spec.inputs) == 1, f"it takes one image input, the graph has {len(spec.inputs)}")
        image = spec.inputs[0]
        require(
            image.datatype == "FP32" and image.shape[1:] == [1, 28, 28],
            f"input {image.name!r} must be FP32 [batch, 1, 28, 28] (mnist preprocessing), not {image.shape}",
        )
        score = next((t for t in spec.outputs if t.name == SCORE), None)
        require(score is not None, f"an output named {SCORE!r} is needed")
        require(len(score.shape) == 1, f"output {SCORE!r} must be [batch], not {score.shape}")  # type: ignore[union-attr]


TASK = ImageOod()
