"""Errors are data: one hierarchy, each class with a status code and a stable ``error_type``.

Every error leaves the service as ``{"error": "<sentence>", "error_type": "<snake_case>"}`` through
the handlers in ``service.api.handlers``. Nothing here knows HTTP beyond the status number, so the
batcher and the runtime raise these too.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

_MAX_MESSAGE_CHARS = 1000


class ServiceError(Exception):
    status_code = 500
    error_type = "internal_error"
    # What a client is told this status means (the OpenAPI error table is built from these).
    summary = "Internal error (a bug: please report it)"
    # False for errors that never reach a client as a response (see :func:`wire_errors`).
    on_the_wire = True

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, param: str | None = None) -> None:
        super().__init__(message)
        # A message quoting the client's input (a model name, a field) never sends a megabyte back.
        if len(message) > _MAX_MESSAGE_CHARS:
            message = message[: _MAX_MESSAGE_CHARS - 20] + f"... ({len(message)} characters)"
        self.message = message
        self.headers = headers or {}
        self.param = param  # the request field at fault, when one is

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": self.error_type}

    def to_openai_dict(self) -> dict[str, Any]:
        """OpenAI's error shape, for the OpenAI-compatible routes (its client libraries parse it):
        ``code`` is this service's ``error_type``."""
        default = "server_error" if self.status_code >= 500 else "invalid_request_error"
        kind = _OPENAI_TYPES.get(self.status_code, default)
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.error_type}}


# OpenAI's error ``type`` by status (4xx not listed: invalid_request_error; 5xx: server_error).
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


class InvalidInput(ServiceError):
    status_code = 400
    error_type = "invalid_input"
    summary = "Invalid input (corrupt image, bad base64, invalid JSON, unusable text)"


class InvalidJSON(InvalidInput):
    error_type = "invalid_json"


class InvalidHost(InvalidInput):
    error_type = "invalid_host"  # a Host header not in NEUROSERVE_ALLOWED_HOSTS


class InvalidTensor(InvalidInput):
    error_type = "invalid_tensor"


class InvalidImage(InvalidInput):
    error_type = "invalid_image"


class UnsupportedText(InvalidInput):
    error_type = "unsupported_text"


class Unauthenticated(ServiceError):
    status_code = 401
    error_type = "unauthenticated"
    summary = "No API key, or not a valid one (send Authorization: Bearer <key> or X-API-Key)"


class Forbidden(ServiceError):
    status_code = 403
    error_type = "forbidden"
    summary = "The API key does not have the scope this route needs"


class CrossOriginRefused(Forbidden):
    error_type = "cross_origin_refused"  # a browser's POST/DELETE from an origin not in the CORS list


class ModelControlDisabled(Forbidden):
    error_type = "model_control_disabled"  # load/unload need NEUROSERVE_MODEL_CONTROL=explicit


class ModelLoadFailed(InvalidInput):
    error_type = "model_load_failed"  # the versions that served before still serve


class ModelNotFound(ServiceError):
    status_code = 404
    error_type = "model_not_found"
    summary = "Unknown model or route, or no model of the task to answer"


class NoDefaultModel(ModelNotFound):
    # Several models serve the task and none is its default: the request must name one.
    error_type = "no_default_model"


class NotFound(ModelNotFound):
    error_type = "not_found"


class MethodNotAllowed(ServiceError):
    status_code = 405
    error_type = "method_not_allowed"
    summary = "The route exists but not with this HTTP method"


class ModelNotReady(ServiceError):
    status_code = 503
    error_type = "model_not_ready"
    summary = (
        "Not ready (still loading, failed to load, unloaded, or shutting down; the server's connection cap): "
        "Retry-After given when it will pass by itself (loading, the cap), not for a model failed or unloaded"
    )


class NotReady(ModelNotReady):
    error_type = "not_ready"  # the whole server, on /v2/health/ready


class PayloadTooLarge(ServiceError):
    status_code = 413
    error_type = "payload_too_large"
    summary = "Too large (bytes, pixels, characters or number of items)"


class ImageTooLarge(PayloadTooLarge):
    error_type = "image_too_large"


class TooManyItems(PayloadTooLarge):
    error_type = "too_many_items"


class TextTooLong(PayloadTooLarge):
    error_type = "text_too_long"


class ContextTooLong(InvalidInput):
    # OpenAI's code for a prompt plus max_tokens beyond the model's context.
    error_type = "context_length_exceeded"


class InvalidId(InvalidInput):
    error_type = "invalid_id"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    error_type = "unsupported_media_type"
    summary = "Unsupported media type or image format"


class UnsupportedImageFormat(UnsupportedMediaType):
    error_type = "unsupported_image_format"


class SchemaError(ServiceError):
    status_code = 422
    error_type = "schema_error"
    summary = "The request does not match the schema (a field missing, of the wrong type or out of range)"


class NoFace(ServiceError):
    status_code = 422
    error_type = "no_face"
    summary = "The face detector found no face in a photo (send one with a face, or an aligned face)"


