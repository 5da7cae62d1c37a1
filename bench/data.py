"""Datasets in their official formats, fetched with a checksum and loaded; and seeded synthetic
data of the same shapes. Standard library and numpy only.

- CIFAR-10: the "python version" archive (pickled batches), MD5-checked, extracted.
- IMDB: Keras's ``imdb.npz`` (index sequences), SHA-256-checked, preprocessed like Keras
  (start 1, out-of-vocabulary 2, ids from 3) and padded/truncated at the front.
- ChestX-ray14: PNG files under ``images/`` with ``Data_Entry_2017.csv`` and the official
  ``train_val_list.txt`` / ``test_list.txt``; only listed here, decoded by each framework's
  own input pipeline.
"""
import csv
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .specs import CHESTXRAY14_LABELS, TaskSpec


class DataUnavailable(Exception):
    """The data set is neither on disk nor downloadable; the message says what to do."""


# numpy 2 pickles its arrays through ``numpy._core``, numpy 1 through ``numpy.core``; numpy
# before 1.26 has no ``numpy._core`` at all (MXNet's environment), and numpy 2 warns on
# ``numpy.core``. Pickled data names this numpy's own module, whichever numpy wrote it.
_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"


def local_numpy_module(module: str) -> str:
    """A module a pickle names, as this numpy calls it."""
    for core in ("numpy._core", "numpy.core"):
        if module == core or module.startswith(core + "."):
            return _NUMPY_CORE + module[len(core):]
    return module


class NumpyPickles(pickle.Unpickler):
    """Unpickles data written by numpy 1 or numpy 2 with either."""

    def find_class(self, module: str, name: str):
        return super().find_class(local_numpy_module(module), name)


@dataclass(frozen=True)
class Download:
    url: str
    filename: str
    algorithm: str  # hashlib name of the published checksum
    checksum: str
    folder: Optional[str] = None  # the directory an archive extracts to; None: used as is


