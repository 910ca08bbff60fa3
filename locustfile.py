"""Load test with realistic payloads drawn from the data: real MNIST test digits as PNG files, SST-2
dev sentences of mixed length, Chinese hotel reviews, real MovieLens user ids, Tatoeba English
sentences to translate, held-out generated digit scenes (MNIST test digits in coco128 photos) to
detect.

    make loadtest URL=http://127.0.0.1:8080 DURATION=60s USERS=32
    locust -f locustfile.py --headless -u 32 -r 8 -t 60s --host http://127.0.0.1:8080 \
        --csv loadtest --html loadtest.html

Every response's content is checked, not only its status; any 5xx, or a 4xx to a valid request,
counts as a failure. Data comes from $NEUROSERVE_TEST_DATA (default ../shared/data).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import zipfile
from pathlib import Path

from locust import HttpUser, between, task
from PIL import Image

from training.digit_scenes import makers
from training.idx import load_mnist

DATA = Path(os.environ.get("NEUROSERVE_TEST_DATA", Path(__file__).resolve().parent.parent / "shared" / "data"))
RNG = random.Random(0)


def _digits(n: int = 200) -> list[tuple[bytes, str]]:
    images, labels = load_mnist(DATA / "image_classification" / "mnist", "test")
    out = []
    for i in RNG.sample(range(len(images)), n):
        buffer = io.BytesIO()
        Image.fromarray(images[i]).save(buffer, "PNG")
        out.append((buffer.getvalue(), str(labels[i])))
    return out


def _sentences(n: int = 500) -> list[str]:
    with (DATA / "sentiment" / "sst2" / "dev.tsv").open(encoding="utf-8") as fh:
        rows = [line.rstrip("\n").rpartition("\t")[0].strip() for line in fh.readlines()[1:]]
    return RNG.sample([r for r in rows if r], n)


def _reviews(n: int = 200) -> list[str]:
    path = DATA / "sentiment" / "chnsenticorp" / "ChnSentiCorp_htl_all.csv"
    with path.open(encoding="utf-8", newline="") as fh:
        rows = [r["review"].strip() for r in csv.DictReader(fh) if r["review"].strip()]
    return RNG.sample(rows, n)


def _users_and_items() -> tuple[list[str], list[str]]:
    users, items = set(), set()
    with (DATA / "rating" / "ml-latest-small" / "ratings.csv").open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            users.add(row["userId"])
            items.add(row["movieId"])
    return sorted(users), sorted(items)


def _english(n: int = 300) -> list[str]:
    with zipfile.ZipFile(DATA / "translation" / "fra-eng.zip") as archive:
        lines = archive.read("fra.txt").decode("utf-8").splitlines()
    english = sorted({line.split("\t")[0].strip() for line in lines if "\t" in line})
    return RNG.sample([e for e in english if len(e.split()) <= 20], n)


DIGITS = _digits()
SENTENCES = _sentences()
REVIEWS = _reviews()
USERS, ITEMS = _users_and_items()
ENGLISH = _english()


def _scenes(n: int = 12) -> list[tuple[bytes, int, int]]:
    maker = makers(DATA, 1)["test"]
    out = []
    for i in range(n):
        image = maker.scene(i)[0]
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        out.append((buffer.getvalue(), image.shape[1], image.shape[0]))
    return out


SCENES = _scenes()


def _check(response, keys: tuple[str, ...]) -> dict | None:
    """Mark the response failed unless it is a 200 with a JSON body holding ``keys``."""
    if response.status_code != 200:
        response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
        return None
    try:
        body = response.json()
    except json.JSONDecodeError:
        response.failure("response is not JSON")
        return None
    missing = [k for k in keys if k not in body]
    if missing:
        response.failure(f"response lacks {missing}")
        return None
    return body


class ImageClient(HttpUser):
    """A phone app posting photos of digits, one to four per request."""

    weight = 3
    wait_time = between(0.05, 0.3)

    @task
    def classify(self) -> None:
        picks = RNG.sample(DIGITS, RNG.randint(1, 4))
        files = [("files", (f"digit{i}.png", blob, "image/png")) for i, (blob, _) in enumerate(picks)]
        with self.client.post(
            "/v1/image-classification",
            files=files,
            data={"top_k": "3"},
            catch_response=True,
            name="/v1/image-classification",
        ) as response:
            body = _check(response, ("predictions",))
            if body is None:
                return
            if len(body["predictions"]) != len(picks) or any(len(p) != 3 for p in body["predictions"]):
                response.failure("wrong number of predictions")
            elif not all(p[0]["label"] in "0123456789" for p in body["predictions"]):
                response.failure("a label that is not a digit")


class TextClient(HttpUser):
    """A web app asking for the sentiment of reviews of mixed length, mostly English."""

    weight = 3
    wait_time = between(0.05, 0.3)

    @task(4)
    def english(self) -> None:
        self._sentiment(RNG.sample(SENTENCES, RNG.randint(1, 8)), "sentiment")

    @task(1)
    def chinese(self) -> None:
        self._sentiment(RNG.sample(REVIEWS, RNG.randint(1, 4)), "sentiment-zh")

    def _sentiment(self, texts: list[str], model: str) -> None:
        with self.client.post(
            "/v1/sentiment", json={"texts": texts}, catch_response=True, name="/v1/sentiment"
        ) as response:
            body = _check(response, ("predictions", "model"))
            if body is None:
                return
            if body["model"] != model:
                response.failure(f"routed to {body['model']}, expected {model}")
            elif len(body["predictions"]) != len(texts) or not all(
                p["label"] in ("positive", "negative") for p in body["predictions"]
            ):
                response.failure("bad predictions")


class RecommenderClient(HttpUser):
    """A catalogue page: recommendations for a user, and predicted ratings for a few titles."""

    weight = 2
    wait_time = between(0.1, 0.5)

    @task(2)
    def recommend(self) -> None:
        user = RNG.choice(USERS)
        with self.client.post(
            "/v1/recommendations", json={"user_id": user, "k": 10}, catch_response=True, name="/v1/recommendations"
        ) as response:
            body = _check(response, ("items", "cold_start"))
            if body is not None and len(body["items"]) != 10:
                response.failure(f"{len(body['items'])} items instead of 10")

    @task(3)
    def rate(self) -> None:
        pairs = [{"user_id": RNG.choice(USERS), "item_id": RNG.choice(ITEMS)} for _ in range(RNG.randint(1, 20))]
        with self.client.post("/v1/rating", json={"pairs": pairs}, catch_response=True, name="/v1/rating") as response:
            body = _check(response, ("ratings",))
            if body is not None and not all(0.5 <= r["rating"] <= 5.0 for r in body["ratings"]):
                response.failure("rating outside the scale")


class TranslationClient(HttpUser):
    """A chat app translating short English messages into French, one to three at a time."""

    weight = 1
    wait_time = between(0.2, 1.0)

    @task
    def translate(self) -> None:
        texts = RNG.sample(ENGLISH, RNG.randint(1, 3))
        with self.client.post(
            "/v1/translation", json={"texts": texts}, catch_response=True, name="/v1/translation"
        ) as response:
            body = _check(response, ("translations",))
            if body is not None and (
                len(body["translations"]) != len(texts) or not all(t["text"] for t in body["translations"])
            ):
                response.failure("missing or empty translations")


class DetectionClient(HttpUser):
    """A camera app finding the digits in a photo, one photo per request."""

    weight = 1
    wait_time = between(0.2, 1.0)

    @task
    def detect(self) -> None:
        blob, width, height = RNG.choice(SCENES)
        with self.client.post(
            "/v1/object-detection",
            files=[("files", ("scene.png", blob, "image/png"))],
            catch_response=True,
            name="/v1/object-detection",
        ) as response:
            body = _check(response, ("images",))
            if body is None:
                return
            (image,) = body["images"]
            if (image["width"], image["height"]) != (width, height):
                response.failure("the image's size came back wrong")
            elif not image["detections"]:
                response.failure("no digit found in a scene that has some")
            elif any(not (0 <= d["box"]["x1"] < d["box"]["x2"] <= width) for d in image["detections"]):
                response.failure("a box outside the image")


class CompletionClient(HttpUser):
    """A writing assistant continuing what its user typed, through OpenAI's completions API."""

    weight = 1
    wait_time = between(0.2, 1.0)

    @task
    def complete(self) -> None:
        words = RNG.choice(ENGLISH).split()
        prompt = " ".join(words[: RNG.randint(1, max(1, len(words) - 1))])
        body = {"model": "text-generator", "prompt": prompt, "max_tokens": RNG.choice((8, 16, 32)), "temperature": 0.8}
        with self.client.post("/v1/completions", json=body, catch_response=True, name="/v1/completions") as response:
            answer = _check(response, ("choices", "usage"))
            if answer is not None and answer["choices"][0]["finish_reason"] not in ("stop", "length"):
                response.failure("a choice without a finish reason")
