"""The rows a recurrent language model's ragged prefill graph takes (``ids``, ``lengths``,
``positions``): one definition for the service and for the training script that writes the graph.
numpy only, so that training imports it on a machine without the service's dependencies."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad_rows(rows: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The prefill graph's right-padded ``ids`` and the ``lengths`` of ``rows``."""
    lengths = np.fromiter((len(r) for r in rows), np.int64, count=len(rows))
    ids = np.full((len(rows), int(lengths.max())), pad, np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids, lengths


def last_positions(lengths: np.ndarray) -> np.ndarray:
    """``positions`` for generation: each row's last token, ``[rows, 1]``."""
    return (np.asarray(lengths, np.int64) - 1)[:, None]


def every_position(lengths: np.ndarray, width: int) -> np.ndarray:
    """``positions`` for scoring: ``0 .. width - 1`` on every row, clipped to the row's last token."""
    lengths = np.asarray(lengths, np.int64)
    return np.minimum(np.arange(width, dtype=np.int64)[None, :], lengths[:, None] - 1)