CIFAR10_ARCHIVE = Download(
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    filename="cifar-10-python.tar.gz",
    algorithm="md5",
    checksum="c58f30108f718f92721af3b95e74349a",
    folder="cifar-10-batches-py",
)
CIFAR10_TRAIN_BATCHES = tuple("data_batch_{}".format(i) for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"

IMDB_FILE = Download(
    url="https://storage.googleapis.com/tensorflow/tf-keras-datasets/imdb.npz",
    filename="imdb.npz",
    algorithm="sha256",
    checksum="69664113be75683a8fe16e3ed0ab59fda8886cb3cd7ada244f7d9544e4676b9f",
)
# Keras's preprocessing, which the seed used.
IMDB_SHUFFLE_SEED = 113
IMDB_START, IMDB_OOV, IMDB_INDEX_FROM = 1, 2, 3

CHESTXRAY14_FOLDER = "chestxray14"
CHESTXRAY14_ENTRIES = "Data_Entry_2017.csv"
CHESTXRAY14_SPLITS = ("train_val_list.txt", "test_list.txt")


@dataclass
class Dataset:
    """Examples as arrays. Images: float32 in [0, 1], channel-first (N, C, H, W); token
    sequences: int32 (N, T). Labels: int32 classes (N,) or float32 multi-hot (N, labels)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str  # "real" or "synthetic"


@dataclass
class ImageFiles:
    """Image files and their labels, read by a framework's own input pipeline."""

    paths: List[str]
    labels: np.ndarray  # float32 multi-hot (N, labels)


@dataclass
class ImageFolderDataset:
    train: ImageFiles
    test: ImageFiles
    stored_size: int  # images are resized to this square, then cropped to the input size
    source: str = "real"


Data = Union[Dataset, ImageFolderDataset]


def default_data_dir() -> Path:
    return Path(os.environ.get("DLBENCH_DATA_DIR", str(Path.home() / ".cache" / "dlbench" / "data")))


def download_url(download: Download) -> str:
    """The file's official URL, or the same file name under DLBENCH_MIRROR (a base URL,
    file:// included) for sites that keep their own copies."""
    mirror = os.environ.get("DLBENCH_MIRROR")
    return "{}/{}".format(mirror.rstrip("/"), download.filename) if mirror else download.url


def fetch(download: Download, data_dir: Path) -> Path:
    """The data under ``data_dir`` (the extracted folder, or the file itself), downloading,
    checking and extracting it first if it is not there yet. A file or folder already in
    place is the user's and is used as it is."""
    data_dir = Path(data_dir)
    name = download.folder or download.filename
    if data_dir.name == name and data_dir.exists():
        return data_dir
    target = data_dir / name
    if target.exists():
        return target
    local = data_dir / download.filename
    if not local.is_file():
        _download(download, local)
    elif download.folder:
        _verify(download, local)  # an archive is only extracted once it is known to be the official one
    if download.folder:
        _extract(local, data_dir, download.folder)
    return target


def _verify(download: Download, path: Path, shown_as: Optional[Path] = None) -> None:
    actual = checksum_of(path, download.algorithm)
    if actual != download.checksum:
        raise DataUnavailable(
            "{}: {} is {}, expected {}; the file is damaged or not the official one: delete it "
            "and fetch again".format(shown_as or path, download.algorithm.upper(), actual, download.checksum))


def _download(download: Download, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    url = download_url(download)
    name = download.folder or download.filename
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(str(partial), "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except (urllib.error.URLError, OSError) as error:
        _remove(partial)
        extra = " or the extracted {} folder".format(download.folder) if download.folder else ""
        raise DataUnavailable(
            "{} is not in {} and {} could not be downloaded ({}); put {}{} in {} (or pass "
            "--data-dir), or run with --data synthetic".format(
                name, target.parent, url, error, download.filename, extra, target.parent)) from error
    try:
        _verify(download, partial, shown_as=target)  # only a checked file takes the real name
    except DataUnavailable:
        _remove(partial)
        raise
    os.replace(str(partial), str(target))


def _remove(path: Path) -> None:
    # Checked first: on a read-only folder (a container's data mount) unlinking a file that is
    # not there fails as read-only, not as missing.
    if os.path.lexists(str(path)):
        path.unlink()


def _extract(tarball: Path, data_dir: Path, folder: str) -> None:
    # Extract next to the target and rename, so a killed extraction never looks complete.
    try:
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=str(data_dir)))
    except OSError as error:  # a container's data folder is mounted read-only
        raise DataUnavailable("{}: cannot extract it into {} ({}); extract it there first, where the folder "
                              "is writable (tar -xzf {} gives {}/)".format(tarball, data_dir, error.strerror,
                                                                          tarball.name, folder)) from error
    try:
        with tarfile.open(str(tarball)) as archive:
            for member in archive.getmembers():
                # Only plain files and folders inside the target: the checks of tarfile's
                # "data" filter, which Python 3.6 lacks.
                parts = Path(member.name).parts
                if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                    raise DataUnavailable("{}: unsafe member {!r} in the archive".format(tarball, member.name))
            archive.extractall(str(staging))
        extracted = staging / folder
        if not extracted.is_dir():
            raise DataUnavailable("{}: the archive has no {}/ folder".format(tarball, folder))
        os.replace(str(extracted), str(data_dir / folder))
    finally:
        shutil.rmtree(str(staging), ignore_errors=True)


def checksum_of(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(str(path), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# CIFAR-10 ---------------------------------------------------------------------------------

def load_cifar10(folder: Path) -> Dataset:
    """Read the official python-format batches (pickled dicts with ``data`` and ``labels``)."""
    train = [_read_cifar10_batch(Path(folder) / name) for name in CIFAR10_TRAIN_BATCHES]
    x_test, y_test = _read_cifar10_batch(Path(folder) / CIFAR10_TEST_BATCH)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return Dataset(_scale(x_train), y_train, _scale(x_test), y_test, source="real")


def _read_cifar10_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataUnavailable("{} is missing: {} is not a complete cifar-10-batches-py folder".format(
            path, path.parent))
    # The official batches are Python 2 pickles with byte-string keys; the archive's MD5
    # is what makes unpickling it acceptable.
    with open(str(path), "rb") as handle:
        batch = NumpyPickles(handle, encoding="bytes").load()
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataUnavailable("{}: 'data' must be a uint8 array of shape (N, 3072)".format(path))
    if labels is None or len(labels) != data.shape[0]:
        raise DataUnavailable("{}: 'labels' must hold one label per image".format(path))
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int32)


def _scale(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / np.float32(255.0)


# IMDB -------------------------------------------------------------------------------------

def _read_npy(handle) -> np.ndarray:
    """One .npy member as np.load reads it, but object arrays through NumpyPickles (np.load
    takes no unpickler of ours)."""
    buffer = io.BytesIO(handle.read())
    version = np.lib.format.read_magic(buffer)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    _, _, dtype = read_header(buffer)
    if dtype.hasobject:
        return NumpyPickles(buffer, encoding="latin1").load()
    buffer.seek(0)
    return np.lib.format.read_array(buffer, allow_pickle=False)


def load_imdb(path: Path, vocabulary: int, length: int) -> Dataset:
    """Keras's ``imdb.load_data(num_words=vocabulary)`` followed by ``pad_sequences(maxlen=
    length)``: shuffled with seed 113, start token 1, ids shifted by 3, ids at or above the
    vocabulary replaced by 2, then padded with 0 and truncated at the front."""
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        # The sequences are object arrays of lists, so the file holds pickles; it is the
        # checksummed official file or one the user put there.
        with zipfile.ZipFile(str(path)) as archive:
            members = {name[:-len(".npy")]: name for name in archive.namelist() if name.endswith(".npy")}
            missing = [key for key in keys if key not in members]
            if missing:
                raise DataUnavailable("{}: '{}' is missing; not a Keras imdb.npz file".format(path, missing[0]))
            parts = {}
            for key in keys:
                with archive.open(members[key]) as member:
                    parts[key] = _read_npy(member)
    except (OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
        raise DataUnavailable("{}: not a readable imdb.npz ({})".format(path, error)) from None
    shuffle = np.random.RandomState(IMDB_SHUFFLE_SEED)
    split = []
    for x_key, y_key in (("x_train", "y_train"), ("x_test", "y_test")):
        sequences, labels = parts[x_key], parts[y_key]
        if len(sequences) != len(labels):
            raise DataUnavailable("{}: {} and {} differ in length".format(path, x_key, y_key))
        order = np.arange(len(sequences))
        shuffle.shuffle(order)
        tokens = np.stack([_imdb_tokens(sequences[i], vocabulary, length) for i in order]) \
            if len(order) else np.zeros((0, length), np.int32)
        split += [tokens, np.asarray(labels, dtype=np.int32)[order]]
    return Dataset(*split, source="real")


def _imdb_tokens(sequence: Sequence[int], vocabulary: int, length: int) -> np.ndarray:
    ids = np.concatenate([[IMDB_START], np.asarray(sequence, dtype=np.int64) + IMDB_INDEX_FROM])
    ids[ids >= vocabulary] = IMDB_OOV
    ids = ids[-length:]  # truncating="pre"
    padded = np.zeros(length, dtype=np.int32)  # padding="pre"
    padded[length - len(ids):] = ids
    return padded


# ChestX-ray14 -----------------------------------------------------------------------------

def chestxray14_folder(data_dir: Path) -> Path:
    """ChestX-ray14 has no single download with a checksum (it is a set of archives behind
    NIH's file sharing): the extracted data must be put in place by hand."""
    data_dir = Path(data_dir)
    for folder in (data_dir, data_dir / CHESTXRAY14_FOLDER):
        if (folder / CHESTXRAY14_ENTRIES).is_file():
            return folder
    raise DataUnavailable(
        "ChestX-ray14 is not in {}: download it from NIH (https://nihcc.app.box.com/v/ChestXray-NIHCC), "
        "extract the images into {}/images/ next to {} and {}, or run with --data synthetic".format(
            data_dir, data_dir / CHESTXRAY14_FOLDER, CHESTXRAY14_ENTRIES, " and ".join(CHESTXRAY14_SPLITS)))


def load_chestxray14(folder: Path, stored_size: int) -> ImageFolderDataset:
    """The official split: file names from the two lists, findings ("A|B", or "No Finding")
    from the CSV as 14-long multi-hot rows."""
    folder = Path(folder)
    findings = {}
    with open(str(folder / CHESTXRAY14_ENTRIES), newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                findings[row["Image Index"]] = row["Finding Labels"]
            except KeyError as error:
                raise DataUnavailable("{}: column {} is missing".format(folder / CHESTXRAY14_ENTRIES, error)) from None
    splits = []
    for split in CHESTXRAY14_SPLITS:
        path = folder / split
        if not path.is_file():
            raise DataUnavailable("{} is missing: {} is not a complete ChestX-ray14 folder".format(path, folder))
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        unknown = [name for name in names if name not in findings]
        if unknown:
            raise DataUnavailable("{}: {} is not in {}".format(path, unknown[0], CHESTXRAY14_ENTRIES))
        missing = [name for name in names if not (folder / "images" / name).is_file()]
        if missing:
            raise DataUnavailable("{}: {} of its images are missing from {}, {} the first".format(
                path, len(missing), folder / "images", missing[0]))
        labels = np.array([_multi_hot(findings[name]) for name in names], dtype=np.float32).reshape(
            len(names), len(CHESTXRAY14_LABELS))
        splits.append(ImageFiles([str(folder / "images" / name) for name in names], labels))
    return ImageFolderDataset(splits[0], splits[1], stored_size)


def _multi_hot(findings: str) -> List[float]:
    present = set(findings.split("|"))
    return [1.0 if label in present else 0.0 for label in CHESTXRAY14_LABELS]


# Synthetic data and layouts ---------------------------------------------------------------

def synthetic(spec: TaskSpec, input_shape: Tuple[int, ...], train_examples: int,
              test_examples: int, seed: int) -> Dataset:
    """Random inputs and labels with the task's shapes: images drawn like 8-bit pixels,
    token ids below the vocabulary, one class or a random multi-hot row per example."""
    rng = np.random.default_rng(seed)

    def inputs(n: int) -> np.ndarray:
        if spec.vocabulary:
            return rng.integers(0, spec.vocabulary, size=(n,) + tuple(input_shape), dtype=np.int32)
        return _scale(rng.integers(0, 256, size=(n,) + tuple(input_shape), dtype=np.uint8))

    def labels(n: int) -> np.ndarray:
        if spec.kind == "multilabel":
            return (rng.random((n, spec.num_classes)) < 0.2).astype(np.float32)
        return rng.integers(0, max(spec.num_classes, 1), size=n, dtype=np.int32)

    return Dataset(inputs(train_examples), labels(train_examples),
                   inputs(test_examples), labels(test_examples), source="synthetic")


def to_layout(inputs: np.ndarray, layout: str) -> np.ndarray:
    """Channel-first images in the layout a model takes (NCHW or NHWC), contiguous, so that
    the conversion happens once, outside any timed region. Token sequences (2-D) pass as
    they are: their layout names the recurrent layer's (NTC or TNC), which the framework
    reaches by transposing the ids, not the data."""
    if inputs.ndim == 2:
        return inputs
    if layout == "NHWC":
        return np.ascontiguousarray(inputs.transpose(0, 2, 3, 1))
    if layout == "NCHW":
        return np.ascontiguousarray(inputs)
    raise ValueError("unknown layout {!r}".format(layout))
