"""Train a MovieLens recommender (a rating head and a ranking head in one graph) and write it as ONNX.

    python -m training.rating --data-dir ../shared/data/rating/ml-latest-small

Evaluation is temporal, as the service faces it: each user's latest ratings (by timestamp) are the
**test** split, never trained on and never used to choose anything; each user's latest ratings of
what remains are the **validation** split, which chooses the epochs (and the bias baseline's
regularisation). The served graph is then trained on the whole training part for the chosen epochs
and scored once on the test split, in onnxruntime.

Two outputs per (user, movie) pair:

``rating``: keeps a regularised bias model (global mean + user bias + item bias, by alternating least
squares: also the baseline to beat, and the fallback for unknown ids) and adds the user's recent drift
(shrunk mean residual of their latest 30, 10 and 5 ratings), their recent per-genre residuals dotted
with the movie's genres, a dot product of user and movie embeddings, and an MLP over all of it plus
movie features (genres, year, recent residual, popularity). Per-user and per-movie features are
constant tables inside the graph; for training each rating sees them as of just before it. It is not
clipped in the graph (the endpoints clip what they show), so it never ties at the top of the scale.
Scored by RMSE against the bias baseline. Every movie of movies.csv has a row, rated in training or
not; a pair whose user (or movie) has no row gets the bias prediction, in evaluation as in serving.

``score``: a ranking model trained for what users go on to rate next, not for rating values: the user's
vector is a learned, position-weighted mean of the embeddings of the movies they rated last (a
sequence signal: the next movies follow the latest ones), mixed, plus a user embedding; the score is
its dot product with the movie's embedding plus a learned movie prior (popularity). Trained with a full
softmax over every movie on each training rating, from the history just before it. Scored by hit rate
and NDCG at 10 on the later ratings of 4 or more, against popularity (the movies most often rated 4 or
more in training) and against ranking by the rating head, in this script.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from service.tasks.rating import RecommenderFile, top_k
from training import common

RATING_MIN, RATING_MAX = 0.5, 5.0
RELEVANT = 4.0  # a later rating of 4 or more: a movie the user went on to like


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
        default=0.1, metadata={"help": "each user's latest share of ratings held out as the test split"}
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "each user's latest share of the remaining ratings: the validation split (choices)"},
    )
    dim: int = field(default=32, metadata={"help": "rating head: embedding size"})
    hidden: int = field(default=64, metadata={"help": "rating head: MLP width"})
    dropout: float = 0.3
    epochs: int = field(default=8, metadata={"help": "rating head: most epochs (the best on validation is kept)"})
    batch_size: int = 512
    lr: float = 5e-4
    weight_decay: float = field(default=1e-4, metadata={"help": "on the MLP"})
    embed_l2: float = field(default=0.5, metadata={"help": "L2 on the embeddings used in a batch"})
    rank_history: int = field(default=20, metadata={"help": "ranking head: the latest movies a user vector averages"})
    rank_dim: int = field(default=64, metadata={"help": "ranking head: embedding size"})
    rank_epochs: int = field(
        default=16, metadata={"help": "ranking head: most epochs (the best validation NDCG@k is kept)"}
    )
    rank_lr: float = 2e-3
    rank_batch_size: int = 512
    top_k: int = field(default=10, metadata={"help": "the cut-off of hit rate and NDCG"})
    cold_start_items: int = field(default=100, metadata={"help": "how many items the cold-start list keeps"})
    seed: int = 1
    device: str = "auto"
    smoke: bool = field(default=False, metadata={"help": "60 users, two epochs a head: checks the pipeline"})


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
    """rating = mean + b_u + b_i + w . user_features_u + <p_u, q_i> + MLP([p_u, q_i, user_u, item_i]).

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
        """Not clipped to the scale: what is shown is clipped (a clip here would tie the top predictions)."""
        return self.raw(user, item)[0]


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
        "description": f"MovieLens recommender for {n_users} users and {n_items} movies (ml-latest-small, ratings "
        "up to 2018). Inputs: user and item embedding rows (see recommender.json for the id maps). Outputs: "
        "rating, the predicted rating (biases, recent drift, embeddings, MLP), not clipped: the endpoints clip "
        f"what they show to [{RATING_MIN}, {RATING_MAX}]; score, the ranking score (a model trained on what users "
        "rate next, from the movies they rated last): recommendations are sorted by it.",
        "platform": "onnx_onnxv1",
        "inputs": [
            # The embedding rows: a request beyond them is refused before it can fail a batch.
            {"name": "user", "datatype": "INT64", "shape": [-1], "value_range": [0, n_users - 1]},
            {"name": "item", "datatype": "INT64", "shape": [-1], "value_range": [0, n_items - 1]},
        ],
        "outputs": [
            {"name": "rating", "datatype": "FP32", "shape": [-1]},
            {"name": "score", "datatype": "FP32", "shape": [-1]},
        ],
        # Recommendations score every movie for a user: large batches keep that to a few runs.
        "max_batch_size": 2048,
        "dynamic_batching": {"max_queue_delay_ms": 0.0},
        "parameters": {"assets": "recommender.json", "rating_min": RATING_MIN, "rating_max": RATING_MAX},
    }


def pick(data: Ratings, mask: np.ndarray) -> Ratings:
    return Ratings(data.users[mask], data.items[mask], data.ratings[mask], data.timestamps[mask])


class Split(NamedTuple):
    """Per user, by time: ``fit`` < ``val`` < ``test``; ``train`` is ``fit`` and ``val`` together."""

    data: Ratings  # every rating read (all of them feed the served "already seen" lists)
    movies: dict[int, dict]
    train: Ratings  # what the served graph is trained on
    test: Ratings  # each user's latest ratings: scored once, at the end
    fit: Ratings  # the training part less its validation split
    val: Ratings  # each user's latest ratings of the training part: chooses epochs and regularisation


def load_split(cfg: Config) -> Split:
    data = read_ratings(cfg.data_dir / "ratings.csv")
    movies = read_movies(cfg.data_dir / "movies.csv")
    if cfg.smoke:
        data = pick(data, np.isin(data.users, np.unique(data.users)[:60]))
    is_train, is_test = temporal_split(data, cfg.holdout_fraction)
    train = pick(data, is_train)
    is_fit, is_val = temporal_split(train, cfg.validation_fraction)
    return Split(data, movies, train, pick(data, is_test), pick(train, is_fit), pick(train, is_val))


class Rows(NamedTuple):
    """Embedding rows: raw ids in row order, the reverse maps, and each training rating's as-of features."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    user_index: dict[int, int]
    item_index: dict[int, int]
    user_as_of: torch.Tensor
    item_as_of: torch.Tensor

    def of(self, data: Ratings) -> tuple[np.ndarray, np.ndarray]:
        """Rows of these ratings' users and movies (every one must have a row)."""
        users = np.array([self.user_index[int(u)] for u in data.users], dtype=np.int64)
        items = np.array([self.item_index[int(m)] for m in data.items], dtype=np.int64)
        return users, items


