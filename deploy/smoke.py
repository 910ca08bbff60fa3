"""Real requests through the load balancer to every endpoint, each answer checked.

python deploy/smoke.py http://127.0.0.1:8080
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from PIL import Image, ImageDraw

DATA = os.environ.get("NEUROSERVE_TEST_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def call(base: str, path: str, body: dict | None = None, method: str | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json"}
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def seven_png() -> str:
    image = Image.new("L", (200, 200), 255)
    ImageDraw.Draw(image).line([(40, 40), (160, 40), (90, 170)], fill=0, width=16)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def digit_scene() -> tuple[str, list[str]]:
    """A held-out generated scene (MNIST test digits in a coco128 photo) and its digits."""
    from pathlib import Path

    from training.digit_scenes import makers

    image, _, classes = makers(Path(DATA), 1)["test"].scene(0)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode(), [str(c) for c in classes]


def found_most(body: dict, digits: list[str]) -> bool:
    labels = [d["label"] for d in body["images"][0]["detections"]]
    return sum(min(labels.count(d), digits.count(d)) for d in set(digits)) >= len(digits) // 2


def completions(base: str) -> tuple[int, dict]:
    """OpenAI's own client, unchanged, against /v1/completions: the same seed twice, then streamed."""
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=3)
    args = {"model": "text-generator", "prompt": "I think that", "max_tokens": 16, "temperature": 0.8, "seed": 3}
    try:
        first = client.completions.create(**args)
        again = client.completions.create(**args)
        streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices)
    except openai.APIStatusError as exc:
        return exc.status_code, {"error": str(exc)}
    models = [m.id for m in client.models.list().data]
    return 200, {"text": first.choices[0].text, "again": again.choices[0].text, "streamed": streamed, "models": models}


def lfw_faces() -> tuple[str, str, str]:
    """Two photos of one LFW person and that person's name (the first person with two images)."""
    import tarfile

    seen: dict[str, bytes] = {}
    with tarfile.open(os.path.join(DATA, "face_recognition", "lfw-deepfunneled-part1.tar.gz")) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                person = member.name.split("/")[-2]
                data = tar.extractfile(member).read()
                if person in seen:
                    return person, base64.b64encode(seen[person]).decode(), base64.b64encode(data).decode()
                seen[person] = data
    raise SystemExit("no LFW person with two images")


def gallery_shared(base: str) -> tuple[int, dict]:
    """Enrol a face through nginx, then identify it six times (nginx spreads the calls over the
    replicas): every replica must see the one gallery; then forget the person."""
    person, first, second = lfw_faces()
    status, enrolled = call(base, "/v1/faces", {"person": person, "image": first, "aligned": True})
    if status != 201:
        return status, enrolled
    found = []
    for _ in range(6):
        status, body = call(base, "/v1/face-identification", {"image": second, "aligned": True, "k": 1})
        found.append(body.get("matches", [{}])[0].get("person") if status == 200 else status)
    status, gone = call(base, "/v1/faces?person=" + urllib.parse.quote(person), method="DELETE")
    return status, {"found": found, "person": person, "deleted": gone.get("deleted")}


def main(base: str) -> None:
    scene, digits = digit_scene()
    checks = [
        ("GET /v2/health/ready", call(base, "/v2/health/ready"), lambda b: b["ready"] is True),
        (
            "GET /v2/models",
            call(base, "/v2/models"),
            lambda b: (
                {r["name"] for r in b}
                >= {
                    "mnist",
                    "sentiment",
                    "sentiment-zh",
                    "rating",
                    "translation-en-fr",
                    "digit-detector",
                    "digit-generator",
                    "mnist-ood",
                    "text-generator",
                    "face-embedding",
                    "face-detector",
                }
            ),
        ),
        (
            "POST /v2/models/mnist/infer",
            call(
                base,
                "/v2/models/mnist/infer",
                {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]},
            ),
            lambda b: b["outputs"][0]["shape"] == [1, 10],
        ),
        (
            "POST /v1/image-classification",
            call(base, "/v1/image-classification", {"images": [seven_png()]}),
            lambda b: b["predictions"][0][0]["label"] == "7" and b["ood"][0]["flagged"] is False,
        ),
        (
            "POST /v1/image-generation",
            call(base, "/v1/image-generation", {"digits": "2026", "n": 2, "seed": 7}),
            lambda b: [i["seed"] for i in b["images"]] == [7, 8] and b["images"][0]["width"] == 88,
        ),
        (
            "POST /v1/sentiment",
            call(base, "/v1/sentiment", {"texts": ["a wonderful, moving film", "dull and lifeless"]}),
            lambda b: [p["label"] for p in b["predictions"]] == ["positive", "negative"],
        ),
        (
            "POST /v1/sentiment (zh)",
            call(base, "/v1/sentiment", {"texts": ["房间干净，服务热情。"]}),
            lambda b: b["model"] == "sentiment-zh",
        ),
        (
            "POST /v1/rating",
            call(base, "/v1/rating", {"pairs": [{"user_id": "1", "item_id": "1"}]}),
            lambda b: 0.5 <= b["ratings"][0]["rating"] <= 5.0,
        ),
        (
            "POST /v1/recommendations",
            call(base, "/v1/recommendations", {"user_id": "1", "k": 5}),
            lambda b: len(b["items"]) == 5 and b["cold_start"] is False,
        ),
        (
            "POST /v1/translation",
            call(base, "/v1/translation", {"texts": ["I'm hungry."]}),
            lambda b: "faim" in b["translations"][0]["text"],
        ),
        (
            "POST /v1/completions (openai client, seeded, streamed)",
            completions(base),
            lambda b: (
                b["text"].strip() != ""
                and b["text"] == b["again"] == b["streamed"]
                and b["models"] == ["text-generator"]
            ),
        ),
        (
            "POST /v1/object-detection",
            call(base, "/v1/object-detection", {"images": [scene]}),
            lambda b: b["model"] == "digit-detector" and found_most(b, digits),
        ),
        (
            "POST /v1/face-verification (two photos of one person)",
            call(base, "/v1/face-verification", {"images": list(lfw_faces()[1:]), "aligned": True}),
            lambda b: b["model"] == "face-embedding" and b["same_person"] is True,
        ),
        (
            "the face gallery, shared by the replicas (enrol, identify x6, forget)",
            gallery_shared(base),
            lambda b: b["found"] == [b["person"]] * 6 and b["deleted"] == 1,
        ),
        (
            "bad input is a 4xx",
            call(base, "/v1/sentiment", {"texts": [""]}),
            lambda b: b["error_type"] == "invalid_input",
        ),
    ]
    failed = 0
    for name, (status, body), ok in checks:
        expected = 400 if name.startswith("bad input") else 200
        good = status == expected and ok(body)
        failed += not good
        print(f"{'ok  ' if good else 'FAIL'} {name}: {status}" + ("" if good else f" {json.dumps(body)[:300]}"))
    if failed:
        sys.exit(f"{failed} endpoint checks failed")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080")
