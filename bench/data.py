"""Datasets: the official CIFAR-10 python archive (fetched, checked, extracted, loaded) and
seeded synthetic data of the same shape. Standard library and numpy only."""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .specs import TaskSpec


class DataUnavailable(Exception):
    """The data set is neither on disk nor downloadable; the message says what to do."""


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str
    filename: str
    folder: str  # the directory the archive extracts to


CIFAR10_ARCHIVE = Archive(
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    filename="cifar-10-python.tar.gz",
    folder="cifar-10-batches-py",
)
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"


@dataclass
class Dataset:
    """Images as float32 in [0, 1], channel-first (N, C, H, W); labels as int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str  # "real" or "synthetic"


def default_data_dir() -> Path:
    return Path(os.environ.get("DLBENCH_DATA_DIR", Path.home() / ".cache" / "dlbench" / "data"))


def download_url(archive: Archive) -> str:
    """The archive's official URL, or the same file name under DLBENCH_MIRROR (a base URL,
    file:// included) for sites that keep their own copies."""
    mirror = os.environ.get("DLBENCH_MIRROR")
    return f"{mirror.rstrip('/')}/{archive.filename}" if mirror else archive.url


def fetch(archive: Archive, data_dir: Path) -> Path:
    """Return the extracted folder of ``archive`` under ``data_dir``, downloading,
    checking and extracting the archive first if it is not there yet."""
    data_dir = Path(data_dir)
    if data_dir.name == archive.folder and data_dir.is_dir():
        return data_dir
    folder = data_dir / archive.folder
    if folder.is_dir():
        return folder
    tarball = data_dir / archive.filename
    if not tarball.is_file():
        _download(archive, tarball)
    actual = md5_of(tarball)
    if actual != archive.md5:
        raise DataUnavailable(
            f"{tarball}: MD5 is {actual}, expected {archive.md5}; the file is damaged or "
            f"not the official archive: delete it and fetch again"
        )
    _extract(tarball, data_dir, archive.folder)
    return folder


def _download(archive: Archive, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    url = download_url(archive)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except (urllib.error.URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise DataUnavailable(
            f"{archive.folder} is not in {target.parent} and {url} could not be "
            f"downloaded ({error}); put {archive.filename} or the extracted {archive.folder} "
            f"folder in {target.parent} (or pass --data-dir), or run with --synthetic"
        ) from error
    os.replace(partial, target)


def _extract(tarball: Path, data_dir: Path, folder: str) -> None:
    # Extract next to the target and rename, so a killed extraction never looks complete.
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=data_dir))
    try:
        with tarfile.open(tarball) as archive:
            archive.extractall(staging, filter="data")
        extracted = staging / folder
        if not extracted.is_dir():
            raise DataUnavailable(f"{tarball}: the archive has no {folder}/ folder")
        os.replace(extracted, data_dir / folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_cifar10(folder: Path) -> Dataset:
    """Read the official python-format batches (pickled dicts with ``data`` and ``labels``)."""
    train = [_read_cifar10_batch(Path(folder) / name) for name in CIFAR10_TRAIN_BATCHES]
    x_test, y_test = _read_cifar10_batch(Path(folder) / CIFAR10_TEST_BATCH)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return Dataset(_scale(x_train), y_train, _scale(x_test), y_test, source="real")


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataUnavailable(f"{path} is missing: {path.parent} is not a complete cifar-10-batches-py folder")
    # The official batches are Python 2 pickles with byte-string keys; the archive's MD5
    # is what makes unpickling it acceptable.
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataUnavailable(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    if labels is None or len(labels) != data.shape[0]:
        raise DataUnavailable(f"{path}: 'labels' must hold one label per image")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int32)


def _scale(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / np.float32(255.0)


def synthetic(spec: TaskSpec, train_examples: int, test_examples: int, seed: int) -> Dataset:
    """Random pixels and labels with the task's shapes, drawn like real 8-bit images."""
    rng = np.random.default_rng(seed)

    def images(n: int) -> np.ndarray:
        return _scale(rng.integers(0, 256, size=(n, *spec.input_shape), dtype=np.uint8))

    def labels(n: int) -> np.ndarray:
        return rng.integers(0, spec.num_classes, size=n, dtype=np.int32)

    return Dataset(images(train_examples), labels(train_examples),
                   images(test_examples), labels(test_examples), source="synthetic")


def to_layout(images: np.ndarray, layout: str) -> np.ndarray:
    """Channel-first images in the layout a model takes (NCHW or NHWC), contiguous, so that
    the conversion happens once, outside any timed region."""
    if layout == "NHWC":
        return np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    if layout == "NCHW":
        return np.ascontiguousarray(images)
    raise ValueError(f"unknown layout {layout!r}")
