"""Errors are data: one hierarchy, each class with a status code and a stable ``error_type``.

Every error leaves the service as ``{"error": "<sentence>", "error_type": "<snake_case>"}`` through
the handlers in ``service.api.handlers``. Nothing here knows HTTP beyond the status number, so the
batcher and the runtime raise these too.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": self.error_type}


class InvalidInput(ServiceError):
    status_code = 400
    error_type = "invalid_input"


class InvalidJSON(InvalidInput):
    error_type = "invalid_json"


class InvalidTensor(InvalidInput):
    error_type = "invalid_tensor"


class InvalidImage(InvalidInput):
    error_type = "invalid_image"


class UnsupportedText(InvalidInput):
    error_type = "unsupported_text"


class ModelNotFound(ServiceError):
    status_code = 404
    error_type = "model_not_found"


class NotFound(ServiceError):
    status_code = 404
    error_type = "not_found"


class ModelNotReady(ServiceError):
    status_code = 503
    error_type = "model_not_ready"


class PayloadTooLarge(ServiceError):
    status_code = 413
    error_type = "payload_too_large"


class ImageTooLarge(PayloadTooLarge):
    error_type = "image_too_large"


class TooManyItems(PayloadTooLarge):
    error_type = "too_many_items"


class TextTooLong(PayloadTooLarge):
    error_type = "text_too_long"


class InvalidId(InvalidInput):
    error_type = "invalid_id"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    error_type = "unsupported_media_type"


class UnsupportedImageFormat(UnsupportedMediaType):
    error_type = "unsupported_image_format"


class SchemaError(ServiceError):
    status_code = 422
    error_type = "schema_error"


class Overloaded(ServiceError):
    # 429, not 503: a load balancer retries 503s on another replica (right for a replica that is
    # loading or shutting down), which under real overload would multiply the load and eject a busy
    # replica. A 429 goes back to the client with Retry-After.
    status_code = 429
    error_type = "overloaded"


class ShuttingDown(Overloaded):
    status_code = 503  # this replica is going away: another one should take the request
    error_type = "shutting_down"


class DeadlineExceeded(ServiceError):
    status_code = 504
    error_type = "deadline_exceeded"


class ClientDisconnected(ServiceError):
    # nginx's convention; nobody reads it, but logs and metrics do.
    status_code = 499
    error_type = "client_disconnected"


class InferenceFailed(ServiceError):
    status_code = 500
    error_type = "inference_failed"


class ModelLoadError(ServiceError):
    """Raised while loading the repository; names the file and the problem."""

    error_type = "model_load_error"

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem
