"""Train a neural recommender on MovieLens latest-small and write it to the model repository as ONNX.

    python -m training.rating --data-dir ../shared/data/rating/ml-latest-small

Validation is temporal, as the service faces it: each user's most recent ratings (by timestamp) are
held out. The baseline to beat is a regularised bias model (global mean + user bias + item bias,
fitted on the same training ratings by alternating least squares; its regularisation is tuned on the
validation split, so the baseline is as strong as it can be).

The network keeps those biases and adds: the user's recent drift (shrunk mean residual of their
latest 30, 10 and 5 ratings), their recent per-genre residuals dotted with the movie's genres, a dot
product of user and movie embeddings, and an MLP over all of it plus movie features (genres, year,
recent residual, popularity). Per-user and per-movie features are constant tables inside the graph,
so the model takes nothing but a user row and a movie row; for training each rating sees them as of
just before it (no leakage of the rating being fitted). Every movie of movies.csv has a row, rated in
training or not. Predictions are clipped to the rating scale inside the graph; a pair whose user (or
movie) the network does not know gets the bias prediction, in evaluation exactly as in serving.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import sys
import time
from collections import defaultdict
from dataclasses import field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from service.tasks.rating import RecommenderFile
from training import common

RATING_MIN, RATING_MAX = 0.5, 5.0


@dataclasses.dataclass
class Config:
    data_dir: Path = field(
        default=Path("../shared/data/rating/ml-latest-small"),
        metadata={"help": "folder with ratings.csv and movies.csv"},
    )
    output_dir: Path = field(default=Path("models"), metadata={"help": "model repository root"})
    name: str = "rating"
    version: int = 1
    holdout_fraction: float = field(
        default=0.1, metadata={"help": "each user's latest share of ratings held out for validation"}
    )
    dim: int = field(default=32, metadata={"help": "embedding size"})
    hidden: int = field(default=64, metadata={"help": "MLP width"})
    dropout: float = 0.3
    epochs: int = 8
    batch_size: int = 512
    lr: float = 5e-4
    weight_decay: float = field(default=1e-4, metadata={"help": "on the MLP"})
    embed_l2: float = field(default=0.5, metadata={"help": "L2 on the embeddings used in a batch"})
    seed: int = 1
    device: str = "auto"
    smoke: bool = field(default=False, metadata={"help": "60 users, two epochs: checks the pipeline"})


@dataclasses.dataclass
class Ratings:
    users: np.ndarray  # raw ids, int64
    items: np.ndarray
    ratings: np.ndarray  # float32
    timestamps: np.ndarray


def read_ratings(path: Path) -> Ratings:
    users, items, ratings, stamps = [], [], [], []
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            users.append(int(row["userId"]))
            items.append(int(row["movieId"]))
            ratings.append(float(row["rating"]))
            stamps.append(int(row["timestamp"]))
    return Ratings(np.array(users), np.array(items), np.array(ratings, np.float32), np.array(stamps))


def read_movies(path: Path) -> dict[int, dict]:
    movies = {}
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            genres = [] if row["genres"] == "(no genres listed)" else row["genres"].split("|")
            movies[int(row["movieId"])] = {"title": row["title"], "genres": genres}
    return movies


def temporal_split(data: Ratings, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, validation): each user's latest ``fraction`` of ratings (at least one)."""
    val = np.zeros(len(data.users), dtype=bool)
    order = np.lexsort((data.timestamps, data.users))
    users_sorted = data.users[order]
    starts = np.flatnonzero(np.r_[True, users_sorted[1:] != users_sorted[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts, ends, strict=True):
        n = end - start
        k = max(1, round(n * fraction)) if n > 1 else 0
        val[order[end - k : end]] = True
    return ~val, val


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - truth) ** 2)))


@dataclasses.dataclass
class Biases:
    mean: float
    user: dict[int, float]
    item: dict[int, float]
    reg_user: float
    reg_item: float

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        b_u = np.array([self.user.get(int(u), 0.0) for u in users])
        b_i = np.array([self.item.get(int(i), 0.0) for i in items])
        return np.clip(self.mean + b_u + b_i, RATING_MIN, RATING_MAX)


