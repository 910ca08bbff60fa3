"""/v1/rating and /v1/recommendations with the committed MovieLens model."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import ROOT, make_client, wait_ready

ASSETS = ROOT / "models" / "rating" / "1" / "recommender.json"


@pytest.fixture(scope="module")
def assets() -> dict:
    return json.loads(ASSETS.read_text())


class Split(NamedTuple):
    meta: dict
    train: object  # training.rating.Ratings
    test: object


@pytest.fixture(scope="module")
def split(data_dir: Path) -> Split:
    """The committed model's temporal split, remade from its metadata: each user's latest ratings are the test."""
    from training.rating import Ratings, read_ratings, temporal_split

    meta = json.loads((ROOT / "models" / "rating" / "1" / "metadata.json").read_text())
    data = read_ratings(data_dir / "rating" / "ml-latest-small" / "ratings.csv")
    is_train, is_test = temporal_split(data, float(meta["training"]["config"]["holdout_fraction"]))
    pick = lambda m: Ratings(data.users[m], data.items[m], data.ratings[m], data.timestamps[m])  # noqa: E731
    return Split(meta, pick(is_train), pick(is_test))


def hit_rate_and_ndcg(tops: dict[str, list[str]], liked: dict[str, set[str]], k: int = 10) -> tuple[float, float]:
    """Share of users with a liked movie in their top k, and mean NDCG@k (binary gains)."""
    hits, ndcg = 0.0, 0.0
    for user, relevant in liked.items():
        gains = [1.0 if m in relevant else 0.0 for m in tops[user][:k]]
        hits += any(gains)
        ideal = sum(1 / math.log2(p + 2) for p in range(min(len(relevant), k)))
        ndcg += sum(g / math.log2(p + 2) for p, g in enumerate(gains)) / ideal
    return round(hits / len(liked), 4), round(ndcg / len(liked), 4)


def test_rating_test_rmse_through_http_matches_offline(client: TestClient, split: Split) -> None:
    from training.rating import rmse

    test = split.test
    predicted, fallbacks = [], 0
    for start in range(0, len(test.ratings), 1000):
        pairs = [
            {"user_id": str(u), "item_id": str(m)}
            for u, m in zip(test.users[start : start + 1000], test.items[start : start + 1000], strict=True)
        ]
        response = client.post("/v1/rating", json={"pairs": pairs})
        assert response.status_code == 200, response.text
        rows = response.json()["ratings"]
        predicted += [r["rating"] for r in rows]
        fallbacks += sum(r["fallback"] for r in rows)
    score = rmse(np.array(predicted), test.ratings)
    metrics = split.meta["metrics"]
    print(
        f"\ntemporal test RMSE through HTTP: {score:.4f} (offline {metrics['test_rmse']}, "
        f"baseline {metrics['baseline_test_rmse']})"
    )
    assert abs(score - metrics["test_rmse"]) < 0.002
    assert fallbacks == metrics["test_pairs_with_unknown_user_or_item"]
    assert metrics["rmse_improvement_over_baseline"] >= 0.03


def test_recommendations_through_http_reproduce_the_offline_hit_rate_and_ndcg_and_beat_popularity(
    split: Split, tmp_path: Path
) -> None:
    """Each user's later ratings of 4 or more (the test split) against their top 10 through HTTP, from the
    service as it stood at the split: what each user had rated by then is left out (the committed seen
    lists also hold the test ratings, so that the service never recommends a rated movie)."""
    repo = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "rating", repo / "rating")
    assets_path = repo / "rating" / "1" / "recommender.json"
    assets = json.loads(assets_path.read_text())
    seen_by_then: dict[str, list[str]] = defaultdict(list)
    for u, m in zip(split.train.users.tolist(), split.train.items.tolist(), strict=True):
        seen_by_then[str(u)].append(str(m))
    assets["seen"] = seen_by_then
    assets_path.write_text(json.dumps(assets))

    liked: dict[str, set[str]] = defaultdict(set)
    for u, m, r in zip(split.test.users.tolist(), split.test.items.tolist(), split.test.ratings, strict=True):
        if r >= 4:
            liked[str(u)].add(str(m))
    with make_client(repository=repo) as client:
        wait_ready(client)
        tops = {}
        for user in liked:
            response = client.post("/v1/recommendations", json={"user_id": user, "k": 10})
            assert response.status_code == 200 and response.json()["cold_start"] is False, response.text
            tops[user] = [i["item_id"] for i in response.json()["items"]]

    # Popularity, fitted on the same training ratings: the movies most often rated 4 or more, unseen ones.
    counts = Counter(str(m) for m, r in zip(split.train.items.tolist(), split.train.ratings, strict=True) if r >= 4)
    popular = sorted(counts, key=lambda m: (-counts[m], int(m)))
    pop_tops = {u: [m for m in popular if m not in set(seen_by_then[u])][:10] for u in liked}

    http, pop = hit_rate_and_ndcg(tops, liked), hit_rate_and_ndcg(pop_tops, liked)
    ranking = split.meta["metrics"]["ranking"]
    offline, offline_pop = ranking["test"]["ranking_score"], ranking["test"]["popularity"]
    print(
        f"\n{len(liked)} users, top 10 through HTTP: hit rate {http[0]:.4f}, NDCG {http[1]:.4f} (offline "
        f"{offline['hit_rate']}, {offline['ndcg']}); popularity {pop[0]:.4f}, {pop[1]:.4f}"
    )
    assert len(liked) == ranking["test_users"]
    assert http == pytest.approx((offline["hit_rate"], offline["ndcg"]), abs=0.002)
    assert pop == pytest.approx((offline_pop["hit_rate"], offline_pop["ndcg"]), abs=1e-4)
    assert http[1] >= 1.5 * pop[1] and http[0] > pop[0]
    # The rating head, ranked as the old endpoint did, recommends far worse than either.
    assert ranking["test"]["rating_head_clipped"]["ndcg"] < pop[1]


def test_the_graph_does_not_clip_ratings_and_the_endpoints_clip_what_they_show(
    client: TestClient, assets: dict
) -> None:
    row = assets["users"].index("1")
    items = list(range(len(assets["items"])))
    tensors = [
        {"name": "user", "datatype": "INT64", "shape": [len(items)], "data": [row] * len(items)},
        {"name": "item", "datatype": "INT64", "shape": [len(items)], "data": items},
    ]
    outputs = client.post("/v2/models/rating/infer", json={"inputs": tensors}).json()["outputs"]
    assert [o["name"] for o in outputs] == ["rating", "score"]
    raw = np.array(outputs[0]["data"])
    top = np.argsort(-raw)[:100]
    assert raw[top[0]] > 5.0 and len(set(raw[top].round(4))) > 95, "user 1's best predictions no longer tie at 5.0"
    pair = {"user_id": "1", "item_id": assets["items"][top[0]]}
    shown = client.post("/v1/rating", json={"pairs": [pair]}).json()["ratings"][0]
    assert shown["rating"] == 5.0 and set(shown) == {"user_id", "item_id", "rating", "fallback", "unknown"}


def test_rating_unknown_ids_use_bias_fallback_and_say_so(client: TestClient, assets: dict) -> None:
    known_user, known_item = assets["users"][0], assets["items"][0]
    pairs = [
        {"user_id": known_user, "item_id": known_item},
        {"user_id": "999999", "item_id": known_item},
        {"user_id": known_user, "item_id": "888888888"},
        {"user_id": 999999, "item_id": 888888888},
    ]
    rows = client.post("/v1/rating", json={"pairs": pairs}).json()["ratings"]
    assert [r["fallback"] for r in rows] == [False, True, True, True]
    assert [r["unknown"] for r in rows] == [[], ["user"], ["item"], ["user", "item"]]
    base = assets["baseline"]
    expected = base["mean"] + base["item_bias"][known_item]
    assert rows[1]["rating"] == pytest.approx(min(max(expected, 0.5), 5.0), abs=1e-3)
    assert rows[3]["rating"] == pytest.approx(base["mean"], abs=1e-3)
    assert all(0.5 <= r["rating"] <= 5.0 for r in rows)
    assert rows[3]["user_id"] == "999999"  # ids come back as strings


def test_recommendations_for_known_user_exclude_rated_items(client: TestClient, assets: dict) -> None:
    user = "1"
    seen = set(assets["seen"][user])
    response = client.post("/v1/recommendations", json={"user_id": user, "k": 20})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cold_start"] is False and body["user_id"] == user
    items = body["items"]
    assert len(items) == 20 and not seen & {i["item_id"] for i in items}
    assert all(i["title"] and 0.5 <= i["rating"] <= 5.0 for i in items)
    # Thousands of candidates went through the batcher in chunks of at most max_batch_size.
    assert 1 <= int(response.headers["x-batch-size"]) <= 2048
    with_seen = client.post("/v1/recommendations", json={"user_id": user, "k": 50, "exclude_seen": False}).json()
    assert seen & {i["item_id"] for i in with_seen["items"]}, "a heavy rater's top 50 should include rated films"


@pytest.mark.parametrize("user", ["1", "2", "414", "610"])
def test_recommendations_are_sorted_by_the_score_they_show_then_by_id_and_repeat_exactly(
    client: TestClient, user: str
) -> None:
    first = client.post("/v1/recommendations", json={"user_id": user, "k": 100}).json()["items"]
    again = client.post("/v1/recommendations", json={"user_id": user, "k": 100}).json()["items"]
    assert first == again and len(first) == 100
    assert first == sorted(first, key=lambda i: (-i["score"], int(i["item_id"])))
    assert len({i["score"] for i in first}) > 90, "the ranking score does not tie"


def test_recommendations_for_unknown_user_are_the_cold_start_list_sorted_by_its_score(
    client: TestClient, assets: dict
) -> None:
    body = client.post("/v1/recommendations", json={"user_id": 123456789, "k": 5}).json()
    assert body["cold_start"] is True
    items = body["items"]
    assert [i["item_id"] for i in items] == assets["popular"][:5]
    assert [i["score"] for i in items] == assets["popular_scores"][:5]
    assert items == sorted(items, key=lambda i: (-i["score"], int(i["item_id"])))
    assert all(i["title"] and 0.5 <= i["rating"] <= 5.0 for i in items)
    base = assets["baseline"]
    assert items[0]["rating"] == pytest.approx(base["mean"] + base["item_bias"][items[0]["item_id"]], abs=1e-3)


@pytest.mark.parametrize(
    ("url", "payload", "status", "error_type"),
    [
        ("/v1/rating", {"pairs": [{"user_id": "abc", "item_id": "1"}]}, 400, "invalid_id"),
        ("/v1/rating", {"pairs": [{"user_id": "1", "item_id": "-5"}]}, 400, "invalid_id"),
        ("/v1/rating", {"pairs": [{"user_id": "1", "item_id": "1.5"}]}, 400, "invalid_id"),
        ("/v1/rating", {"pairs": [{"user_id": True, "item_id": "1"}]}, 422, "schema_error"),
        ("/v1/rating", {"pairs": [{"user_id": "1"}]}, 422, "schema_error"),
        ("/v1/rating", {"pairs": []}, 422, "schema_error"),
        ("/v1/rating", {"pairs": [{"user_id": "1", "item_id": "1"}] * 1001}, 413, "too_many_items"),
        ("/v1/rating", {"pairs": [{"user_id": "1", "item_id": "1"}], "model": "sentiment"}, 404, "model_not_found"),
        ("/v1/recommendations", {"user_id": "1", "k": 0}, 422, "schema_error"),
        ("/v1/recommendations", {"user_id": "1", "k": 101}, 422, "schema_error"),
        ("/v1/recommendations", {"user_id": "x1"}, 400, "invalid_id"),
        ("/v1/recommendations", {"user_id": ["1"]}, 422, "schema_error"),
        ("/v1/recommendations", {"k": 3}, 422, "schema_error"),
        ("/v1/recommendations", {"user_id": "1", "exclude_seen": "maybe"}, 422, "schema_error"),
    ],
)
def test_rating_bad_requests_get_clear_4xx(
    client: TestClient, url: str, payload: dict, status: int, error_type: str
) -> None:
    response = client.post(url, json=payload)
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type
