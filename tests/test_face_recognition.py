"""Face recognition through HTTP with the committed models, on LFW people they never trained on (the
held-out pair folds): verification accuracy matches the offline figure, faces are found in photos,
a photo with no face is a 422, and the gallery identifies people, survives a restart, forgets whom it
is told to, belongs to admins and keeps no image."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.auth import add_key
from tests.conftest import ROOT, make_client, wait_ready
from training.face_recognition import load_pairs

MODEL = ROOT / "models" / "face-embedding"
META = json.loads(next(MODEL.glob("*/metadata.json")).read_text())
THRESHOLD = json.loads((MODEL / "model.json").read_text())["parameters"]["threshold"]
HELDOUT = META["metrics"]["heldout_folds"]


@pytest.fixture(scope="module")
def lfw(data_dir: Path) -> dict[str, dict[int, bytes]]:
    """The JPEG files of the held-out folds' people: ``{person: {0-based index: bytes}}``."""
    import tarfile

    pairs = load_pairs(data_dir / "face_recognition" / "pairs_folds1-8.txt")
    wanted = {p for k in HELDOUT for a, _, b, _ in pairs[k - 1] for p in (a, b)}
    out: dict[str, dict[int, bytes]] = {}
    for tar_path in sorted((data_dir / "face_recognition").glob("lfw-deepfunneled-part*.tar.gz")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                person = member.name.split("/")[-2] if member.isfile() else ""
                if person in wanted and member.name.endswith(".jpg"):
                    index = int(member.name.rsplit("_", 1)[1].split(".")[0]) - 1
                    out.setdefault(person, {})[index] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return out


@pytest.fixture(scope="module")
def folds(data_dir: Path) -> list[list[tuple[str, int, str, int]]]:
    pairs = load_pairs(data_dir / "face_recognition" / "pairs_folds1-8.txt")
    return [pairs[k - 1] for k in HELDOUT]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def embed(client: TestClient, blobs: list[bytes], **fields) -> np.ndarray:
    vectors = []
    for i in range(0, len(blobs), 32):
        r = client.post("/v1/face-embeddings", json={"images": [b64(b) for b in blobs[i : i + 32]], **fields})
        assert r.status_code == 200, r.text
        vectors += [e["embedding"] for e in r.json()["embeddings"]]
    return np.asarray(vectors, dtype=np.float32)


def in_a_photo(jpeg: bytes, seed: int) -> tuple[bytes, tuple[float, float, float, float]]:
    """The LFW photo placed, scaled, somewhere in a larger plain-textured scene (as a phone photo of a
    printed portrait would be), and where its face square lands."""
    rng = np.random.default_rng(seed)
    face = Image.open(io.BytesIO(jpeg)).convert("RGB")
    scale = rng.uniform(1.2, 2.0)
    side = round(250 * scale)
    w, h = side + int(rng.integers(60, 400)), side + int(rng.integers(60, 300))
    noise = rng.integers(90, 170, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    canvas = Image.fromarray(noise).resize((w, h), Image.BILINEAR)
    x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
    canvas.paste(face.resize((side, side), Image.BILINEAR), (x, y))
    buffer = io.BytesIO()
    canvas.save(buffer, "JPEG", quality=90)
    top, left, bottom, right = json.loads((MODEL / "model.json").read_text())["parameters"]["crop"]
    return buffer.getvalue(), (x + left * side, y + top * side, x + right * side, y + bottom * side)


def iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_verification_on_people_never_trained_on_matches_the_offline_figure(client, lfw, folds) -> None:
    """Every held-out pair, aligned images through HTTP, at the served threshold: the accuracy the
    metadata reports for it (same graph, same crop), and at least the issue's 85 %."""
    images = sorted({(p, i) for fold in folds for a, i, b, j in fold for p, i in ((a, i), (b, j))})
    vectors = dict(zip(images, embed(client, [lfw[p][i] for p, i in images], aligned=True), strict=True))
    pairs = [pair for fold in folds for pair in fold]
    scores = np.array([float(vectors[(a, i)] @ vectors[(b, j)]) for a, i, b, j in pairs])
    same = np.array([a == b for a, _, b, _ in pairs])
    accuracy = float(((scores >= THRESHOLD) == same).mean())
    assert abs(accuracy - META["metrics"]["verification"]["accuracy_at_threshold"]) <= 0.005
    assert accuracy >= 0.85


def test_the_verification_endpoint_says_same_person_with_the_score_and_threshold(client, lfw, folds) -> None:
    """Ten matched and ten mismatched pairs: the verdict is the score against the model's threshold,
    and matched pairs score higher on the whole (one pair can be wrong: the model is 86 %)."""
    scores = {True: [], False: []}
    for a, i, b, j in folds[0][:10] + folds[0][300:310]:
        r = client.post("/v1/face-verification", json={"images": [b64(lfw[a][i]), b64(lfw[b][j])], "aligned": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["threshold"] == THRESHOLD and body["same_person"] == (body["score"] >= THRESHOLD)
        assert len(body["faces"]) == 2 and body["faces"][0]["score"] is None  # aligned: no detector involved
        scores[a == b].append(body["score"])
    assert np.mean(scores[True]) > np.mean(scores[False]) + 0.1


def test_faces_are_found_in_photos_and_cut_where_the_aligned_crop_is(client, lfw, folds) -> None:
    """A held-out LFW photo placed anywhere in a bigger picture: the detector boxes its face square,
    and verification against the other image of the pair mostly agrees with the aligned answer."""
    matched = [p for p in folds[0][:300]][:20] + [p for p in folds[0][300:]][:20]
    overlaps, agree = [], 0
    for n, (a, i, b, j) in enumerate(matched):
        photo, truth = in_a_photo(lfw[a][i], n)
        r = client.post("/v1/face-verification", json={"images": [b64(photo), b64(lfw[b][j])]})
        assert r.status_code == 200, r.text
        box = r.json()["faces"][0]
        overlaps.append(iou((box["x1"], box["y1"], box["x2"], box["y2"]), truth))
        agree += r.json()["same_person"] == (a == b)
    assert np.median(overlaps) >= 0.7 and np.mean(np.array(overlaps) >= 0.5) >= 0.9
    assert agree / len(matched) >= 0.75


def test_a_photo_without_a_face_is_a_422_no_face(client, data_dir: Path) -> None:
    photo = (data_dir / "object_detection" / "coco128" / "images" / "val2017").glob("*.jpg")
    from training.face_scenes import backgrounds_without_people

    empty = backgrounds_without_people(data_dir / "object_detection" / "coco128", "val2017")[:3]
    assert next(photo, None) is not None and empty
    for path in empty:
        r = client.post("/v1/face-verification", json={"images": [b64(path.read_bytes()), b64(path.read_bytes())]})
        assert r.status_code == 422, r.text
        assert r.json()["error_type"] == "no_face"
    blank = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 200, 200)).save(blank, "PNG")
    r = client.post("/v1/face-embeddings", json={"images": [b64(blank.getvalue())]})
    assert r.status_code == 422 and r.json()["error_type"] == "no_face"


def test_embeddings_are_unit_vectors_one_per_image_and_multipart_works(client, lfw, folds) -> None:
    a, i, _, j = folds[0][1]
    files = [("files", ("a.jpg", lfw[a][i], "image/jpeg")), ("files", ("b.jpg", lfw[a][j], "image/jpeg"))]
    r = client.post("/v1/face-embeddings", files=files, data={"aligned": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "face-embedding" and body["dimensions"] == 128
    assert [e["image"] for e in body["embeddings"]] == [0, 1]
    vectors = np.array([e["embedding"] for e in body["embeddings"]])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_bad_requests_are_clear_4xx(client, lfw, folds) -> None:
    a, i, _, _ = folds[0][0]
    one = b64(lfw[a][i])
    cases = [
        ("/v1/face-verification", {"images": [one]}, 422, "schema_error"),
        ("/v1/face-verification", {"images": [one, one], "threshold": 2}, 422, "schema_error"),
        ("/v1/face-embeddings", {"images": ["not base64!"]}, 400, "invalid_image"),
        ("/v1/face-embeddings", {"images": [b64(b"GIF89a nonsense")]}, 415, "unsupported_image_format"),
        ("/v1/faces", {"person": "  ", "image": one}, 422, "schema_error"),
        ("/v1/faces", {"person": "\u200b\u200d", "image": one}, 422, "schema_error"),  # nothing visible
        ("/v1/faces", {"person": "x", "images": [one]}, 422, "schema_error"),
        ("/v1/face-identification", {"image": one, "k": 0}, 422, "schema_error"),
        ("/v1/face-embeddings", {"images": [one], "model": "nope"}, 404, "model_not_found"),
    ]
    for path, body, status, kind in cases:
        r = client.post(path, json=body)
        assert (r.status_code, r.json().get("error_type")) == (status, kind), (path, body, r.text)


def test_the_gallery_identifies_people_across_a_restart_and_forgets_on_request(lfw, tmp_path: Path) -> None:
    people = sorted(p for p in lfw if len(lfw[p]) >= 2)[:12]
    settings = {"gallery_path": tmp_path / "gallery.sqlite3"}
    with make_client(**settings) as first:
        wait_ready(first)
        for p in people:
            r = first.post("/v1/faces", json={"person": p, "image": b64(lfw[p][0]), "aligned": True})
            assert r.status_code == 201, r.text
            assert r.json()["person"] == p and r.json()["model"].startswith("face-embedding/")
    with make_client(**settings) as again:  # a new process's app on the same file
        wait_ready(again)
        listed = again.get("/v1/faces").json()
        assert listed["total"] == len(people)
        hits = 0
        for p in people:
            r = again.post("/v1/face-identification", json={"image": b64(lfw[p][1]), "k": 3, "aligned": True})
            assert r.status_code == 200, r.text
            hits += r.json()["matches"][0]["person"] == p
        assert hits >= 0.75 * len(people)
        gone = again.delete("/v1/faces", params={"person": people[0]})
        assert gone.status_code == 200 and gone.json() == {"deleted": 1}
        r = again.post("/v1/face-identification", json={"image": b64(lfw[people[0]][1]), "k": 20, "aligned": True})
        assert people[0] not in [m["person"] for m in r.json()["matches"]]
        # Any face but the one deleted with its person above (the listing's order is by id, random).
        one = next(f["id"] for f in listed["faces"] if f["person"] != people[0])
        assert again.delete(f"/v1/faces/{one}").status_code == 200
        assert again.delete(f"/v1/faces/{one}").status_code == 404
        assert again.get("/v1/faces").json()["total"] == len(people) - 2


def test_the_gallery_needs_the_admin_scope_and_keeps_no_image(lfw, tmp_path: Path, caplog) -> None:
    keys = tmp_path / "keys.json"
    infer = add_key(keys, "app", ["infer"], None)
    admin = add_key(keys, "ops", ["admin", "infer"], None)
    person = sorted(lfw)[0]
    image = b64(lfw[person][0])
    with make_client(api_keys_file=keys, gallery_path=tmp_path / "g.sqlite3", access_log=True) as c:
        wait_ready(c)
        caplog.set_level(logging.DEBUG)
        body = {"person": person, "image": image, "aligned": True}
        assert c.post("/v1/faces", json=body, headers={"Authorization": f"Bearer {infer}"}).status_code == 403
        assert c.get("/v1/faces", headers={"Authorization": f"Bearer {infer}"}).status_code == 403
        r = c.post("/v1/faces", json=body, headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 201, r.text
        verify = {"images": [image, image], "aligned": True}
        as_app = {"Authorization": f"Bearer {infer}"}
        assert c.post("/v1/face-verification", json=verify, headers=as_app).status_code == 200
    stored = (tmp_path / "g.sqlite3").read_bytes()
    raw = base64.b64decode(image)
    assert raw[200:264] not in stored  # the image's bytes are nowhere in the database
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert image[:64] not in logged and person not in logged


def test_identification_calls_a_match_with_the_stricter_1_to_n_threshold_or_the_requests(lfw, tmp_path: Path) -> None:
    spec = json.loads((MODEL / "model.json").read_text())["parameters"]
    strict = spec["identification_threshold"]
    assert strict > THRESHOLD  # 1 % of held-out mismatched pairs reach it, against the 1:1 point
    assert strict == META["metrics"]["verification"]["threshold_1pct_false_match"]
    people = sorted(p for p in lfw if len(lfw[p]) >= 2)[:2]
    with make_client(gallery_path=tmp_path / "g.sqlite3") as c:
        wait_ready(c)
        assert (
            c.post(
                "/v1/faces", json={"person": people[0], "image": b64(lfw[people[0]][0]), "aligned": True}
            ).status_code
            == 201
        )
        probe = {"image": b64(lfw[people[1]][0]), "aligned": True, "k": 1}
        default, lenient = (
            c.post("/v1/face-identification", json=probe),
            c.post("/v1/face-identification", json={**probe, "threshold": -1.0}),
        )
        assert default.status_code == lenient.status_code == 200
        d, le = default.json(), lenient.json()
        assert d["threshold"] == strict and d["matches"][0]["same_person"] == (d["matches"][0]["score"] >= strict)
        assert le["threshold"] == -1.0 and le["matches"][0]["same_person"] is True


def test_names_are_one_person_however_unicode_spells_them_and_overrides_are_refused(lfw, tmp_path: Path) -> None:
    import unicodedata

    person = sorted(lfw)[0]
    image = b64(lfw[person][0])
    with make_client(gallery_path=tmp_path / "g.sqlite3") as c:
        wait_ready(c)
        nfc = unicodedata.normalize("NFC", "José")
        assert c.post("/v1/faces", json={"person": nfc, "image": image, "aligned": True}).status_code == 201
        nfd = unicodedata.normalize("NFD", "José")
        assert c.get("/v1/faces", params={"person": nfd}).json()["total"] == 1
        persian = "محمد\u200cرضا"  # a zero-width non-joiner belongs in this name
        assert c.post("/v1/faces", json={"person": persian, "image": image, "aligned": True}).status_code == 201
        r = c.post("/v1/faces", json={"person": "ada\u202eevil", "image": image, "aligned": True})
        assert r.status_code == 422 and r.json()["error_type"] == "schema_error"
        assert c.delete("/v1/faces", params={"person": nfd}).json() == {"deleted": 1}


def test_all_faces_gives_an_image_without_a_face_no_entry_instead_of_failing(client, lfw, data_dir: Path) -> None:
    from training.face_scenes import backgrounds_without_people

    empty = backgrounds_without_people(data_dir / "object_detection" / "coco128", "val2017")[0].read_bytes()
    person = sorted(lfw)[0]
    r = client.post("/v1/face-embeddings", json={"images": [b64(empty), b64(lfw[person][0])], "all_faces": True})
    assert r.status_code == 200, r.text
    assert {e["image"] for e in r.json()["embeddings"]} == {1}
    r = client.post("/v1/face-embeddings", json={"images": [b64(empty)], "all_faces": True})
    assert r.status_code == 200 and r.json()["embeddings"] == []


def test_a_face_small_in_a_phone_sized_photo_is_found_by_looking_again_in_tiles(client, lfw, folds, data_dir) -> None:
    """Held-out LFW photos pasted into a 2400x3200 JPEG of a coco128 photo without people, the face
    square 8-13 % of the width: too small for the detector in the whole photo's 256 pixels, found in
    the tiles; the box lands on the face square."""
    from training.face_scenes import backgrounds_without_people

    backgrounds = backgrounds_without_people(data_dir / "object_detection" / "coco128", "val2017")
    crop = json.loads((MODEL / "model.json").read_text())["parameters"]["crop"]
    people = sorted({a for a, _, _, _ in folds[0][:300]})[:8]
    found, hits = 0, 0
    for n, person in enumerate(people):
        rng = np.random.default_rng(100 + n)
        w, h = 2400, 3200
        canvas = Image.open(backgrounds[n]).convert("RGB").resize((w, h))
        frac = rng.uniform(0.08, 0.13)
        side = round(frac * w / (crop[3] - crop[1]))
        x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
        canvas.paste(Image.open(io.BytesIO(lfw[person][0])).convert("RGB").resize((side, side)), (x, y))
        buffer = io.BytesIO()
        canvas.save(buffer, "JPEG", quality=90)
        r = client.post("/v1/face-embeddings", json={"images": [b64(buffer.getvalue())]})
        assert r.status_code in (200, 422), r.text
        if r.status_code == 200:
            found += 1
            box = r.json()["embeddings"][0]["face"]
            truth = (x + crop[1] * side, y + crop[0] * side, x + crop[3] * side, y + crop[2] * side)
            hits += iou((box["x1"], box["y1"], box["x2"], box["y2"]), truth) >= 0.5
    assert found >= 7 and hits >= 6, (found, hits)