def fit_biases(
    users: np.ndarray, items: np.ndarray, ratings: np.ndarray, reg_user: float, reg_item: float, iterations: int = 15
) -> Biases:
    """Regularised biases by alternating least squares (Koren's baseline predictor)."""
    mean = float(ratings.mean())
    u_idx, u_inv = np.unique(users, return_inverse=True)
    i_idx, i_inv = np.unique(items, return_inverse=True)
    b_u, b_i = np.zeros(len(u_idx)), np.zeros(len(i_idx))
    for _ in range(iterations):
        b_i = np.bincount(i_inv, ratings - mean - b_u[u_inv], len(i_idx)) / (reg_item + np.bincount(i_inv))
        b_u = np.bincount(u_inv, ratings - mean - b_i[i_inv], len(u_idx)) / (reg_user + np.bincount(u_inv))
    return Biases(
        mean,
        dict(zip(u_idx.tolist(), b_u.tolist(), strict=True)),
        dict(zip(i_idx.tolist(), b_i.tolist(), strict=True)),
        reg_user,
        reg_item,
    )


def best_baseline(train: Ratings, val: Ratings) -> tuple[Biases, float]:
    best: tuple[Biases, float] | None = None
    for reg_user in (1, 2, 5, 10, 15, 25):
        for reg_item in (1, 2, 5, 10, 15, 25):
            biases = fit_biases(train.users, train.items, train.ratings, reg_user, reg_item)
            score = rmse(biases.predict(val.users, val.items), val.ratings)
            if best is None or score < best[1]:
                best = (biases, score)
    assert best is not None
    return best


class Recommender(nn.Module):
    """rating = clip(mean + b_u + b_i + w . user_features_u + <p_u, q_i> + MLP([p_u, q_i, user_u, item_i])).

    ``user_features`` (recent drift of the user's ratings, activity) and ``item_features`` (genres,
    popularity, release year) are constants computed from the training ratings and stored in the
    graph, so the model still takes nothing but a user row and an item row.
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        user_features: torch.Tensor,
        item_features: torch.Tensor,
        mean: float,
        cfg: Config,
    ) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users, cfg.dim)
        self.item = nn.Embedding(n_items, cfg.dim)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        for emb in (self.user, self.item):
            nn.init.normal_(emb.weight, std=0.01)
        # The baseline's biases stay fixed: the drift feature is measured against them.
        self.user_bias.weight.requires_grad_(False)
        self.item_bias.weight.requires_grad_(False)
        self.register_buffer("user_features", user_features)
        self.register_buffer("item_features", item_features)
        self.n_genres = user_features.shape[1] - USER_SCALARS
        self.drift = nn.Linear(USER_SCALARS, 1)
        self.affinity = nn.Parameter(torch.tensor(0.0))  # set from a linear fit before training
        width = 2 * cfg.dim + user_features.shape[1] + item_features.shape[1]
        self.mlp = nn.Sequential(
            nn.Linear(width, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden // 2),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden // 2, 1),
        )
        nn.init.zeros_(self.mlp[-1].weight)  # start exactly at baseline + drift, then learn what they miss
        nn.init.zeros_(self.mlp[-1].bias)
        self.mean = mean

    def raw(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        uf: torch.Tensor | None = None,
        itf: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``uf``/``itf`` override the feature tables (training uses each rating's as-of features)."""
        p, q = self.user(users), self.item(items)
        uf = self.user_features[users] if uf is None else uf
        itf = self.item_features[items] if itf is None else itf
        out = (
            self.mean
            + self.user_bias(users).squeeze(1)
            + self.item_bias(items).squeeze(1)
            + self.drift(uf[:, :USER_SCALARS]).squeeze(1)
            + self.affinity * (uf[:, USER_SCALARS:] * itf[:, : self.n_genres]).sum(1)
            + (p * q).sum(1)
            + self.mlp(torch.cat([p, q, uf, itf], dim=1)).squeeze(1)
        )
        return out, p, q

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.raw(user, item)[0], RATING_MIN, RATING_MAX)


USER_SCALARS = 5  # d30, d10, d5, long-run bias, activity; then one affinity per genre


def _user_row(h: list[float], genres: list[np.ndarray], user_bias: float, n_genres: int) -> np.ndarray:
    """Shrunk mean residual of the latest 30, 10 and 5 ratings, the long-run bias, activity, and the
    user's residual per genre over the latest 100 ratings (what they have liked lately, by genre)."""
    row = np.zeros(USER_SCALARS + n_genres, dtype=np.float32)
    for j, (window, shrink) in enumerate(((30, 5), (10, 3), (5, 2))):
        recent = h[-window:]
        row[j] = sum(recent) / (shrink + len(recent))
    row[3] = user_bias
    row[4] = math.log1p(len(h)) / 8
    if h:
        g = np.array(genres[-100:])
        row[USER_SCALARS:] = (g * np.array(h[-100:])[:, None]).sum(0) / (5 + g.sum(0))
    return row


