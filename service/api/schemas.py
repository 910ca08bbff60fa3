"""What every endpoint shares on the wire: the error shape and its OpenAPI table (generated from
``service.errors``), JSON body parsing, and the limits on texts. Each task's request and response
models live in its route module."""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import Request

from service.errors import (
    InvalidInput,
    SchemaError,
    ServiceError,
    TextTooLong,
    TooManyItems,
    UnsupportedMediaType,
    describe_validation,
    status_summary,
    wire_errors,
)
from service.protocol import parse_json, without_bom

# A 28x28 PNG of a handwritten 7 (from the MNIST test set), for the docs' "try it out".
SEVEN_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAAwUlEQVR42mNgGDaAEUKFpD77sfTFHeyS9xQYGBg+"
    "X4UKPuk6w8DAwMDAAuGm6l/TMnSweCzLwPDntSTDozPIOhkYGBgYBA3PmDIw/Lh1XShnGi5nBP+9KIRLTuzl/2Ao"
    "kwlDMlv0/U1cGq1//rPD6fHWf7tZcclxnv1hhVNj3b9tOOW8f3+wxCUnfPffMlxyzKf/3VbGJan2758vLjn5B/+K"
    "GXF78Z8JLjnbT+iSSGFrw8Nw9wuKJAsy56LzO+ITGABpETyQcCy90wAAAABJRU5ErkJggg=="
)

_WIRE_ERRORS = wire_errors()
ErrorType = Literal[tuple(cls.error_type for classes in _WIRE_ERRORS.values() for cls in classes)]  # type: ignore[valid-type]


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, in a sentence.")
    error_type: ErrorType = Field(description="Stable machine-readable kind (one class in service/errors.py).")


def _error_doc(status: int, table: dict[int, list[type[ServiceError]]] = _WIRE_ERRORS) -> dict:
    classes = table[status]
    types = ", ".join(f"`{cls.error_type}`" for cls in classes)
    examples = {cls.error_type: {"value": {"error": cls.summary, "error_type": cls.error_type}} for cls in classes}
    return {
        "model": ErrorResponse,
        "description": f"{status_summary(classes)}. error_type: {types}",
        "content": {"application/json": {"examples": examples}},
    }


# Every error a client can receive, by status, from the classes in service/errors.py.
ERROR_RESPONSES = {status: _error_doc(status) for status in _WIRE_ERRORS}

# On the Open Inference Protocol's routes a schema error is a 400, as its spec documents
# (service.api.handlers.error_status); what else is a 422 (no face) is not theirs.
_V2_WIRE_ERRORS = {
    status: [cls for cls in classes if not issubclass(cls, SchemaError)] + ([SchemaError] if status == 400 else [])
    for status, classes in _WIRE_ERRORS.items()
    if status != 422
}
V2_ERROR_RESPONSES = {status: _error_doc(status, _V2_WIRE_ERRORS) for status in _V2_WIRE_ERRORS}


