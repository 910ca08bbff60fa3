"""Face recognition endpoints: embeddings, verification, and a gallery to identify people against.

* ``POST /v1/face-embeddings``: images in, one unit vector per face out;
* ``POST /v1/face-verification``: two images in, whether they show one person;
* ``POST /v1/faces``, ``GET /v1/faces``, ``DELETE /v1/faces/{id}``, ``DELETE /v1/faces?person=``:
  the gallery (vectors only, never images), and ``POST /v1/face-identification`` against it.
  These need the ``admin`` scope when keys are configured (names and faces are personal data).

Every image is either an aligned face (``aligned: true``: its face square is the model's crop of
the whole image) or a photo in which the model's face detector finds the faces (the default when
the model has one); the largest face is used unless ``all_faces`` asks for every one.
"""

from __future__ import annotations

import logging
import threading
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from PIL import Image
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from service import imaging
from service.api.deps import RegistryDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.images import Blobs, decode_each, read_images, request_doc
from service.api.schemas import (
    ERROR_RESPONSES,
    SEVEN_PNG_BASE64,
    has_visible,
    is_json_media,
    limit,
    media_type,
    read_json,
    validate,
)
from service.config import Settings
from service.errors import ModelNotReady, NoFace, NotFound, SchemaError, ServiceError
from service.gallery import Gallery
from service.registry import ModelRegistry, ServedModel
from service.responses import ModelResponse
from service.tasks import face_embedding as task
from service.tasks import object_detection

router = APIRouter(tags=["face recognition"])
log = logging.getLogger(__name__)

# Photos are kept, for cutting faces out after detection, at most this large (a face a tenth of
# the photo's side still has 64 pixels, the network's input).
_KEEP_SIDE = 640
# A detected face narrower than this (in the photo's pixels) is not read: nothing to recognise.
_MIN_FACE_PX = 12
# Faces per image with all_faces (the best-scored): 64 images of a crowd stay 640 crops, about 31 MB.
_MAX_FACES = 10
_ALIGNED_DOC = (
    "true: each image is an aligned face (an LFW-style portrait; its face square is the model's crop of the "
    "whole image); false: find the faces with the model's face detector. Default: false when the model has a "
    "detector, else true."
)


# Bidirectional controls can make one name display as another (U+202E turns "ada" around); other
# format characters (ZWNJ in Persian names, ZWJ in emoji) are part of real names and stay.
_BIDI_CONTROLS = set("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u061c")


def _printable(name: str) -> str:
    """A person's name as stored and compared: NFC (so "José" typed on any system is one person),
    with no control character and no bidirectional override."""
    name = unicodedata.normalize("NFC", name)
    if any(unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS for c in name):
        raise ValueError("a name may not hold control characters or bidirectional overrides")
    if not has_visible(name):
        raise ValueError("a name needs a visible character (not only zero-width or format characters)")
    return name


PersonName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), AfterValidator(_printable)
]


# ------------------------------------------------------------------------------------------ models


class FaceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="A face-embedding model; default: the task's default model.")
    aligned: bool | None = Field(None, description=_ALIGNED_DOC)


class EmbeddingsOptions(FaceOptions):
    all_faces: bool = Field(
        False,
        description="Every face the detector finds in a photo (at most 10 per image, the best-scored), not only "
        "the largest; an image with no face then has no entry instead of failing the request with no_face.",
    )


class FaceEmbeddingsRequest(EmbeddingsOptions):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"images": [SEVEN_PNG_BASE64], "aligned": True}]}
    )
    images: list[str] = Field(
        min_length=1,
        json_schema_extra=limit("max_images_per_request"),
        description="Base64-encoded image files (PNG, JPEG, WebP, BMP, GIF); data URLs accepted.",
    )


class VerificationOptions(FaceOptions):
    threshold: float | None = Field(
        None, ge=-1, le=1, description="Cosine at which two faces count as one person; default: the model's."
    )