def user_features(
    train: Ratings, baseline: Biases, user_ids: np.ndarray, genre_of: dict[int, np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per user features as of the end of training (the graph's table) and, for each training rating,
    as of just before it. On a temporal split the latest ratings say most about the next ones (tastes
    and scales drift), and training on features that contain the rating being fitted would teach the
    network to trust them far too much.
    """
    n_genres = len(next(iter(genre_of.values())))
    residual = train.ratings - baseline.predict(train.users, train.items)
    order = np.lexsort((train.timestamps, train.users))
    as_of = np.zeros((len(residual), USER_SCALARS + n_genres), dtype=np.float32)
    history: dict[int, list[float]] = defaultdict(list)
    history_genres: dict[int, list[np.ndarray]] = defaultdict(list)
    for k in order:
        u, m = int(train.users[k]), int(train.items[k])
        as_of[k] = _user_row(history[u], history_genres[u], baseline.user.get(u, 0.0), n_genres)
        history[u].append(float(residual[k]))
        history_genres[u].append(genre_of[m])
    final = np.stack(
        [_user_row(history[u], history_genres[u], baseline.user.get(u, 0.0), n_genres) for u in user_ids.tolist()]
    )
    return torch.from_numpy(final), torch.from_numpy(as_of)


def genre_vectors(movies: dict[int, dict], item_ids: np.ndarray) -> dict[int, np.ndarray]:
    """Multi-hot genres per movie (every movie of the training ratings has an entry)."""
    names = sorted({g for m in movies.values() for g in m["genres"]})
    out = {}
    for m in item_ids.tolist():
        genres = movies.get(m, {"genres": []})["genres"]
        out[m] = np.array([1.0 if g in genres else 0.0 for g in names], dtype=np.float32)
    return out


def item_features(
    train: Ratings, baseline: Biases, movies: dict[int, dict], item_ids: np.ndarray, genre_of: dict[int, np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item: genres (summing to 1, so that a user's genre affinities dotted with them is an average),
    release year from the title, and the shrunk residual of its latest 30 ratings and its popularity, as
    of the end of training (the graph's table) and as of just before each training rating."""
    static = {}
    for m in item_ids.tolist():
        g = genre_of[m]
        match = re.search(r"\((\d{4})\)\s*$", movies.get(m, {}).get("title", ""))
        year = (int(match.group(1)) - 1990) / 20 if match else 0.0
        static[m] = [*(g / max(g.sum(), 1.0)), year, 0.0 if match else 1.0]

    def dynamic(h: list[float]) -> list[float]:
        return [sum(h[-30:]) / (10 + len(h[-30:])), math.log1p(len(h)) / 8]

    residual = train.ratings - baseline.predict(train.users, train.items)
    order = np.lexsort((train.timestamps, train.items))
    history: dict[int, list[float]] = defaultdict(list)
    as_of = np.zeros((len(residual), len(next(iter(static.values()))) + 2), dtype=np.float32)
    for k in order:
        m = int(train.items[k])
        as_of[k] = [*static[m], *dynamic(history[m])]
        history[m].append(float(residual[k]))
    final = [[*static[m], *dynamic(history[m])] for m in item_ids.tolist()]
    return torch.tensor(final, dtype=torch.float32), torch.from_numpy(as_of)


def model_config(cfg: Config, n_users: int, n_items: int) -> dict:
    return {
        "name": cfg.name,
        "task": "rating",
        "default": True,
        "description": f"MovieLens rating predictor (biases, recent drift, embeddings, MLP) for {n_users} users "
        f"and {n_items} movies. Inputs: user and item embedding rows (see recommender.json for the id maps); "
        f"output: predicted rating clipped to [{RATING_MIN}, {RATING_MAX}].",
        "platform": "onnx_onnxv1",
        "inputs": [
            # The embedding rows: a request beyond them is refused before it can fail a batch.
            {"name": "user", "datatype": "INT64", "shape": [-1], "value_range": [0, n_users - 1]},
            {"name": "item", "datatype": "INT64", "shape": [-1], "value_range": [0, n_items - 1]},
        ],
        "outputs": [{"name": "rating", "datatype": "FP32", "shape": [-1]}],
        # Recommendations score every movie for a user: large batches keep that to a few runs.
        "max_batch_size": 2048,
        "dynamic_batching": {"max_queue_delay_ms": 0.0},
        "parameters": {"assets": "recommender.json", "rating_min": RATING_MIN, "rating_max": RATING_MAX},
    }


def popular_items(train: Ratings, min_count: int = 50, prior: int = 20, k: int = 100) -> list[int]:
    """Most popular well-rated movies, for cold-start users: Bayesian average among often-rated ones."""
    mean = float(train.ratings.mean())
    sums, counts = defaultdict(float), defaultdict(int)
    for item, rating in zip(train.items.tolist(), train.ratings.tolist(), strict=True):
        sums[item] += rating
        counts[item] += 1
    scored = [((sums[i] + prior * mean) / (counts[i] + prior), i) for i in counts if counts[i] >= min_count]
    return [i for _, i in sorted(scored, reverse=True)[:k]]


class Split(NamedTuple):
    data: Ratings  # every rating read (all of them feed the served "already seen" lists)
    movies: dict[int, dict]
    train: Ratings
    val: Ratings


def load_split(cfg: Config) -> Split:
    data = read_ratings(cfg.data_dir / "ratings.csv")
    movies = read_movies(cfg.data_dir / "movies.csv")
    if cfg.smoke:
        keep = np.isin(data.users, np.unique(data.users)[:60])
        data = Ratings(data.users[keep], data.items[keep], data.ratings[keep], data.timestamps[keep])
    is_train, is_val = temporal_split(data, cfg.holdout_fraction)
    pick = lambda m: Ratings(data.users[m], data.items[m], data.ratings[m], data.timestamps[m])  # noqa: E731
    return Split(data, movies, pick(is_train), pick(is_val))


class Rows(NamedTuple):
    """Embedding rows: raw ids in row order, the reverse maps, and each training rating's as-of features."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    user_index: dict[int, int]
    item_index: dict[int, int]
    user_as_of: torch.Tensor
    item_as_of: torch.Tensor


def build_model(cfg: Config, split: Split, baseline: Biases) -> tuple[Recommender, Rows]:
    """The network with its feature tables, started from the baseline's biases and a linear drift fit."""
    user_ids = np.unique(split.train.users)
    # Every movie of movies.csv gets a row, rated in training or not: an unrated one still has genres
    # and a year, and its user's drift and genre affinities still apply (its biases and embedding are 0).
    item_ids = np.unique(np.concatenate([split.train.items, np.array(sorted(split.movies), dtype=np.int64)]))
    genre_of = genre_vectors(split.movies, item_ids)
    user_table, user_as_of = user_features(split.train, baseline, user_ids, genre_of)
    item_table, item_as_of = item_features(split.train, baseline, split.movies, item_ids, genre_of)
    model = Recommender(len(user_ids), len(item_ids), user_table, item_table, baseline.mean, cfg)
    rows = Rows(
        user_ids,
        item_ids,
        {int(u): i for i, u in enumerate(user_ids)},
        {int(m): i for i, m in enumerate(item_ids)},
        user_as_of,
        item_as_of,
    )
    init_drift(model, rows, split.train, baseline)
    init_biases(model, rows, split.train, baseline)
    return model, rows


def init_drift(model: Recommender, rows: Rows, train: Ratings, baseline: Biases) -> None:
    """Start the drift terms from a least-squares fit of the baseline's residual on the as-of features of
    the training ratings (training data only): the network then learns what a linear model misses."""
    n_genres = model.n_genres
    affinity = (rows.user_as_of[:, USER_SCALARS:] * rows.item_as_of[:, :n_genres]).sum(1, keepdim=True)
    design = torch.cat([rows.user_as_of[:, :USER_SCALARS], affinity, torch.ones(len(affinity), 1)], dim=1).double()
    target = torch.tensor(train.ratings - baseline.predict(train.users, train.items)).double()
    fit = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1).float()
    with torch.no_grad():
        model.drift.weight[0] = fit[:USER_SCALARS]
        model.affinity.fill_(fit[USER_SCALARS])
        model.drift.bias.fill_(fit[USER_SCALARS + 1])


def init_biases(model: Recommender, rows: Rows, train: Ratings, baseline: Biases) -> None:
    """Start from the baseline's biases (the network learns what they miss); unrated movies' embeddings are 0."""
    with torch.no_grad():
        model.user_bias.weight[:, 0] = torch.tensor([baseline.user.get(int(u), 0.0) for u in rows.user_ids])
        model.item_bias.weight[:, 0] = torch.tensor([baseline.item.get(int(m), 0.0) for m in rows.item_ids])
        rated = set(np.unique(train.items).tolist())
        unrated = [i for i, m in enumerate(rows.item_ids.tolist()) if m not in rated]
        model.item.weight[torch.tensor(unrated, dtype=torch.long)] = 0.0


class Validation:
    """The held-out pairs as embedding rows; a pair whose user or movie has no row gets the bias prediction."""

    def __init__(self, val: Ratings, rows: Rows, baseline: Biases, device: torch.device) -> None:
        pairs = zip(val.users, val.items, strict=True)
        self.known = np.array([int(u) in rows.user_index and int(m) in rows.item_index for u, m in pairs])
        self.users = torch.tensor([rows.user_index.get(int(u), 0) for u in val.users], device=device)
        self.items = torch.tensor([rows.item_index.get(int(m), 0) for m in val.items], device=device)
        self.fallback = baseline.predict(val.users, val.items)
        self.ratings = val.ratings

    def rmse(self, predictions: np.ndarray) -> float:
        return rmse(np.where(self.known, predictions, self.fallback), self.ratings)

    def model_rmse(self, model: Recommender) -> float:
        model.eval()
        with torch.no_grad():
            return self.rmse(model(self.users, self.items).cpu().numpy())


def fit(
    model: Recommender,
    cfg: Config,
    train: Ratings,
    rows: Rows,
    validation: Validation,
    baseline_rmse: float,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], int]:
    """Train, keeping the weights of the epoch with the best validation RMSE (epoch 0, the starting
    point, included: training must beat it). Returns them and that epoch."""
    device = next(model.parameters()).device
    u_train = torch.tensor([rows.user_index[int(u)] for u in train.users], device=device)
    i_train = torch.tensor([rows.item_index[int(m)] for m in train.items], device=device)
    r_train = torch.tensor(train.ratings, device=device)
    f_train, g_train = rows.user_as_of.to(device), rows.item_as_of.to(device)
    optimizer = torch.optim.AdamW(
        [
            {"params": [*model.mlp.parameters(), *model.drift.parameters()], "weight_decay": cfg.weight_decay},
            {"params": [model.user.weight, model.item.weight], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    steps = math.ceil(len(r_train) / cfg.batch_size)
    epochs = 2 if cfg.smoke else cfg.epochs
    best_rmse, best_epoch = validation.model_rmse(model), 0
    best_state = common.snapshot(model)
    tqdm.write(f"epoch 0: validation RMSE {best_rmse:.4f} (baseline {baseline_rmse:.4f})")
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(r_train), generator=generator).to(device)
        for step in tqdm(range(steps), desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            pred, p, q = model.raw(u_train[idx], i_train[idx], f_train[idx], g_train[idx])
            loss = F.mse_loss(pred, r_train[idx]) + cfg.embed_l2 * ((p**2).sum(1) + (q**2).sum(1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        score = validation.model_rmse(model)
        tqdm.write(f"epoch {epoch}: validation RMSE {score:.4f} (baseline {baseline_rmse:.4f})")
        if score < best_rmse:
            best_rmse, best_epoch = score, epoch
            best_state = common.snapshot(model)
    return best_state, best_epoch


def export(model: Recommender, rows: Rows, onnx_path: Path, generator: torch.Generator) -> float:
    """The ONNX graph, parity-checked on random rows; returns the largest difference from torch."""
    common.export_onnx(
        model,
        (torch.tensor([0, 1]), torch.tensor([0, 1])),
        onnx_path,
        input_names=["user", "item"],
        output_names=["rating"],
        dynamic_axes={"user": {0: "batch"}, "item": {0: "batch"}, "rating": {0: "batch"}},
    )
    parity_users = torch.randint(0, len(rows.user_ids), (64,), generator=generator)
    parity_items = torch.randint(0, len(rows.item_ids), (64,), generator=generator)
    return common.check_parity(model, onnx_path, {"user": parity_users, "item": parity_items})


def served_rmse(onnx_path: Path, validation: Validation) -> float:
    """Validation RMSE of the artefact itself, as served."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {"user": validation.users.cpu().numpy(), "item": validation.items.cpu().numpy()}
    return validation.rmse(session.run(None, feeds)[0])


def recommender_assets(split: Split, rows: Rows, baseline: Biases) -> dict:
    """``recommender.json``: the id maps, movie titles, the bias fallback, cold-start and seen lists."""
    all_seen: dict[str, list[str]] = defaultdict(list)
    for u, m in zip(split.data.users.tolist(), split.data.items.tolist(), strict=True):
        all_seen[str(u)].append(str(m))
    return {
        "users": [str(u) for u in rows.user_ids],  # embedding row -> raw MovieLens userId
        "items": [str(m) for m in rows.item_ids],  # embedding row -> raw MovieLens movieId
        "movies": {str(m): {"title": v["title"], "genres": v["genres"]} for m, v in split.movies.items()},
        "baseline": {
            "mean": baseline.mean,
            "user_bias": {str(k): round(v, 5) for k, v in baseline.user.items()},
            "item_bias": {str(k): round(v, 5) for k, v in baseline.item.items()},
        },
        "popular": [str(m) for m in popular_items(split.train)],
        "seen": dict(all_seen),
    }


def train(cfg: Config, command: str = "") -> dict:
    common.seed_everything(cfg.seed)
    device = common.pick_device(cfg.device)
    split = load_split(cfg)
    baseline, baseline_rmse = best_baseline(split.train, split.val)
    tqdm.write(
        f"bias baseline (reg_user={baseline.reg_user}, reg_item={baseline.reg_item}): "
        f"validation RMSE {baseline_rmse:.4f}"
    )
    model, rows = build_model(cfg, split, baseline)
    model = model.to(device)
    validation = Validation(split.val, rows, baseline, device)
    generator = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()
    best_state, best_epoch = fit(model, cfg, split.train, rows, validation, baseline_rmse, generator)
    train_seconds = time.perf_counter() - started
    model = model.cpu()
    model.load_state_dict(best_state)
    model.eval()

    version_dir = cfg.output_dir / cfg.name / str(cfg.version)
    onnx_path = version_dir / "model.onnx"
    parity = export(model, rows, onnx_path, generator)
    model_rmse = served_rmse(onnx_path, validation)
    improvement = (baseline_rmse - model_rmse) / baseline_rmse
    assets = RecommenderFile.model_validate(recommender_assets(split, rows, baseline))  # the service's own contract
    common.write_json(version_dir / "recommender.json", assets.model_dump(mode="json"))
    n_users, n_items = len(rows.user_ids), len(rows.item_ids)
    common.write_model_json(cfg.output_dir / cfg.name, model_config(cfg, n_users, n_items))
    meta = common.write_version_metadata(
        version_dir,
        metrics={
            "validation_rmse": round(model_rmse, 4),
            "baseline_validation_rmse": round(baseline_rmse, 4),
            "rmse_improvement_over_baseline": round(improvement, 4),
            "baseline": f"global mean + user bias + item bias (ALS, reg_user={baseline.reg_user}, "
            f"reg_item={baseline.reg_item}, chosen on the validation split)",
            "validation_pairs": len(split.val.ratings),
            "validation_pairs_with_unknown_user_or_item": int((~validation.known).sum()),
            "best_epoch": best_epoch,
            "measured_on": "exported ONNX model in onnxruntime (CPU), bias fallback for unknown ids",
            "onnx_vs_torch_max_abs_diff": parity,
        },
        dataset={
            "name": "MovieLens latest-small (ratings.csv, movies.csv)",
            "source": "../shared/data/rating/ml-latest-small (see its SOURCE.md)",
            "split": f"temporal: each user's latest {cfg.holdout_fraction:.0%} of ratings (at least one) held out",
            "train_ratings": len(split.train.ratings),
            "validation_ratings": len(split.val.ratings),
            "users": n_users,
            "items": n_items,
        },
        training={
            "config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()},
            "device": str(device),
            "seconds": round(train_seconds, 1),
        },
        command=command,
    )
    print(
        f"wrote {onnx_path}: validation RMSE {model_rmse:.4f} vs baseline {baseline_rmse:.4f} "
        f"({improvement:.2%} better), parity {parity:.2e}"
    )
    return meta


def parse_args(argv: list[str] | None = None) -> Config:
    return common.parse_config(Config, argv, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    return train(parse_args(argv), command=common.command_line("training.rating", argv))


if __name__ == "__main__":
    main()
