"""The face gallery: named face vectors in SQLite, searched with a vectorised in-memory index.

Only vectors are stored, never an image: a row is ``(id, person, model, vector, created)``, where
``model`` is ``name/version`` of the embedding model that made the vector (vectors of different
models are not comparable, so a search only sees its own model's rows; after a model change,
people are enrolled again). Deleting a person deletes every vector of theirs.

Several replicas share one gallery by opening one database file: SQLite's locks serialise their
writes (WAL journal: readers never wait for a writer), and a ``generation`` counter that every
write bumps in the same transaction tells each replica's index when to reload (one indexed read
per search). That holds for replicas on one host sharing a volume (the compose stack); SQLite must
not be put on a network filesystem, so replicas on several hosts need one gallery host (see the
README). Nothing here knows HTTP or ONNX; every method blocks (callers use a worker thread).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import GalleryBusy

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS faces (
    id TEXT PRIMARY KEY,
    person TEXT NOT NULL,
    model TEXT NOT NULL,
    vector BLOB NOT NULL,
    created TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS faces_person ON faces (person);
CREATE INDEX IF NOT EXISTS faces_model ON faces (model);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', 0);
"""


@dataclass(frozen=True)
class Entry:
    id: str
    person: str
    model: str
    created: str


@dataclass(frozen=True)
class Match:
    id: str
    person: str
    score: float


class _Index:
    """One model's vectors (of one width) as a matrix, with their ids and people, as of ``generation``."""

    def __init__(self, generation: int, ids: list[str], people: list[str], matrix: np.ndarray) -> None:
        self.generation, self.ids, self.people, self.matrix = generation, ids, people, matrix


class Gallery:
    """Raises :class:`~service.errors.GalleryBusy` when another replica holds the database past
    ``timeout_s`` (a 503: retry, or another replica)."""

    def __init__(self, path: Path, *, timeout_s: float = 5.0) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Two connections, each used under its own lock from worker threads: a write waiting for
            # another replica's lock never holds up this replica's searches (WAL: readers never wait).
            self._writer = self._connect(timeout_s)
            self._reader = self._connect(timeout_s)
        except (OSError, sqlite3.Error) as exc:
            # The operator's to fix (the path is logged, not shown to clients).
            log.error("the face gallery cannot be opened at %s: %s", path, exc)
            raise GalleryBusy("the face gallery cannot be opened on this replica (see its log)") from None
        self._write_lock, self._read_lock, self._build_lock = threading.Lock(), threading.Lock(), threading.Lock()
        with self._write_lock, _busy():
            self._writer.execute("PRAGMA journal_mode=WAL")
            self._writer.executescript(_SCHEMA)
        self._indexes: dict[tuple[str, int], _Index] = {}

    def _connect(self, timeout_s: float) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=timeout_s, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._writer.close()
            self._reader.close()

    # -- writes: each in one transaction that also bumps the generation ------------------------------

    def add(self, person: str, model: str, vector: np.ndarray) -> Entry:
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        entry = Entry(id=secrets.token_hex(8), person=person, model=model, created=created)
        blob = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        with self._write_lock, _busy(), self._writer:
            self._writer.execute("BEGIN IMMEDIATE")
            self._writer.execute(
                "INSERT INTO faces (id, person, model, vector, created) VALUES (?, ?, ?, ?, ?)",
                (entry.id, person, model, blob, entry.created),
            )
            self._bump()
        return entry

    def delete(self, face_id: str) -> bool:
        with self._write_lock, _busy(), self._writer:
            self._writer.execute("BEGIN IMMEDIATE")
            gone = self._writer.execute("DELETE FROM faces WHERE id = ?", (face_id,)).rowcount
            if gone:
                self._bump()
        return gone > 0

    def delete_person(self, person: str) -> int:
        with self._write_lock, _busy(), self._writer:
            self._writer.execute("BEGIN IMMEDIATE")
            gone = self._writer.execute("DELETE FROM faces WHERE person = ?", (person,)).rowcount
            if gone:
                self._bump()
        return gone

    def _bump(self) -> None:
        self._writer.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")

    # -- reads ---------------------------------------------------------------------------------------

    def entries(self, *, person: str | None = None, limit: int = 100, offset: int = 0) -> tuple[list[Entry], int]:
        where, args = ("WHERE person = ?", [person]) if person is not None else ("", [])
        with self._read_lock, _busy():
            total = self._reader.execute(f"SELECT COUNT(*) FROM faces {where}", args).fetchone()[0]
            rows = self._reader.execute(
                f"SELECT id, person, model, created FROM faces {where} ORDER BY created, id LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
        return [Entry(*row) for row in rows], int(total)

    def search(self, model: str, vector: np.ndarray, k: int) -> list[Match]:
        """The ``k`` entries of ``model`` most like ``vector`` (cosine, vectors being unit), best
        first; a person enrolled several times may appear several times. Only vectors as wide as
        ``vector`` are compared (a repository whose model changed width under one name and version
        leaves the others unmatched, not an error)."""
        probe = np.asarray(vector, dtype=np.float32).ravel()
        index = self._index(model, len(probe))
        if not index.ids:
            return []
        scores = index.matrix @ probe
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Match(index.ids[i], index.people[i], float(scores[i])) for i in top]

    def _generation(self) -> int:
        with self._read_lock, _busy():
            return int(self._reader.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def _index(self, model: str, dim: int) -> _Index:
        generation = self._generation()
        cached = self._indexes.get((model, dim))
        if cached is not None and cached.generation == generation:
            return cached
        # One rebuild at a time: searches that arrive meanwhile take the index it builds.
        with self._build_lock:
            generation = self._generation()
            cached = self._indexes.get((model, dim))
            if cached is not None and cached.generation == generation:
                return cached
            with self._read_lock, _busy():
                rows = self._reader.execute(
                    "SELECT id, person, vector FROM faces WHERE model = ? AND length(vector) = ? ORDER BY id",
                    (model, 4 * dim),
                ).fetchall()
            matrix = np.zeros((len(rows), dim), dtype=np.float32)
            for i, (_, _, blob) in enumerate(rows):
                matrix[i] = np.frombuffer(blob, dtype="<f4")
            matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
            index = _Index(generation, [r[0] for r in rows], [r[1] for r in rows], matrix)
            self._indexes[(model, dim)] = index
            return index


@contextlib.contextmanager
def _busy() -> Iterator[None]:
    """SQLite's "database is locked" (another replica held it past the timeout) as a 503, and any
    other failure of the database file (disk full, unwritable, corrupt) as a 503 with the reason in
    the log."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise GalleryBusy("the face gallery is busy (another replica is writing to it); retry shortly") from None
        log.error("the face gallery failed: %s", exc)
        raise GalleryBusy("the face gallery's database failed on this replica (see its log)") from None
    except sqlite3.DatabaseError as exc:
        log.error("the face gallery failed: %s", exc)
        raise GalleryBusy("the face gallery's database failed on this replica (see its log)") from None
