"""Fast JSON responses.

:class:`ModelResponse` is what task routes return: their response model, serialised by pydantic's
own (Rust) serialiser straight to bytes, so the body on the wire is exactly the documented schema.
:class:`JSONResponse` (orjson, numpy arrays without a Python-list detour) carries the Open Inference
Protocol's tensors and the error shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse as _StarletteJSONResponse
from starlette.responses import Response


class JSONResponse(_StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


class ModelResponse(Response):
    media_type = "application/json"

    def __init__(
        self,
        content: BaseModel,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        super().__init__(content, status_code, headers, background=background)

    def render(self, content: Any) -> bytes:
        return content.__pydantic_serializer__.to_json(content)
