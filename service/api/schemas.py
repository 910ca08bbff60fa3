"""Request and response bodies of the task endpoints (they also document the OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

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


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, in a sentence.")
    error_type: str = Field(description="Stable machine-readable kind, e.g. invalid_image.")


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
