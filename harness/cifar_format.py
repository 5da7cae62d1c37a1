"""Writing data sets in CIFAR-10's official python format (``cifar-10-batches-py``), for the
parity check and the tests: pickled dicts with byte-string keys, ``data`` a uint8 (N, 3072)
array with the red, green and blue planes one after another, ``labels`` a list of ints."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np


LABEL_NAMES = [f"class{i}".encode() for i in range(10)]


class PortablePickler(pickle.Pickler):
    """Pickles arrays through ``numpy.ndarray`` itself: numpy 2 would otherwise name its
    private ``numpy._core`` module, which the numpy 1.x of MXNet and Chainer cannot load (the
    official files, written by numpy 1, load everywhere). Object arrays (Keras's imdb.npz)
    are rebuilt from their list of items, as numpy's own pickles do."""

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
            return np.ndarray, ((0,), object), (1, obj.shape, np.dtype(object), False, list(obj.ravel()))
        if isinstance(obj, np.ndarray):
            return np.ndarray, (obj.shape, obj.dtype.str, np.ascontiguousarray(obj).tobytes())
        return NotImplemented


def _dump(path: Path, payload: dict) -> None:
    buffer = io.BytesIO()
    PortablePickler(buffer, protocol=2).dump(payload)  # protocol 2, like the official Python 2 files
    path.write_bytes(buffer.getvalue())


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
