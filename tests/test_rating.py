"""/v1/rating and /v1/recommendations with the committed MovieLens model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import ROOT

ASSETS = ROOT / "models" / "rating" / "1" / "recommender.json"


@pytest.fixture(scope="module")
def assets() -> dict:
    return json.loads(ASSETS.read_text())


def test_rating_validation_rmse_through_http_matches_offline(client: TestClient, data_dir: Path) -> None:
    from training.rating import Ratings, read_ratings, rmse, temporal_split

    meta = json.loads((ROOT / "models" / "rating" / "1" / "metadata.json").read_text())
    fraction = float(meta["training"]["config"]["holdout_fraction"])
    data = read_ratings(data_dir / "rating" / "ml-latest-small" / "ratings.csv")
    _, is_val = temporal_split(data, fraction)
    val = Ratings(data.users[is_val], data.items[is_val], data.ratings[is_val], data.timestamps[is_val])
    predicted, fallbacks = [], 0
    for start in range(0, len(val.ratings), 1000):
        pairs = [
            {"user_id": str(u), "item_id": str(m)}
            for u, m in zip(val.users[start : start + 1000], val.items[start : start + 1000], strict=True)
        ]
        response = client.post("/v1/rating", json={"pairs": pairs})
        assert response.status_code == 200, response.text
        rows = response.json()["ratings"]
        predicted += [r["rating"] for r in rows]
        fallbacks += sum(r["fallback"] for r in rows)
    score = rmse(np.array(predicted), val.ratings)
    metrics = meta["metrics"]
    print(
        f"\ntemporal validation RMSE through HTTP: {score:.4f} (offline {metrics['validation_rmse']}, "
        f"baseline {metrics['baseline_validation_rmse']})"
    )
    assert abs(score - metrics["validation_rmse"]) < 0.002
    assert fallbacks == metrics["validation_pairs_with_unknown_user_or_item"]
    assert metrics["rmse_improvement_over_baseline"] >= 0.03


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
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    assert all(i["title"] and 0.5 <= i["score"] <= 5.0 for i in items)
    # Thousands of candidates went through the batcher in chunks of at most max_batch_size.
    assert 1 <= int(response.headers["x-batch-size"]) <= 2048
    with_seen = client.post("/v1/recommendations", json={"user_id": user, "k": 50, "exclude_seen": False}).json()
    assert seen & {i["item_id"] for i in with_seen["items"]}, "a heavy rater's top 50 should include rated films"


def test_recommendations_for_unknown_user_fall_back_to_popular(client: TestClient, assets: dict) -> None:
    body = client.post("/v1/recommendations", json={"user_id": 123456789, "k": 5}).json()
    assert body["cold_start"] is True
    assert [i["item_id"] for i in body["items"]] == assets["popular"][:5]
    assert all(i["title"] for i in body["items"])


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
