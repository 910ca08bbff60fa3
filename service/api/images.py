"""Reading the images of a request, shared by the image task endpoints: multipart files (``files``)
or JSON with base64 images (``images``), with the same limits and errors either way."""

from __future__ import annotations

import contextlib
import re
import threading
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service import imaging
from service.api.schemas import inline_schema, is_json_media, media_type, parse_body
from service.config import Settings
from service.errors import ImageTooLarge, InvalidInput, SchemaError, TooManyItems, UnsupportedMediaType
from service.memory import release_memory

Blobs = list[tuple[str, bytes]]  # (name for error messages, file bytes)
T = TypeVar("T")
# After a request this large, freed image memory is handed back to the system at once.
_TRIM_AFTER_PIXELS = 4_000_000
_INLINE_DECODE_BYTES = 8 * 1024
_IMAGE_FIELDS = ("images", "image")  # the JSON fields that multipart sends as files


async def read_images(request: Request, settings: Settings, json_model: type[BaseModel]) -> tuple[Blobs, dict]:
    """The image files and the other fields (form fields as strings, JSON fields as parsed)."""
    content_type = media_type(request)
    if content_type == "multipart/form-data":
        return await _read_multipart(request, settings, json_model)
    if is_json_media(content_type):
        return _read_json(await request.body(), settings, json_model)
    raise UnsupportedMediaType(
        f"content type {content_type!r} is not accepted; send multipart/form-data files or application/json"
    )


async def _read_multipart(request: Request, settings: Settings, json_model: type[BaseModel]) -> tuple[Blobs, dict]:
    try:
        form = await request.form(max_files=settings.max_images_per_request + 1, max_fields=16)
    except HTTPException as exc:  # Starlette's multipart errors (too many files, malformed body)
        raise InvalidInput(f"multipart body rejected: {exc.detail}") from None
    try:
        uploads = [f for key in ("files", "file") for f in form.getlist(key)]
        if not uploads:
            raise SchemaError("multipart body has no 'files' part")
        if len(uploads) > settings.max_images_per_request:
            raise TooManyItems(f"{len(uploads)} images; at most {settings.max_images_per_request} per request")
        blobs = []
        for i, upload in enumerate(uploads):
            if not isinstance(upload, UploadFile):
                raise SchemaError(f"files[{i}] must be a file part, not a text field")
            data = await upload.read(settings.max_image_bytes + 1)
            blobs.append((f"files[{i}] ({upload.filename})", data))
        fields: dict[str, str] = {}
        allowed = set(json_model.model_fields) - set(_IMAGE_FIELDS)
        for key, value in form.multi_items():
            if key in ("files", "file"):
                continue
            if key not in allowed:  # as in JSON: a misspelt field must not be silently ignored
                raise SchemaError(f"{key}: unknown form field; this endpoint takes files and {sorted(allowed)}")
            if key in fields:
                raise SchemaError(f"{key}: given more than once")
            if not isinstance(value, str):
                raise SchemaError(f"{key}: must be a text field, not a file")
            if _numeric(json_model, key) and not _FORM_NUMBER.fullmatch(value.strip()):
                # pydantic reads "1_0" as 10 and full-width "１０" as 10, as Python's int() does
                raise SchemaError(f"{key}: {value[:20]!r} is not a number written in ASCII digits")
            fields[key] = value
        return blobs, fields
    finally:
        await form.close()  # spooled temporary files


_FORM_NUMBER = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _numeric(model: type[BaseModel], key: str) -> bool:
    annotation = model.model_fields[key].annotation
    kinds = {annotation, *typing.get_args(annotation)}
    return bool(kinds & {int, float}) and str not in kinds


