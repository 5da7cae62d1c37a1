"""Writing data sets in CIFAR-10's official python format (``cifar-10-batches-py``), for the
parity check and the tests: pickled dicts with byte-string keys, ``data`` a uint8 (N, 3072)
array with the red, green and blue planes one after another, ``labels`` a list of ints."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


LABEL_NAMES = [f"class{i}".encode() for i in range(10)]


def _dump(path: Path, payload: dict) -> None:
    # Protocol 2, like the official Python 2 files; arrays as this numpy pickles them (numpy 2:
    # through numpy._core), which the bench reads under numpy 1 too (bench.data.NumpyPickles).
    path.write_bytes(pickle.dumps(payload, protocol=2))


def write_batches(folder: Path, train: list[tuple[np.ndarray, np.ndarray]],
                  test: tuple[np.ndarray, np.ndarray]) -> Path:
    """``train``: five (images, labels) pairs for data_batch_1..5; ``test`` for test_batch.
    Images are uint8, (N, 3, 32, 32) or already flat (N, 3072)."""
    if len(train) != 5:
        raise ValueError("CIFAR-10 has five training batches")
    folder.mkdir(parents=True, exist_ok=True)
    named = [(f"data_batch_{i}", pair) for i, pair in enumerate(train, start=1)] + [("test_batch", test)]
    for name, (images, labels) in named:
        data = np.asarray(images, dtype=np.uint8).reshape(len(images), 3072)
        _dump(folder / name, {b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
                              b"data": data, b"filenames": [f"{name}_{i}.png".encode() for i in range(len(data))]})
    _dump(folder / "batches.meta", {b"label_names": LABEL_NAMES, b"num_cases_per_batch": len(train[0][0]),
                                    b"num_vis": 3072})
    return folder
