"""The face gallery on its own (SQLite and the vectorised index, no HTTP, no model): what is enrolled
is found, survives a restart, is shared by replicas opening one file, and is gone when deleted."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from service.gallery import Gallery

MODEL = "face-embedding/1"


def unit(rng: np.random.Generator, n: int = 1, dim: int = 128) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_a_search_finds_the_enrolled_vector_nearest_to_the_probe_best_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gallery = Gallery(tmp_path / "g.sqlite3")
    people = unit(rng, 50)
    ids = [gallery.add(f"person {i}", MODEL, v).id for i, v in enumerate(people)]
    probe = people[17] + 0.3 * unit(rng)[0]
    matches = gallery.search(MODEL, probe / np.linalg.norm(probe), 5)
    assert matches[0].person == "person 17" and matches[0].id == ids[17]
    assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
    expected = people @ (probe / np.linalg.norm(probe))
    assert abs(matches[0].score - float(expected[17])) < 1e-5


def test_vectors_of_another_model_are_never_compared(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    gallery = Gallery(tmp_path / "g.sqlite3")
    v = unit(rng)[0]
    gallery.add("ada", "face-embedding/1", v)
    assert gallery.search("face-embedding/2", v, 3) == []
    assert [m.person for m in gallery.search("face-embedding/1", v, 3)] == ["ada"]


def test_the_gallery_survives_a_restart(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "g.sqlite3"
    first = Gallery(path)
    v = unit(rng)[0]
    entry = first.add("grace", MODEL, v)
    first.close()
    again = Gallery(path)
    assert [e.id for e in again.entries()[0]] == [entry.id]
    assert again.search(MODEL, v, 1)[0].person == "grace"


def test_two_replicas_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    path = tmp_path / "g.sqlite3"
    a, b = Gallery(path), Gallery(path)
    v, w = unit(rng, 2)
    assert b.search(MODEL, v, 1) == []  # b's index is built (empty) before a writes
    a.add("linus", MODEL, v)
    assert b.search(MODEL, v, 1)[0].person == "linus"
    b.add("margaret", MODEL, w)
    assert a.search(MODEL, w, 1)[0].person == "margaret"
    assert a.delete_person("linus") == 1
    assert [m.person for m in b.search(MODEL, v, 5)] == ["margaret"]


def test_deleting_a_person_deletes_every_vector_of_theirs_and_nothing_else(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    gallery = Gallery(tmp_path / "g.sqlite3")
    for v in unit(rng, 3):
        gallery.add("alan", MODEL, v)
    kept = gallery.add("barbara", MODEL, unit(rng)[0])
    assert gallery.delete_person("alan") == 3
    entries, total = gallery.entries()
    assert total == 1 and [e.id for e in entries] == [kept.id]
    assert gallery.delete(kept.id) is True and gallery.delete(kept.id) is False
    assert gallery.entries() == ([], 0)


def test_listing_pages_and_filters_by_person(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    gallery = Gallery(tmp_path / "g.sqlite3")
    for i, v in enumerate(unit(rng, 7)):
        gallery.add("x" if i % 2 else "y", MODEL, v)
    page, total = gallery.entries(limit=3, offset=0)
    rest, _ = gallery.entries(limit=10, offset=3)
    assert total == 7 and len(page) == 3 and len(rest) == 4
    assert {e.id for e in page}.isdisjoint({e.id for e in rest})
    assert gallery.entries(person="x")[1] == 3


def test_concurrent_enrolments_from_threads_are_all_kept(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    gallery = Gallery(tmp_path / "g.sqlite3")
    vectors = unit(rng, 64)

    def enrol(k: int) -> None:
        for i in range(k, 64, 8):
            gallery.add(f"p{i}", MODEL, vectors[i])

    threads = [threading.Thread(target=enrol, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gallery.entries()[1] == 64
    assert all(gallery.search(MODEL, vectors[i], 1)[0].person == f"p{i}" for i in range(64))


def test_a_write_held_by_another_replica_never_stalls_searches_and_a_busy_write_is_a_503(tmp_path: Path) -> None:
    import sqlite3
    import time

    import pytest

    from service.errors import GalleryBusy

    rng = np.random.default_rng(7)
    path = tmp_path / "g.sqlite3"
    gallery = Gallery(path, timeout_s=0.3)
    v = unit(rng)[0]
    gallery.add("ada", MODEL, v)
    other = sqlite3.connect(str(path), isolation_level=None)  # another replica, mid-write
    other.execute("BEGIN IMMEDIATE")
    try:
        started = time.perf_counter()
        assert gallery.search(MODEL, v, 1)[0].person == "ada"
        assert gallery.entries()[1] == 1
        assert time.perf_counter() - started < 0.2  # readers never wait for a writer (WAL)
        with pytest.raises(GalleryBusy) as caught:
            gallery.add("grace", MODEL, unit(rng)[0])
        assert caught.value.status_code == 503
    finally:
        other.rollback()
    assert gallery.add("grace", MODEL, unit(rng)[0]).person == "grace"  # and once it lets go, writes work
    assert gallery.entries()[1] == 2


def test_vectors_of_another_width_under_one_model_are_skipped_not_an_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    gallery = Gallery(tmp_path / "g.sqlite3")
    gallery.add("wide", MODEL, unit(rng, 1, 256)[0])
    v = unit(rng)[0]
    gallery.add("ada", MODEL, v)
    assert [m.person for m in gallery.search(MODEL, v, 5)] == ["ada"]