def _read_json(body: bytes, settings: Settings, json_model: type[BaseModel]) -> tuple[Blobs, dict]:
    request: Any = parse_body(body, json_model)
    if len(request.images) > settings.max_images_per_request:
        raise TooManyItems(f"{len(request.images)} images; at most {settings.max_images_per_request} per request")
    blobs = [(f"images[{i}]", imaging.decode_base64(text, i)) for i, text in enumerate(request.images)]
    return blobs, request.model_dump(exclude={"images"}, exclude_none=True)


def request_doc(json_model: type[BaseModel], *, files: tuple[int, int] | None = None) -> dict[str, Any]:
    """OpenAPI for an image endpoint: the JSON body, or multipart ``files`` (``files``: how many,
    at least and at most, when the endpoint takes a fixed number) plus the same fields, required
    as in JSON."""
    schema = inline_schema(json_model)
    fields = {k: v for k, v in schema["properties"].items() if k not in _IMAGE_FIELDS}
    parts: dict[str, Any] = {"type": "array", "items": {"type": "string", "format": "binary"}}
    if files is not None:
        parts.update(minItems=files[0], maxItems=files[1])
    required = ["files", *(k for k in schema.get("required", []) if k not in _IMAGE_FIELDS)]
    multipart = {"type": "object", "required": required, "properties": {"files": parts, **fields}}
    content = {
        "application/json": {"schema": schema},
        "multipart/form-data": {"schema": multipart},
    }
    return {"requestBody": {"required": True, "content": content}}


def decode_inline(blobs: Blobs, settings: Settings) -> bool:
    """Whether a request's images are small enough to decode on the event loop: their pixels,
    read from the headers, at most ``inline_decode_pixels`` together. For a 28x28 PNG the hop to
    a worker thread cost more than the decoding (0.26 ms), and with 64 clients the worker threads'
    many short numpy calls queued on the GIL: the image endpoint served 490 requests/s with them,
    against a one-thread ceiling of 3,800 (bench/run.py). A header that cannot be read is left to
    the worker thread, which reports it, and so are files over 8 KB together, whatever their
    pixels: Pillow walks a file's chunks and markers in Python, and 256 KB of empty JPEG markers
    around a 28x28 digit cost the loop far more than the digit (a 28x28 digit PNG is under 1 KB)."""
    if sum(len(data) for _, data in blobs) > _INLINE_DECODE_BYTES:
        return False
    total = 0
    for name, data in blobs:
        try:
            width, height = imaging.open_image(
                data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels, name=name
            ).size
        except Exception:  # decode_each says what is wrong with it
            return False
        total += width * height
        if total > settings.inline_decode_pixels:
            return False
    return True


def decode_each(
    blobs: Blobs,
    settings: Settings,
    slots: threading.Semaphore | contextlib.AbstractContextManager,
    prepare: Callable[[imaging.Decoded], T],
    *,
    reduce_to: int | None = None,
) -> list[T]:
    """Every file decoded (upright, a JPEG at a reduced scale when ``reduce_to`` allows) and turned
    by ``prepare`` into what the model takes, one at a time, in order.

    Memory cannot be amplified: every header is read first and the request's pixels summed against
    ``max_request_pixels`` (a 35 KB PNG can hold 36 megapixels); then only one full-size image of
    the request lives at a time, and ``slots`` bounds how many decode at once in the whole server.
    Runs in a worker thread."""
    total = 0
    for name, data in blobs:
        width, height = imaging.open_image(
            data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels, name=name
        ).size
        total += width * height
    if total > settings.max_request_pixels:
        raise ImageTooLarge(
            f"the request's {len(blobs)} images hold {total} pixels; the limit is {settings.max_request_pixels} "
            "per request (send fewer or smaller images)"
        )
    out = []
    for name, data in blobs:
        with slots:
            decoded = imaging.decode(
                data,
                max_bytes=settings.max_image_bytes,
                max_pixels=settings.max_image_pixels,
                name=name,
                reduce_to=reduce_to,
            )
            out.append(prepare(decoded))
            del decoded
    if total > _TRIM_AFTER_PIXELS:
        release_memory()
    return out