def build_model(cfg: Config, train: Ratings, movies: dict[int, dict], baseline: Biases) -> tuple[Recommender, Rows]:
    """The rating network with its feature tables, started from the baseline's biases and a linear drift fit."""
    user_ids = np.unique(train.users)
    # Every movie of movies.csv gets a row, rated in training or not: an unrated one still has genres
    # and a year, and its user's drift and genre affinities still apply (its biases and embedding are 0).
    item_ids = np.unique(np.concatenate([train.items, np.array(sorted(movies), dtype=np.int64)]))
    genre_of = genre_vectors(movies, item_ids)
    user_table, user_as_of = user_features(train, baseline, user_ids, genre_of)
    item_table, item_as_of = item_features(train, baseline, movies, item_ids, genre_of)
    model = Recommender(len(user_ids), len(item_ids), user_table, item_table, baseline.mean, cfg)
    rows = Rows(
        user_ids,
        item_ids,
        {int(u): i for i, u in enumerate(user_ids)},
        {int(m): i for i, m in enumerate(item_ids)},
        user_as_of,
        item_as_of,
    )
    init_drift(model, rows, train, baseline)
    init_biases(model, rows, train, baseline)
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
    """Held-out pairs as embedding rows; a pair whose user or movie has no row gets the bias prediction.
    Predictions are clipped to the scale, as the endpoints show them."""

    def __init__(self, held_out: Ratings, rows: Rows, baseline: Biases, device: torch.device) -> None:
        pairs = zip(held_out.users, held_out.items, strict=True)
        self.known = np.array([int(u) in rows.user_index and int(m) in rows.item_index for u, m in pairs])
        self.users = torch.tensor([rows.user_index.get(int(u), 0) for u in held_out.users], device=device)
        self.items = torch.tensor([rows.item_index.get(int(m), 0) for m in held_out.items], device=device)
        self.fallback = baseline.predict(held_out.users, held_out.items)
        self.ratings = held_out.ratings

    def rmse(self, predictions: np.ndarray) -> float:
        shown = np.clip(predictions, RATING_MIN, RATING_MAX)
        return rmse(np.where(self.known, shown, self.fallback), self.ratings)

    def model_rmse(self, model: Recommender) -> float:
        model.eval()
        with torch.no_grad():
            return self.rmse(model(self.users, self.items).cpu().numpy())