class FaceVerificationRequest(VerificationOptions):
    model_config = ConfigDict(extra="forbid", strict=True)
    images: list[str] = Field(min_length=2, max_length=2, description="Exactly two base64-encoded images.")


class EnrolOptions(FaceOptions):
    person: PersonName = Field(description="Who the face is (any label you choose: a name, a user id).")


class EnrolRequest(EnrolOptions):
    model_config = ConfigDict(extra="forbid", strict=True)
    image: str = Field(description="A base64-encoded image file with the person's face.")


class IdentifyOptions(FaceOptions):
    threshold: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Cosine a match must reach for same_person; default: the model's identification threshold "
        "(1 % of held-out pairs of two different people reach it).",
    )
    k: int = Field(
        5, ge=1, json_schema_extra=limit("max_gallery_matches"), description="Matches to return, best first."
    )


class IdentifyRequest(IdentifyOptions):
    model_config = ConfigDict(extra="forbid", strict=True)
    image: str = Field(description="A base64-encoded image file with the face to look for.")


class FaceBox(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float
    score: float | None = Field(
        description="The face detector's score; null when the image was taken as an aligned face."
    )


class FaceVector(BaseModel):
    image: int = Field(description="Index of the image in the request.")
    face: FaceBox = Field(description="The face square, in the pixels of the image as sent.")
    embedding: list[float]


class FaceEmbeddingsResponse(BaseModel):
    model: str
    version: str
    dimensions: int
    embeddings: list[FaceVector] = Field(description="Per image in request order, largest face first.")


class FaceVerificationResponse(BaseModel):
    model: str
    version: str
    same_person: bool
    score: float = Field(description="Cosine of the two faces' vectors, in [-1, 1].")
    threshold: float
    faces: list[FaceBox]


class GalleryEntry(BaseModel):
    id: str
    person: str
    model: str = Field(description="name/version of the model whose vector this is.")
    created: str


class EnrolResponse(GalleryEntry):
    face: FaceBox


class GalleryList(BaseModel):
    faces: list[GalleryEntry]
    total: int
    limit: int
    offset: int


class Deleted(BaseModel):
    deleted: int = Field(description="How many gallery entries (face vectors) were deleted.")


class GalleryMatch(BaseModel):
    person: str
    id: str
    score: float
    same_person: bool = Field(
        description="The score reaches the identification threshold: about 1 % of pairs of two different people "
        "do, so in a gallery of N people a stranger's best match passes far more often (N = 20: about 18 %). "
        "A hint to look, not proof of identity."
    )


class IdentifyResponse(BaseModel):
    model: str
    version: str
    face: FaceBox
    threshold: float
    matches: list[GalleryMatch] = Field(description="Best first; entries of this model only.")


# ------------------------------------------------------------------------------------------- faces


class _Photo:
    """One decoded image: an aligned face already cut (nothing else kept), or, for the detector,
    its letterboxed input and the photo (at most ``_KEEP_SIDE``) that faces are cut from after."""

    def __init__(
        self,
        decoded: imaging.Decoded,
        side: int,
        crop: tuple[float, float, float, float],
        detector_size: int | None,
        pad_value: float,
    ) -> None:
        self.width, self.height = decoded.width, decoded.height
        image = imaging.to_rgb(decoded.image)
        self.image: Image.Image | None = None
        self.letterbox = None
        self.aligned: np.ndarray | None = None
        if detector_size is None:
            face = task.aligned_face(self.width, self.height, crop)
            self.aligned = task.cut(image, face, (self.width, self.height), side)
            return
        if max(image.size) > _KEEP_SIDE:
            image.thumbnail((_KEEP_SIDE, _KEEP_SIDE), Image.Resampling.BILINEAR)
        self.image = image
        self.letterbox = object_detection.letterbox(image, detector_size, pad_value, original=(self.width, self.height))


def _detector(registry: ModelRegistry, parameters: task.FaceEmbeddingParameters) -> tuple[ServedModel, int]:
    """The face detector and the index of its face class."""
    try:
        detector = registry.get(parameters.detector)  # type: ignore[arg-type]
    except ServiceError as exc:
        raise ModelNotReady(
            f"the face detector {parameters.detector!r} is not serving ({exc.message}); send aligned faces "
            "(aligned: true) meanwhile"
        ) from None
    labels = detector.spec.labels or []
    if detector.spec.task != object_detection.TASK.name or (task.FACE_LABEL not in labels and len(labels) > 1):
        raise ModelNotReady(
            f"the face detector {parameters.detector!r} is not an object-detection model "
            f"with a {task.FACE_LABEL!r} label"
        )
    return detector, labels.index(task.FACE_LABEL) if task.FACE_LABEL in labels else 0


def _faces_found(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    face_class: int,
    letterbox: object_detection.Letterbox,
    min_score: float,
) -> list[task.Face]:
    """One photo's faces, largest first: the face class only (other classes neither count nor
    suppress a face), suppressed among themselves, and none too small to read (a box in the
    letterbox's padding maps to nothing)."""
    keep = classes == face_class
    kept = object_detection.detections(
        boxes[keep],
        scores[keep],
        classes[keep],
        letterbox,
        [task.FACE_LABEL] * (face_class + 1),
        score_threshold=min_score,
        iou_threshold=0.4,
        max_detections=_MAX_FACES,
    )
    faces = []
    for d in kept:
        b = d["box"]
        if min(b["x2"] - b["x1"], b["y2"] - b["y1"]) >= _MIN_FACE_PX:
            faces.append(task.square(b["x1"], b["y1"], b["x2"], b["y2"], d["score"]))
    return sorted(faces, key=lambda f: -f.area)


@dataclass(frozen=True)
class _Tile:
    """A part of a photo, letterboxed for the detector, and where it sits in the photo's pixels."""

    letterbox: tuple[np.ndarray, object_detection.Letterbox]
    left: float
    top: float

    def shift(self, face: task.Face) -> task.Face:
        return task.Face(face.x1 + self.left, face.y1 + self.top, face.x2 + self.left, face.y2 + self.top, face.score)


def _tiles(photo: _Photo, size: int, pad: float) -> list[_Tile]:
    """Four overlapping corners of the photo, each 60 % of its width and height: a face that is a
    few pixels in the whole photo's letterbox is about twice as large in a tile's (a face at a tenth
    of a phone photo's width is found: tests/test_face_recognition.py; photos without people still
    find none there). Runs only for a photo in which the whole found no face."""
    image: Image.Image = photo.image  # type: ignore[assignment]
    w, h = image.size
    tw, th = round(w * 0.6), round(h * 0.6)
    scale = w / photo.width  # kept pixels per original pixel
    out = []
    for left in (0, w - tw):
        for top in (0, h - th):
            part = image.crop((left, top, left + tw, top + th))
            box = object_detection.letterbox(part, size, pad, original=(tw / scale, th / scale))
            out.append(_Tile(box, left / scale, top / scale))
    return out


def _distinct(faces: list[task.Face], iou: float = 0.4) -> list[task.Face]:
    """Faces found twice (in two overlapping tiles) kept once, the better-scored; largest first."""
    if not faces:
        return []
    boxes = np.array([[f.x1, f.y1, f.x2, f.y2] for f in faces], dtype=np.float64)
    scores = np.array([f.score or 0.0 for f in faces], dtype=np.float64)
    kept, _ = object_detection.suppress(boxes, scores, np.zeros(len(faces), dtype=np.int64), iou)
    return sorted((faces[i] for i in kept.tolist()), key=lambda f: -f.area)


async def _embed(
    request: Request,
    registry: ModelRegistry,
    settings: Settings,
    blobs: Blobs,
    options: FaceOptions,
    *,
    all_faces: bool = False,
) -> tuple[ServedModel, list[list[tuple[task.Face, np.ndarray]]], dict[str, str]]:
    """Each image's faces (largest first; only the largest unless ``all_faces``) with their vectors,
    and the embedding run's timing headers."""
    served = registry.for_task(task.TASK.name, options.model)
    parameters: task.FaceEmbeddingParameters = served.parameters  # type: ignore[assignment]
    aligned = options.aligned if options.aligned is not None else parameters.detector is None
    if not aligned and parameters.detector is None:
        raise SchemaError(f"aligned: model {served.name} has no face detector; send aligned faces (aligned: true)")
    detector, face_class = (None, 0) if aligned else _detector(registry, parameters)
    det_parameters: Any = detector.parameters if detector is not None else None
    size = object_detection.TASK.input_size(detector.spec, det_parameters) if detector is not None else None
    pad = det_parameters.pad_value if detector is not None else 0.0
    side = task.TASK.side(served.spec)

    def decode() -> list[_Photo]:
        return decode_each(
            blobs,
            settings,
            request.app.state.decode_slots,
            lambda decoded: _Photo(decoded, side, parameters.crop, size, pad),
            reduce_to=_KEEP_SIDE,
        )

    photos = await run_in_threadpool(decode)
    if detector is None:
        faces = [[task.aligned_face(p.width, p.height, parameters.crop)] for p in photos]
        crops = np.stack([p.aligned for p in photos])  # type: ignore[misc]
    else:
        batch = np.stack([p.letterbox[0] for p in photos])  # type: ignore[index]
        found = await unless_disconnected(request, detector.infer_rows({detector.spec.inputs[0].name: batch}))
        boxes, scores, classes = (found.outputs[t.name] for t in detector.spec.outputs)
        seen = [
            _faces_found(boxes[i], scores[i], classes[i], face_class, p.letterbox[1], parameters.detector_score)  # type: ignore[index]
            for i, p in enumerate(photos)
        ]
        missed = [i for i, these in enumerate(seen) if not these and max(photos[i].image.size) > size]  # type: ignore[union-attr,operator]
        if missed:  # a face small in a large photo: look again, tile by tile
            tiles = [(i, tile) for i in missed for tile in _tiles(photos[i], size, pad)]  # type: ignore[arg-type]
            batch = np.stack([tile.letterbox[0] for _, tile in tiles])
            again = await unless_disconnected(request, detector.infer_rows({detector.spec.inputs[0].name: batch}))
            t_boxes, t_scores, t_classes = (again.outputs[t.name] for t in detector.spec.outputs)
            for k, (i, tile) in enumerate(tiles):
                found_here = _faces_found(
                    t_boxes[k], t_scores[k], t_classes[k], face_class, tile.letterbox[1], parameters.detector_score
                )
                seen[i] += [tile.shift(face) for face in found_here]
            for i in missed:
                seen[i] = _distinct(seen[i])
        faces = []
        for i, these in enumerate(seen):
            if not these and all_faces:
                faces.append([])
                continue
            if not these:
                raise NoFace(
                    f"{blobs[i][0]}: no face found (none the detector scored {parameters.detector_score} or more); "
                    "send a photo with a face, or an aligned face with aligned: true"
                )
            faces.append(these if all_faces else these[:1])

        def cut() -> np.ndarray:
            return np.stack(
                [
                    task.cut(p.image, f, (p.width, p.height), side)  # type: ignore[arg-type]
                    for p, fs in zip(photos, faces, strict=True)
                    for f in fs
                ]
            )

        if not any(faces):  # all_faces, and no image has one: nothing to run
            return served, faces, {}
        crops = await run_in_threadpool(cut)
    result = await unless_disconnected(request, served.infer_rows({served.spec.inputs[0].name: crops}))
    vectors = result.outputs[served.spec.outputs[0].name]
    out, at = [], 0
    for fs in faces:
        out.append([(f, vectors[at + j]) for j, f in enumerate(fs)])
        at += len(fs)
    return served, out, result.timing_headers()


def _box(face: task.Face) -> FaceBox:
    return FaceBox(
        x1=round(face.x1, 2),
        y1=round(face.y1, 2),
        x2=round(face.x2, 2),
        y2=round(face.y2, 2),
        score=None if face.score is None else round(face.score, 6),
    )


async def _read_one(request: Request, settings: Settings, json_model: type[BaseModel]) -> tuple[Blobs, dict]:
    """One image: a multipart file (and form fields) or JSON with a base64 ``image``."""
    if is_json_media(media_type(request)):
        body: Any = await read_json(request, json_model)
        return [("image", imaging.decode_base64(body.image, 0))], body.model_dump(exclude={"image"}, exclude_none=True)
    blobs, fields = await read_images(request, settings, json_model)
    if len(blobs) != 1:
        raise SchemaError(f"send exactly one image file, got {len(blobs)}")
    return blobs, fields


_gallery_lock = threading.Lock()


def _gallery(request: Request) -> Gallery:
    """The app's gallery, opened on first use (a server without faces never creates the file)."""
    state = request.app.state
    with _gallery_lock:
        if getattr(state, "gallery", None) is None:
            state.gallery = Gallery(state.settings.gallery_path)
        return state.gallery


_PERSON = TypeAdapter(PersonName)


def _person(value: str) -> str:
    """A ``person`` query parameter, read as enrolment reads a name (stripped, printable, not blank)."""
    try:
        return _PERSON.validate_python(value)
    except ValidationError as exc:
        raise SchemaError(f"person: {exc.errors()[0]['msg']}") from None


def _model_key(served: ServedModel) -> str:
    return f"{served.name}/{served.version}"


# ------------------------------------------------------------------------------------------ routes


@router.post(
    "/v1/face-embeddings",
    summary="Face vectors of images (multipart files or base64 JSON)",
    response_model=FaceEmbeddingsResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=request_doc(FaceEmbeddingsRequest),
)
async def embeddings(request: Request, registry: RegistryDep, settings: SettingsDep) -> ModelResponse:
    blobs, fields = await read_images(request, settings, FaceEmbeddingsRequest)
    options = validate(EmbeddingsOptions, fields)
    served, faces, headers = await _embed(request, registry, settings, blobs, options, all_faces=options.all_faces)
    items = [
        FaceVector(image=i, face=_box(face), embedding=[round(float(v), 6) for v in vector])
        for i, these in enumerate(faces)
        for face, vector in these
    ]
    dims = served.spec.outputs[0].shape[1]
    return ModelResponse(
        FaceEmbeddingsResponse(model=served.name, version=str(served.version), dimensions=dims, embeddings=items),
        headers=headers,
    )


@router.post(
    "/v1/face-verification",
    summary="Whether two images show the same person",
    response_model=FaceVerificationResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=request_doc(FaceVerificationRequest, files=(2, 2)),
)
async def verify(request: Request, registry: RegistryDep, settings: SettingsDep) -> ModelResponse:
    blobs, fields = await read_images(request, settings, FaceVerificationRequest)
    if len(blobs) != 2:
        raise SchemaError(f"send exactly two images, got {len(blobs)}")
    options = validate(VerificationOptions, fields)
    served, faces, headers = await _embed(request, registry, settings, blobs, options)
    (a, va), (b, vb) = faces[0][0], faces[1][0]
    parameters: task.FaceEmbeddingParameters = served.parameters  # type: ignore[assignment]
    threshold = parameters.threshold if options.threshold is None else options.threshold
    score = task.cosine(va, vb)
    body = FaceVerificationResponse(
        model=served.name,
        version=str(served.version),
        same_person=score >= threshold,
        score=round(score, 6),
        threshold=threshold,
        faces=[_box(a), _box(b)],
    )
    return ModelResponse(body, headers=headers)


@router.post(
    "/v1/faces",
    summary="Enrol a person's face in the gallery (its vector is stored, not the image)",
    response_model=EnrolResponse,
    status_code=201,
    responses=ERROR_RESPONSES,
    openapi_extra=request_doc(EnrolRequest, files=(1, 1)),
)
async def enrol(request: Request, registry: RegistryDep, settings: SettingsDep) -> ModelResponse:
    blobs, fields = await _read_one(request, settings, EnrolRequest)
    options = validate(EnrolOptions, fields)
    served, faces, headers = await _embed(request, registry, settings, blobs, options)
    face, vector = faces[0][0]
    gallery = await run_in_threadpool(_gallery, request)
    entry = await run_in_threadpool(gallery.add, options.person, _model_key(served), vector)
    body = EnrolResponse(id=entry.id, person=entry.person, model=entry.model, created=entry.created, face=_box(face))
    return ModelResponse(body, status_code=201, headers=headers)


@router.get("/v1/faces", summary="The gallery's entries", response_model=GalleryList, responses=ERROR_RESPONSES)
async def list_faces(
    request: Request,
    person: Annotated[str | None, Query(max_length=200, description="Only this person's entries.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> ModelResponse:
    person = _person(person) if person is not None else None
    gallery = await run_in_threadpool(_gallery, request)
    entries, total = await run_in_threadpool(lambda: gallery.entries(person=person, limit=limit, offset=offset))
    faces = [GalleryEntry(id=e.id, person=e.person, model=e.model, created=e.created) for e in entries]
    return ModelResponse(GalleryList(faces=faces, total=total, limit=limit, offset=offset))


@router.delete(
    "/v1/faces/{face_id}", summary="Delete one gallery entry", response_model=Deleted, responses=ERROR_RESPONSES
)
async def delete_face(request: Request, face_id: str) -> ModelResponse:
    gallery = await run_in_threadpool(_gallery, request)
    if not await run_in_threadpool(gallery.delete, face_id):
        raise NotFound(f"no gallery entry {face_id!r}")
    return ModelResponse(Deleted(deleted=1))


@router.delete(
    "/v1/faces",
    summary="Delete every gallery entry of a person (all their face vectors)",
    response_model=Deleted,
    responses=ERROR_RESPONSES,
)
async def delete_person(
    request: Request, person: Annotated[str, Query(min_length=1, max_length=200, description="The person to forget.")]
) -> ModelResponse:
    name = _person(person)
    gallery = await run_in_threadpool(_gallery, request)
    gone = await run_in_threadpool(gallery.delete_person, name)
    if not gone:
        raise NotFound(f"no gallery entry for person {name!r}")
    return ModelResponse(Deleted(deleted=gone))


@router.post(
    "/v1/face-identification",
    summary="Who in the gallery a face is (best matches first)",
    response_model=IdentifyResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=request_doc(IdentifyRequest, files=(1, 1)),
)
async def identify(request: Request, registry: RegistryDep, settings: SettingsDep) -> ModelResponse:
    blobs, fields = await _read_one(request, settings, IdentifyRequest)
    options = validate(IdentifyOptions, fields)
    if options.k > settings.max_gallery_matches:
        raise SchemaError(f"k must be at most {settings.max_gallery_matches}, got {options.k}")
    served, faces, headers = await _embed(request, registry, settings, blobs, options)
    face, vector = faces[0][0]
    gallery = await run_in_threadpool(_gallery, request)
    matches = await run_in_threadpool(gallery.search, _model_key(served), vector, options.k)
    parameters: task.FaceEmbeddingParameters = served.parameters  # type: ignore[assignment]
    threshold = parameters.identification_threshold if parameters.identification_threshold is not None else None
    if threshold is None:
        threshold = parameters.threshold
    if options.threshold is not None:
        threshold = options.threshold
    body = IdentifyResponse(
        model=served.name,
        version=str(served.version),
        face=_box(face),
        threshold=threshold,
        matches=[
            GalleryMatch(person=m.person, id=m.id, score=round(m.score, 6), same_person=m.score >= threshold)
            for m in matches
        ],
    )
    return ModelResponse(body, headers=headers)