M = TypeVar("M", bound=BaseModel)


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower case ("" when there is none); 415 for a
    compressed body, which no route decodes (it read as "not valid JSON" before)."""
    headers = request.headers
    # Every occurrence: a second header ("identity", then "gzip") is as binding as the first.
    for encoding in headers.getlist("content-encoding"):
        if encoding.strip().lower() not in ("identity", ""):
            raise UnsupportedMediaType(
                f"Content-Encoding {encoding[:40]!r} is not accepted; send the body uncompressed"
            )
    for transfer in headers.getlist("transfer-encoding"):
        if transfer.replace(" ", "").lower() != "chunked":
            raise UnsupportedMediaType(f"Transfer-Encoding {transfer[:40]!r} is not accepted; only chunked")
    return headers.get("content-type", "").split(";")[0].strip().lower()


def is_json_media(kind: str) -> bool:
    """No Content-Type (curl without -H, Triton's own client) or a JSON one. Not text/plain, forms or
    multipart: those are what a page on another origin can send without a CORS preflight."""
    return kind in ("", "application/json") or (kind.startswith("application/") and kind.endswith("+json"))


async def read_json(request: Request, model: type[M], *, optional: bool = False) -> M:
    """A JSON route's body into ``model``: 415 for another media type, 400 when it is not JSON,
    422 when its shape is wrong. ``optional``: an empty body reads as ``{}``."""
    kind = media_type(request)
    if not is_json_media(kind):
        raise UnsupportedMediaType(f"content type {kind!r} is not accepted; send application/json")
    body = await request.body()
    empty = not without_bom(body)  # a body of only a byte-order mark is empty too
    return parse_body(b"{}" if empty and optional else body, model)


def parse_body(body: bytes, model: type[M]) -> M:
    """A JSON request body into ``model``: 400 when it is not JSON, 422 when its shape is wrong."""
    try:
        return model.model_validate(parse_json(body))
    except ValidationError as exc:
        errors = exc.errors()
        where = errors[0].get("loc", ()) if errors else ()
        raise SchemaError(describe_validation(errors), param=str(where[0]) if where else None) from None


def validate(model: type[M], fields: dict) -> M:
    """Fields already read (a multipart form's, a JSON body's) into ``model``: 422 when wrong."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise SchemaError(describe_validation(exc.errors())) from None


# What does not show on its own: white space, control and format characters (zero-width space,
# soft hyphen, BOM, tags), unassigned code points, combining marks with nothing to combine with,
# and the blank letters and fillers Unicode files as letters or symbols.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cn", "Cs", "Zs", "Zl", "Zp", "Mn", "Me"})
_BLANKS = frozenset("\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0\ufffc")
_PLAIN = re.compile(r"[0-9A-Za-z\u4e00-\u9fff]")  # the common case, found without a per-character loop


def has_visible(text: str) -> bool:
    """Whether ``text`` holds anything to read: "\u200b", "\ufeff" or "\U000e0020" alone
    tokenised to nothing, and the classifier answered a guess with a 200."""
    if _PLAIN.search(text) is not None:
        return True
    category = unicodedata.category
    return any(c not in _BLANKS and category(c) not in _INVISIBLE_CATEGORIES for c in text)


def check_texts(texts: list[str], max_texts: int, max_chars: int) -> None:
    """The limits every text endpoint applies: how many texts, none empty, none too long."""
    if len(texts) > max_texts:
        raise TooManyItems(f"{len(texts)} texts; at most {max_texts} per request")
    for i, text in enumerate(texts):
        if not has_visible(text):
            raise InvalidInput(f"texts[{i}] is empty (nothing but white space, control or invisible characters)")
        if len(text) > max_chars:
            raise TextTooLong(f"texts[{i}] has {len(text)} characters; the limit is {max_chars}")


def inline_schema(model: type[BaseModel]) -> dict:
    """``model``'s JSON schema with its ``$defs`` inlined: placed inside the OpenAPI document, a
    ``#/$defs/...`` reference would point at the document's root, where nothing is."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: object) -> object:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve({**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)  # type: ignore[return-value]


def json_body_doc(model: type[BaseModel], *, required: bool = True) -> dict:
    """OpenAPI for a route that parses its JSON body itself (with ``read_json``)."""
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": inline_schema(model)}}}}


# Limits set by the server's settings, stated in its OpenAPI document with the values it runs with.
LIMIT_KEY = "x-neuroserve-limit"


def limit(setting: str, *, items: str | None = None) -> dict[str, Any]:
    """``json_schema_extra`` for a field bounded by ``Settings.<setting>`` (and each item of a list
    by ``Settings.<items>``): :func:`apply_limits` writes the configured values into the schema."""
    return {LIMIT_KEY: setting} if items is None else {LIMIT_KEY: setting, LIMIT_KEY + "-items": items}


def apply_limits(document: Any, settings: Any) -> Any:
    """Every field marked by :func:`limit` gets the running server's value: ``maxItems`` for a list,
    ``maxLength`` for a string, ``maximum`` for a number (and ``maxLength`` for a list's strings)."""
    if isinstance(document, dict):
        name = document.pop(LIMIT_KEY, None)
        items = document.pop(LIMIT_KEY + "-items", None)
        if name is not None:
            kind = document.get("type")
            key = {"array": "maxItems", "string": "maxLength"}.get(kind, "maximum")
            document[key] = getattr(settings, name)
            note = f"At most {getattr(settings, name)} on this server (NEUROSERVE_{name.upper()})."
            document["description"] = f"{document.get('description', '').rstrip()} {note}".strip()
        if items is not None and isinstance(document.get("items"), dict):
            document["items"]["maxLength"] = getattr(settings, items)
        for value in document.values():
            apply_limits(value, settings)
    elif isinstance(document, list):
        for value in document:
            apply_limits(value, settings)
    return document


def protocol_statuses(document: dict) -> dict:
    """The Open Inference Protocol's routes answer no 422 (a schema error there is a 400); FastAPI
    adds its own 422 "Validation Error" to every route with parameters whose responses lack one, so
    it is taken out of those routes, and its schemas with it once nothing refers to them."""
    for path, item in document.get("paths", {}).items():
        if path == "/v2" or path.startswith("/v2/"):
            for operation in item.values():
                if isinstance(operation, dict):
                    operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        text = orjson.dumps({k: v for k, v in document.items() if k != "components"}).decode()
        others = orjson.dumps({k: v for k, v in schemas.items() if k != name}).decode()
        if name in schemas and f"#/components/schemas/{name}" not in text + others:
            del schemas[name]
    return document