class Overloaded(ServiceError):
    # 429, not 503: a load balancer retries 503s on another replica (right for a replica that is
    # loading or shutting down), which under real overload would multiply the load and eject a busy
    # replica. A 429 goes back to the client with Retry-After.
    status_code = 429
    error_type = "overloaded"
    summary = "Overloaded: the model's queue is full; retry after Retry-After seconds"

    def __init__(
        self,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        on_answer: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(message, headers=headers, param=param)
        # Shedding before routing: counted in the model's metrics when the 429 is answered (a
        # request held back may still be let in; see service.server.Door).
        self.on_answer = on_answer

    def later(self, seconds: int) -> Overloaded:
        """The same refusal telling the client to come back after ``seconds`` (header and message),
        when it is longer than what this one says."""
        said = self.headers.get("Retry-After", "")
        if said.isdigit() and int(said) >= seconds:
            return self
        message = self.message.removesuffix(retry_phrase(int(said))) if said.isdigit() else self.message
        return type(self)(
            message + retry_phrase(seconds),
            headers={**self.headers, "Retry-After": str(seconds)},
            param=self.param,
            on_answer=self.on_answer,
        )


def retry_phrase(seconds: int) -> str:
    """How a refusal's message ends when it says when to come back (see :meth:`Overloaded.later`)."""
    return f"; retry after {seconds} s"


class RateLimited(Overloaded):
    error_type = "rate_limited"  # this API key is over its requests per minute (RateLimit headers say)


class ShuttingDown(Overloaded):
    status_code = 503  # this replica is going away: another one should take the request
    error_type = "shutting_down"


class GalleryBusy(ModelNotReady):
    error_type = "gallery_busy"  # another replica held the face gallery's database past the timeout


class TooManyConnections(ModelNotReady):
    error_type = "too_many_connections"  # the server's connection cap: another replica can take it


class RequestTimeout(ServiceError):
    status_code = 408
    error_type = "request_timeout"
    summary = "The request's headers or body did not arrive in time; the connection is closed"


class HeadersTooLarge(ServiceError):
    status_code = 431
    error_type = "headers_too_large"
    summary = "The request's headers are over the server's size or count limit"


class DeadlineExceeded(ServiceError):
    status_code = 504
    error_type = "deadline_exceeded"
    summary = "The request's deadline passed before it could run or finish"


class ClientDisconnected(ServiceError):
    # nginx's convention; nobody reads it, but logs and metrics do.
    status_code = 499
    error_type = "client_disconnected"
    on_the_wire = False


class InferenceFailed(ServiceError):
    status_code = 500
    error_type = "inference_failed"


class ModelLoadError(ServiceError):
    """Raised while loading the repository; names the file and the problem."""

    error_type = "model_load_error"
    on_the_wire = False  # reported in /v2/models and readiness, never as a response

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _subclasses(cls: type[ServiceError]) -> Iterator[type[ServiceError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)


def wire_errors() -> dict[int, list[type[ServiceError]]]:
    """Every error class a client can receive, by status code (the OpenAPI error table)."""
    table: dict[int, list[type[ServiceError]]] = {}
    for cls in _subclasses(ServiceError):
        if cls.on_the_wire:
            table.setdefault(cls.status_code, []).append(cls)
    return dict(sorted(table.items()))


def status_summary(classes: list[type[ServiceError]]) -> str:
    """What a status means: the summary of its most general class (the first defined)."""
    return classes[0].summary


def error_for_status(status: int, message: str, headers: Mapping[str, str] | None = None) -> ServiceError:
    """The error a framework-level HTTP status (404 route, 405 method) stands for."""
    by_status: dict[int, type[ServiceError]] = {404: NotFound, 405: MethodNotAllowed}
    cls = by_status.get(status) or (InvalidInput if 400 <= status < 500 else ServiceError)
    return cls(message, headers=dict(headers or {}))


# Location parts that name a branch of a union (``temperature.constrained-float``), not a field.
_UNION_BRANCH = re.compile(r"(constrained-)?(float|int|str|bool|list\[.*\]|dict\[.*\]|function-.*|is-instance\[.*\])")


def describe_validation(errors: Iterable[Mapping[str, Any]], *, skip: tuple[str, ...] = ()) -> str:
    """Pydantic-style validation errors as one sentence a client can act on: ``where: what; ...``
    (the first five places, from the first 50 errors: a million of them cost the event loop seconds).
    ``skip`` drops location parts that say nothing (FastAPI's ``body``); a union's branches are one
    place ("temperature: Input should be less than or equal to 2", not that once for
    ``constrained-float`` and again for ``constrained-int``), and a bound there is said without the
    other branch's "should be a valid integer"."""
    places: dict[str, list[tuple[str, str]]] = {}
    for err in itertools.islice(errors, 50):
        loc = [str(p) for p in err.get("loc", ()) if p not in skip]
        while loc and _UNION_BRANCH.fullmatch(loc[-1]):
            loc.pop()
        found = places.setdefault(".".join(loc) or "body", [])
        entry = (str(err.get("type", "")), str(err.get("msg", "invalid")))
        if entry[1] not in (m for _, m in found):
            found.append(entry)
    parts = []
    for where, found in list(places.items())[:5]:
        bounds = [m for kind, m in found if not kind.endswith("_type")]
        parts.append(f"{where}: {' or '.join(bounds or [m for _, m in found])}")
    return "; ".join(parts) or "does not match the schema"