def fit_rating(
    model: Recommender,
    cfg: Config,
    train: Ratings,
    rows: Rows,
    epochs: int,
    generator: torch.Generator,
    validation: Validation | None = None,
) -> tuple[dict[str, torch.Tensor], int, float]:
    """Train the rating head for ``epochs``. With a validation split, keep the weights of the epoch with
    the best validation RMSE (epoch 0, the starting point, included: training must beat it); without
    one, the last. Returns the weights, their epoch and their validation RMSE (nan without one)."""
    device = next(model.parameters()).device
    u_train, i_train = (torch.from_numpy(a).to(device) for a in rows.of(train))
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
    best_rmse = validation.model_rmse(model) if validation is not None else math.nan
    best_state, best_epoch = common.snapshot(model), 0
    if validation is not None:
        tqdm.write(f"rating epoch 0: validation RMSE {best_rmse:.4f}")
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(r_train), generator=generator).to(device)
        for step in tqdm(range(steps), desc=f"rating epoch {epoch}/{epochs}", unit="batch", leave=False):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            pred, p, q = model.raw(u_train[idx], i_train[idx], f_train[idx], g_train[idx])
            loss = F.mse_loss(pred, r_train[idx]) + cfg.embed_l2 * ((p**2).sum(1) + (q**2).sum(1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if validation is None:
            best_state, best_epoch = common.snapshot(model), epoch
            continue
        score = validation.model_rmse(model)
        tqdm.write(f"rating epoch {epoch}: validation RMSE {score:.4f}")
        if score < best_rmse:
            best_rmse, best_epoch = score, epoch
            best_state = common.snapshot(model)
    return best_state, best_epoch, best_rmse


# --- The ranking head -------------------------------------------------------------------------------


class Ranker(nn.Module):
    """score(u, i) = b_i + <v_u, q_i>, v_u = A . (position-weighted mean of the embeddings of the user's
    latest ``rank_history`` movies) + c + p_u.

    The positions' weights are learned (the latest movie may count more than the twentieth); ``b_i`` is
    a learned prior, popularity among what users rate next; a user with no history and no embedding (a
    new user) gets ``b_i + <c, q_i>``, the cold-start ranking.
    """

    def __init__(self, n_users: int, n_items: int, cfg: Config) -> None:
        super().__init__()
        self.pad = n_items  # the history row of "no movie"
        self.history_items = nn.Embedding(n_items + 1, cfg.rank_dim, padding_idx=n_items)
        self.items = nn.Embedding(n_items, cfg.rank_dim)
        self.prior = nn.Embedding(n_items, 1)
        self.users = nn.Embedding(n_users, cfg.rank_dim)
        self.position = nn.Parameter(torch.zeros(cfg.rank_history))
        self.mix = nn.Linear(cfg.rank_dim, cfg.rank_dim)
        nn.init.normal_(self.history_items.weight, std=0.05)
        nn.init.normal_(self.items.weight, std=0.05)
        nn.init.normal_(self.users.weight, std=0.01)
        nn.init.zeros_(self.prior.weight)
        with torch.no_grad():
            self.history_items.weight[self.pad] = 0.0

    def user_vectors(self, users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """``history``: [batch, rank_history] item rows, latest first, padded with ``pad``."""
        weights = torch.softmax(self.position, 0) * (history != self.pad)
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-6)
        recent = (self.history_items(history) * weights.unsqueeze(-1)).sum(1)
        return self.mix(recent) + self.users(users)

    def cold_vector(self) -> torch.Tensor:
        return self.mix.bias

    def scores(self, vectors: torch.Tensor) -> torch.Tensor:
        """[batch, n_items]: every movie's score for each user vector."""
        return vectors @ self.items.weight.T + self.prior.weight[:, 0]


def histories(train: Ratings, rows: Rows, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Item rows of each user's latest ``length`` movies (latest first, padded with the pad row): as of just
    before each training rating (what training predicts from), and as of the end of training (served)."""
    users, items = rows.of(train)
    pad = len(rows.item_ids)
    as_of = np.full((len(users), length), pad, dtype=np.int64)
    final = np.full((len(rows.user_ids), length), pad, dtype=np.int64)
    latest: dict[int, list[int]] = defaultdict(list)
    for k in np.lexsort((train.timestamps, users)):
        h = latest[int(users[k])]
        recent = h[::-1][:length]
        as_of[k, : len(recent)] = recent
        h.append(int(items[k]))
    for u, h in latest.items():
        recent = h[::-1][:length]
        final[u, : len(recent)] = recent
    return torch.from_numpy(as_of), torch.from_numpy(final)


class RankingSplit:
    """What a ranking is scored on: per user row, the movies rated in training (never recommended) and the
    held-out movies rated ``RELEVANT`` or more. Users with none of those are not scored (nor are users
    without a row, which would be cold-start users; a temporal split keeps every user in training)."""

    def __init__(self, train: Ratings, held_out: Ratings, rows: Rows) -> None:
        seen: dict[int, list[int]] = defaultdict(list)
        for u, m in zip(*rows.of(train), strict=True):
            seen[int(u)].append(int(m))
        self.seen = {u: np.array(v, dtype=np.int64) for u, v in seen.items()}
        self.relevant: dict[int, set[int]] = defaultdict(set)  # item rows
        self.n_relevant: dict[int, int] = defaultdict(int)  # with movies that have no row (never hits)
        for u, m, r in zip(held_out.users.tolist(), held_out.items.tolist(), held_out.ratings, strict=True):
            if r >= RELEVANT and u in rows.user_index:
                self.n_relevant[rows.user_index[u]] += 1
                if m in rows.item_index:
                    self.relevant[rows.user_index[u]].add(rows.item_index[m])
        self.users = sorted(self.n_relevant)
        self.item_numbers = rows.item_ids.astype(np.int64)

    def top(self, user: int, scores: np.ndarray, k: int) -> np.ndarray:
        """The user's top k item rows, as the service ranks them (shown score, then id), seen ones left out."""
        candidates = np.ones(len(scores), dtype=bool)
        candidates[self.seen.get(user, [])] = False
        rows = np.flatnonzero(candidates)
        return rows[top_k(scores[rows], self.item_numbers[rows], k)]

    def metrics(self, score_user: Callable[[int], np.ndarray], k: int) -> dict[str, float]:
        """Hit rate@k (a relevant movie in the top k) and NDCG@k (binary gains), averaged over users."""
        hits, ndcg = 0.0, 0.0
        for u in self.users:
            relevant = self.relevant[u]
            gains = [1.0 if m in relevant else 0.0 for m in self.top(u, score_user(u), k).tolist()]
            ideal = sum(1 / math.log2(p + 2) for p in range(min(self.n_relevant[u], k)))
            hits += float(any(gains))
            ndcg += sum(g / math.log2(p + 2) for p, g in enumerate(gains)) / ideal
        n = max(len(self.users), 1)
        return {"hit_rate": round(hits / n, 4), "ndcg": round(ndcg / n, 4)}


def popularity(train: Ratings, rows: Rows) -> np.ndarray:
    """The popularity baseline's score per item row: how many training ratings of RELEVANT or more it has."""
    _, items = rows.of(train)
    return np.bincount(items[train.ratings >= RELEVANT], minlength=len(rows.item_ids)).astype(np.float64)


def ranker_scores(ranker: Ranker, final_history: torch.Tensor) -> np.ndarray:
    """[n_users, n_items] scores of every user (with their history at the end of training) for every movie."""
    ranker.eval()
    with torch.no_grad():
        users = torch.arange(len(final_history), device=final_history.device)
        return ranker.scores(ranker.user_vectors(users, final_history)).cpu().numpy()


def fit_ranker(
    cfg: Config,
    train: Ratings,
    rows: Rows,
    epochs: int,
    generator: torch.Generator,
    device: torch.device,
    held_out: RankingSplit | None = None,
) -> tuple[Ranker, int, dict[str, float]]:
    """Train the ranking head: each training rating is a target, predicted by a softmax over every movie
    from the user's history just before it (the movies of that history, already rated, are left out of
    the softmax). With a held-out split, keep the epoch with the best NDCG@k on it; without one, the last.
    Returns the model, that epoch and its held-out figures (empty without one)."""
    ranker = Ranker(len(rows.user_ids), len(rows.item_ids), cfg).to(device)
    as_of, final = (h.to(device) for h in histories(train, rows, cfg.rank_history))
    users, items = (torch.from_numpy(a).to(device) for a in rows.of(train))
    optimizer = torch.optim.Adam(ranker.parameters(), lr=cfg.rank_lr)
    pad = ranker.pad
    best: tuple[dict[str, torch.Tensor], int, dict[str, float]] = (common.snapshot(ranker), 0, {"ndcg": -1.0})
    steps = math.ceil(len(users) / cfg.rank_batch_size)
    for epoch in range(1, epochs + 1):
        ranker.train()
        order = torch.randperm(len(users), generator=generator).to(device)
        for step in tqdm(range(steps), desc=f"ranking epoch {epoch}/{epochs}", unit="batch", leave=False):
            idx = order[step * cfg.rank_batch_size : (step + 1) * cfg.rank_batch_size]
            history = as_of[idx]
            logits = ranker.scores(ranker.user_vectors(users[idx], history))
            # Already rated (the history): not a candidate for the next rating.
            rated = torch.zeros(len(idx), pad + 1, dtype=torch.bool, device=device)
            rated.scatter_(1, history, True)
            logits = logits.masked_fill(rated[:, :pad], -1e4)
            loss = F.cross_entropy(logits, items[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if held_out is None:
            best = (common.snapshot(ranker), epoch, {})
            continue
        scores = ranker_scores(ranker, final)
        figures = held_out.metrics(lambda u, s=scores: s[u], cfg.top_k)
        tqdm.write(
            f"ranking epoch {epoch}: validation hit rate@{cfg.top_k} {figures['hit_rate']:.4f}, "
            f"NDCG@{cfg.top_k} {figures['ndcg']:.4f}"
        )
        if figures["ndcg"] > best[2]["ndcg"]:
            best = (common.snapshot(ranker), epoch, figures)
    ranker.load_state_dict(best[0])
    ranker.eval()
    return ranker, best[1], best[2]


# --- The served graph -------------------------------------------------------------------------------


class Served(nn.Module):
    """The graph: (user row, movie row) -> (rating, score). The ranking head's user vectors (from each
    user's latest movies in training) are a constant table, so the graph takes nothing but the two rows."""

    def __init__(self, recommender: Recommender, ranker: Ranker, final_history: torch.Tensor) -> None:
        super().__init__()
        self.recommender = recommender
        with torch.no_grad():
            users = torch.arange(len(final_history))
            self.register_buffer("user_vectors", ranker.user_vectors(users, final_history).detach().clone())
            self.register_buffer("item_vectors", ranker.items.weight.detach().clone())
            self.register_buffer("item_prior", ranker.prior.weight[:, 0].detach().clone())

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rating = self.recommender(user, item)
        score = (self.user_vectors[user] * self.item_vectors[item]).sum(1) + self.item_prior[item]
        return rating, score


def export(served: Served, rows: Rows, onnx_path: Path, generator: torch.Generator) -> float:
    """The ONNX graph, parity-checked on random rows; returns the largest difference from torch."""
    served.eval()
    common.export_onnx(
        served,
        (torch.tensor([0, 1]), torch.tensor([0, 1])),
        onnx_path,
        input_names=["user", "item"],
        output_names=["rating", "score"],
        dynamic_axes={"user": {0: "batch"}, "item": {0: "batch"}, "rating": {0: "batch"}, "score": {0: "batch"}},
    )
    parity_users = torch.randint(0, len(rows.user_ids), (64,), generator=generator)
    parity_items = torch.randint(0, len(rows.item_ids), (64,), generator=generator)
    return common.check_parity(served, onnx_path, {"user": parity_users, "item": parity_items})


def test_figures(
    onnx_path: Path, validation: Validation, ranking: RankingSplit, rows: Rows, train: Ratings, cold: np.ndarray, k: int
) -> tuple[float, dict[str, dict[str, float]]]:
    """The exported graph in onnxruntime on the test split: its RMSE; hit rate and NDCG at k of its ranking
    score, of its rating (unclipped, and clipped as the old graph ranked), of popularity (fitted on
    ``train``) and of the cold-start scores (what a user unknown to the model would get)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {"user": validation.users.cpu().numpy(), "item": validation.items.cpu().numpy()}
    rating = session.run(["rating"], feeds)[0]
    n_items = len(rows.item_ids)
    outputs = {}  # user row -> (rating, score) of every movie row, as a recommendations request scores them
    for u in ranking.users:
        feeds = {"user": np.full(n_items, u, dtype=np.int64), "item": np.arange(n_items, dtype=np.int64)}
        outputs[u] = session.run(["rating", "score"], feeds)
    pop = popularity(train, rows)
    figures = {
        "ranking_score": ranking.metrics(lambda u: outputs[u][1], k),
        "popularity": ranking.metrics(lambda u: pop, k),
        "rating_head": ranking.metrics(lambda u: outputs[u][0], k),
        "rating_head_clipped": ranking.metrics(lambda u: np.clip(outputs[u][0], RATING_MIN, RATING_MAX), k),
        "cold_start_scores": ranking.metrics(lambda u: cold, k),
    }
    return validation.rmse(rating), figures


def cold_start(ranker: Ranker, rows: Rows, count: int) -> tuple[np.ndarray, list[str], list[float]]:
    """The ranking head's scores for a new user (no history, no embedding): for every movie row, and the
    ``count`` best movies with their scores, the cold-start list."""
    with torch.no_grad():
        scores = ranker.scores(ranker.cold_vector().unsqueeze(0).cpu())[0].numpy()
    order = top_k(scores, rows.item_ids.astype(np.int64), count)
    return scores, [str(rows.item_ids[j]) for j in order], [round(float(scores[j]), 4) for j in order]


def recommender_assets(
    split: Split, rows: Rows, baseline: Biases, popular: list[str], popular_scores: list[float]
) -> dict:
    """``recommender.json``: the id maps, movie titles, the bias fallback, cold start and seen lists."""
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
        "popular": popular,  # the ranking head's cold-start list, best first
        "popular_scores": popular_scores,
        # Every rating read, test split included: the service never recommends what a user has rated.
        "seen": dict(all_seen),
    }


def train(cfg: Config, command: str = "") -> dict:
    common.seed_everything(cfg.seed)
    device = common.pick_device(cfg.device)
    split = load_split(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()

    # 1. Choices, on the validation split only: the baseline's regularisation, each head's epochs.
    baseline_v, baseline_val_rmse = best_baseline(split.fit, split.val)
    tqdm.write(
        f"bias baseline (reg_user={baseline_v.reg_user}, reg_item={baseline_v.reg_item}): "
        f"validation RMSE {baseline_val_rmse:.4f}"
    )
    rating_epochs = 2 if cfg.smoke else cfg.epochs
    rank_epochs = 2 if cfg.smoke else cfg.rank_epochs
    model_v, rows_v = build_model(cfg, split.fit, split.movies, baseline_v)
    validation_v = Validation(split.val, rows_v, baseline_v, device)
    _, rating_epoch, val_rmse = fit_rating(
        model_v.to(device), cfg, split.fit, rows_v, rating_epochs, generator, validation_v
    )
    ranking_v = RankingSplit(split.fit, split.val, rows_v)
    _, rank_epoch, val_ranking = fit_ranker(cfg, split.fit, rows_v, rank_epochs, generator, device, ranking_v)
    fit_popularity = popularity(split.fit, rows_v)
    val_pop = ranking_v.metrics(lambda u: fit_popularity, cfg.top_k)
    tqdm.write(
        f"chosen on validation: rating epoch {rating_epoch} (RMSE {val_rmse:.4f}), ranking epoch "
        f"{rank_epoch} (NDCG@{cfg.top_k} {val_ranking['ndcg']:.4f}, popularity {val_pop['ndcg']:.4f})"
    )

    # 2. The served graph: both heads trained on the whole training part for the chosen epochs.
    baseline = fit_biases(
        split.train.users, split.train.items, split.train.ratings, baseline_v.reg_user, baseline_v.reg_item
    )
    model, rows = build_model(cfg, split.train, split.movies, baseline)
    state, _, _ = fit_rating(model.to(device), cfg, split.train, rows, rating_epoch, generator)
    model = model.cpu()
    model.load_state_dict(state)
    model.eval()
    ranker, _, _ = fit_ranker(cfg, split.train, rows, rank_epoch, generator, device)
    ranker = ranker.cpu()
    _, final_history = histories(split.train, rows, cfg.rank_history)
    train_seconds = time.perf_counter() - started

    version_dir = cfg.output_dir / cfg.name / str(cfg.version)
    onnx_path = version_dir / "model.onnx"
    parity = export(Served(model, ranker, final_history), rows, onnx_path, generator)

    # 3. The test split, once, through the exported graph.
    validation = Validation(split.test, rows, baseline, torch.device("cpu"))
    baseline_rmse = rmse(validation.fallback, validation.ratings)
    ranking = RankingSplit(split.train, split.test, rows)
    cold_scores, popular, popular_scores = cold_start(ranker, rows, cfg.cold_start_items)
    model_rmse, figures = test_figures(onnx_path, validation, ranking, rows, split.train, cold_scores, cfg.top_k)
    improvement = (baseline_rmse - model_rmse) / baseline_rmse
    ratio = figures["ranking_score"]["ndcg"] / max(figures["popularity"]["ndcg"], 1e-9)

    assets = RecommenderFile.model_validate(
        recommender_assets(split, rows, baseline, popular, popular_scores)
    )  # the contract
    common.write_json(version_dir / "recommender.json", assets.model_dump(mode="json"))
    n_users, n_items = len(rows.user_ids), len(rows.item_ids)
    common.write_model_json(cfg.output_dir / cfg.name, model_config(cfg, n_users, n_items))
    k = cfg.top_k
    meta = common.write_version_metadata(
        version_dir,
        metrics={
            "test_rmse": round(model_rmse, 4),
            "baseline_test_rmse": round(baseline_rmse, 4),
            "rmse_improvement_over_baseline": round(improvement, 4),
            "baseline": f"global mean + user bias + item bias (ALS, reg_user={baseline.reg_user}, "
            f"reg_item={baseline.reg_item}, chosen on the validation split)",
            "test_pairs": len(split.test.ratings),
            "test_pairs_with_unknown_user_or_item": int((~validation.known).sum()),
            "validation_rmse": round(val_rmse, 4),
            "baseline_validation_rmse": round(baseline_val_rmse, 4),
            "rating_epochs": rating_epoch,
            "ranking": {
                "k": k,
                "relevant": f"a test rating of {RELEVANT} or more; movies the user rated in training are never "
                "ranked; popularity is fitted on the same training ratings",
                "test_users": len(ranking.users),
                "test": figures,
                "ndcg_over_popularity": round(ratio, 3),
                "validation_users": len(ranking_v.users),
                "validation": {"ranking_score": val_ranking, "popularity": val_pop},
                "epochs": rank_epoch,
                "ranked_by": f"hit rate@{k}: share of users with a relevant movie in their top {k}; NDCG@{k}: "
                "binary gains, ideal = min(relevant, k) hits; order: score as shown (4 decimals), then movie id",
            },
            "measured_on": "exported ONNX model in onnxruntime (CPU), bias fallback for unknown ids",
            "onnx_vs_torch_max_abs_diff": parity,
        },
        dataset={
            "name": "MovieLens latest-small (ratings.csv, movies.csv): MovieLens users and movies, ratings up to 2018",
            "source": "../shared/data/rating/ml-latest-small (see its SOURCE.md)",
            "split": f"temporal, per user: test = each user's latest {cfg.holdout_fraction:.0%} of ratings (at least "
            f"one); validation = each user's latest {cfg.validation_fraction:.0%} of the rest, which chooses the "
            "epochs and the baseline's regularisation; the served graph is trained on all the rest (validation "
            "included) and scored once on test. Other users' training ratings may be later than a user's test "
            "ratings (a per-user split), for the baselines as for the model",
            "train_ratings": len(split.train.ratings),
            "validation_ratings": len(split.val.ratings),
            "test_ratings": len(split.test.ratings),
            "users": n_users,
            "items": n_items,
            "seen_lists": "recommender.json's seen lists hold every rating read (test included): the service "
            "never recommends a rated movie; the evaluation leaves out the training ratings only",
        },
        training={
            "config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()},
            "device": str(device),
            "seconds": round(train_seconds, 1),
        },
        command=command,
    )
    print(
        f"wrote {onnx_path}: test RMSE {model_rmse:.4f} vs baseline {baseline_rmse:.4f} ({improvement:.2%} better); "
        f"test NDCG@{k} {figures['ranking_score']['ndcg']:.4f} vs popularity {figures['popularity']['ndcg']:.4f} "
        f"({ratio:.2f}x), hit rate@{k} {figures['ranking_score']['hit_rate']:.4f} vs "
        f"{figures['popularity']['hit_rate']:.4f}; rating head as a ranking {figures['rating_head']['ndcg']:.4f}; "
        f"parity {parity:.2e}"
    )
    return meta


def parse_args(argv: list[str] | None = None) -> Config:
    return common.parse_config(Config, argv, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    return train(parse_args(argv), command=common.command_line("training.rating", argv))


if __name__ == "__main__":
    main()
