"""Request and response bodies of the task endpoints (they also document the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from service.errors import InvalidInput, SchemaError, TextTooLong, TooManyItems
from service.protocol import parse_json

# A 28x28 PNG of a handwritten 7 (from the MNIST test set), for the docs' "try it out".
SEVEN_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAAwUlEQVR42mNgGDaAEUKFpD77sfTFHeyS9xQYGBg+"
    "X4UKPuk6w8DAwMDAAuGm6l/TMnSweCzLwPDntSTDozPIOhkYGBgYBA3PmDIw/Lh1XShnGi5nBP+9KIRLTuzl/2Ao"
    "kwlDMlv0/U1cGq1//rPD6fHWf7tZcclxnv1hhVNj3b9tOOW8f3+wxCUnfPffMlxyzKf/3VbGJan2758vLjn5B/+K"
    "GXF78Z8JLjnbT+iSSGFrw8Nw9wuKJAsy56LzO+ITGABpETyQcCy90wAAAABJRU5ErkJggg=="
)


class ImageClassificationRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"images": [SEVEN_PNG_BASE64], "top_k": 3}]},
    )
    images: list[str] = Field(
        min_length=1, description="Base64-encoded image files (PNG, JPEG, WebP, BMP, GIF); data URLs accepted."
    )
    top_k: int = Field(5, ge=1, description="Labels to return per image, best first.")
    model: str | None = Field(None, description="A model of this task; default: the first by name.")


class LabelScore(BaseModel):
    label: str
    score: float


class ImageClassificationResponse(BaseModel):
    model: str
    version: str
    predictions: list[list[LabelScore]] = Field(description="One ranked list per image, in request order.")


class DetectionOptions(BaseModel):
    """The parameters of /v1/object-detection (form fields in multipart, keys in JSON)."""

    model_config = ConfigDict(extra="forbid")
    score_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Detections scoring lower are dropped; default: the model's own operating point "
        "(parameters.score_threshold in its model.json), else 0.3.",
    )
    iou_threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Class-wise suppression: of two boxes of one class overlapping more, the lower goes.",
    )
    max_detections: int | None = Field(
        None, ge=1, description="Most detections per image (default and ceiling: the model's own maximum)."
    )
    render: Literal["none", "png", "jpeg"] = Field(
        "none", description="png/jpeg: answer with the (single) image and its boxes drawn, instead of JSON."
    )
    model: str | None = Field(None, description="A detection model by name; default: the first by name.")


class ObjectDetectionRequest(DetectionOptions):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"images": [SEVEN_PNG_BASE64]}]})
    images: list[str] = Field(
        min_length=1, description="Base64-encoded image files (PNG, JPEG, WebP, BMP, GIF); data URLs accepted."
    )


class Box(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float


class Detection(BaseModel):
    label: str
    class_id: int
    score: float
    box: Box = Field(description="Corners in the pixels of the image as sent (after its EXIF orientation).")


class ImageDetections(BaseModel):
    width: int
    height: int
    detections: list[Detection]


class ObjectDetectionResponse(BaseModel):
    model: str
    version: str
    images: list[ImageDetections] = Field(description="One entry per image, in request order.")


class SentimentRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"texts": ["A gorgeous, witty, seductive movie.", "The plot is a mess and the jokes fall flat."]},
                {"texts": ["房间干净，服务热情，下次还会再来。"], "language": "zh"},
            ]
        },
    )
    texts: list[StrictStr] = Field(min_length=1, description="One prediction per text, in order.")
    model: str | None = Field(None, description="A sentiment model by name, e.g. sentiment-zh.")
    language: Literal["auto", "en", "zh"] = Field(
        "auto",
        description="Picks the model of that language when 'model' is not given; 'auto' detects Chinese "
        "text by text, so a request may mix languages.",
    )


class SentimentPrediction(BaseModel):
    model: str = Field(description="The model that classified this text (texts of a request may differ).")
    label: str
    score: float = Field(description="Probability of the label.")
    scores: dict[str, float]
    tokens: int = Field(description="Tokens in the text before truncation.")
    truncated: bool = Field(description="True when the text was longer than the model takes and was cut.")


class SentimentResponse(BaseModel):
    model: str = Field(description="The model of the first text; each prediction names its own.")
    version: str
    predictions: list[SentimentPrediction]


Id = StrictStr | StrictInt


class RatingPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id
    item_id: Id


class RatingRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"pairs": [{"user_id": "1", "item_id": "1"}, {"user_id": "1", "item_id": "2"}]}]
        },
    )
    pairs: list[RatingPair] = Field(min_length=1, description="The dataset's own ids (MovieLens userId, movieId).")
    model: str | None = None


class RatingRow(BaseModel):
    user_id: str
    item_id: str
    rating: float
    fallback: bool = Field(description="True when the user or item is unknown to the model: bias baseline used.")
    unknown: list[str] = Field(description="Which of 'user', 'item' the model has not seen.")


class RatingResponse(BaseModel):
    model: str
    version: str
    ratings: list[RatingRow]


class RecommendationRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"user_id": "1", "k": 10, "exclude_seen": True}]}
    )
    user_id: Id
    k: int = Field(10, ge=1, description="How many items to return.")
    exclude_seen: bool = Field(True, description="Leave out what the user has already rated.")
    model: str | None = None


class RecommendedItem(BaseModel):
    item_id: str
    title: str | None
    genres: list[str]
    score: float = Field(description="Predicted rating.")


class RecommendationResponse(BaseModel):
    model: str
    version: str
    user_id: str
    cold_start: bool = Field(description="Unknown user: popular, well-rated items instead of personal ones.")
    items: list[RecommendedItem]


class TranslationRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"texts": ["I'm hungry.", "Where is the train station?"], "beam_size": 1, "max_new_tokens": 64},
                {"texts": ["Do you want to come with us tomorrow?"], "beam_size": 4},
            ]
        },
    )
    texts: list[StrictStr] = Field(min_length=1, description="English texts; one translation per text, in order.")
    beam_size: int = Field(1, ge=1, description="1: greedy decoding; more: beam search (up to the server's limit).")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate per text (default and ceiling: the model's)."
    )
    stream: bool = Field(
        False, description="Server-sent events: a 'token' event per new token of each text, then 'done' (greedy only)."
    )
    model: str | None = Field(None, description="A translation model by name; default: the first by name.")


class Translation(BaseModel):
    text: str = Field(description="The translation, detokenised.")
    source_tokens: int = Field(description="Tokens in the source text before truncation.")
    generated_tokens: int
    truncated: bool = Field(description="True when the source was longer than the model takes and was cut.")
    unknown_characters: list[str] = Field(description="Characters of the source the model's vocabulary lacks.")
    finished: bool = Field(description="False when max_new_tokens cut the translation short.")


class TranslationResponse(BaseModel):
    model: str
    version: str
    translations: list[Translation]


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, in a sentence.")
    error_type: str = Field(description="Stable machine-readable kind, e.g. invalid_image.")


M = TypeVar("M", bound=BaseModel)


def parse_body(body: bytes, model: type[M]) -> M:
    """A JSON request body into ``model``: 400 when it is not JSON, 422 when its shape is wrong."""
    try:
        return model.model_validate(parse_json(body))
    except ValidationError as exc:
        raise SchemaError(validation_message(exc)) from None


def check_texts(texts: list[str], max_texts: int, max_chars: int) -> None:
    """The limits every text endpoint applies: how many texts, none empty, none too long."""
    if len(texts) > max_texts:
        raise TooManyItems(f"{len(texts)} texts; at most {max_texts} per request")
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidInput(f"texts[{i}] is empty")
        if len(text) > max_chars:
            raise TextTooLong(f"texts[{i}] has {len(text)} characters; the limit is {max_chars}")


def json_body_doc(model: type[BaseModel]) -> dict:
    """OpenAPI for a route that parses its JSON body itself (with ``parse_body``)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def validation_message(exc: ValidationError) -> str:
    """A pydantic error as one sentence a client can act on."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])


ERROR_RESPONSES = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Invalid input (corrupt image, bad base64, invalid JSON)",
        404: "Unknown model",
        413: "Too large (bytes, pixels or number of images)",
        415: "Unsupported media type or image format",
        422: "Request does not match the schema",
        503: "Overloaded or model not ready (Retry-After given)",
        504: "Deadline passed before the request could run",
    }.items()
}
