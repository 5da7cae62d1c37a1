"""The real data loaders and the fetch step, on files generated in the official formats."""
from __future__ import annotations

import dataclasses
import errno
import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from bench import data
from bench.specs import CNN_CIFAR10
from bench.specs import CHESTXRAY14_LABELS, DENSENET121_XRAY, GRU_IMDB
from conftest import write_chestxray14, write_cifar10_archive, write_cifar10_batches, write_imdb_npz, write_png


def test_loader_reads_official_batches(cifar10_dir):
    dataset = data.load_cifar10(data.fetch(data.CIFAR10_ARCHIVE, cifar10_dir))
    assert dataset.x_train.shape == (500, 3, 32, 32) and dataset.x_test.shape == (100, 3, 32, 32)
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int32
    assert 0.0 <= dataset.x_train.min() and dataset.x_train.max() <= 1.0
    assert dataset.source == "real"


def test_loader_keeps_channel_major_pixel_order(tmp_path):
    folder = write_cifar10_batches(tmp_path / "cifar-10-batches-py", per_batch=2)
    with open(folder / "data_batch_1", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")[b"data"]
    dataset = data.load_cifar10(folder)
    # The first 1024 bytes of a row are the red plane, row-major.
    np.testing.assert_allclose(dataset.x_train[0, 0].ravel(), raw[0, :1024] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(dataset.x_train[0, 2, 31, 31], raw[0, 3071] / 255.0, rtol=1e-6)


def test_fetch_accepts_the_extracted_folder_itself(cifar10_dir):
    folder = cifar10_dir / "cifar-10-batches-py"
    assert data.fetch(data.CIFAR10_ARCHIVE, folder) == folder


def test_fetch_downloads_checks_and_extracts(tmp_path):
    tarball = write_cifar10_archive(tmp_path / "mirror" / "cifar-10-python.tar.gz")
    archive = dataclasses.replace(data.CIFAR10_ARCHIVE, url=tarball.as_uri(), checksum=data.checksum_of(tarball, "md5"))
    cache = tmp_path / "cache"
    folder = data.fetch(archive, cache)
    assert folder == cache / "cifar-10-batches-py"
    assert (cache / "cifar-10-python.tar.gz").is_file()
    assert data.load_cifar10(folder).x_train.shape == (100, 3, 32, 32)
    assert not list(cache.glob(".extract-*")) and not list(cache.glob("*.part"))


def test_fetch_rejects_an_archive_with_the_wrong_checksum(tmp_path):
    tarball = write_cifar10_archive(tmp_path / "cache" / "cifar-10-python.tar.gz")
    with pytest.raises(data.DataUnavailable, match="MD5 is .*expected c58f30108f718f92721af3b95e74349a"):
        data.fetch(data.CIFAR10_ARCHIVE, tarball.parent)
    assert not (tarball.parent / "cifar-10-batches-py").exists()


def test_an_archive_in_a_read_only_folder_says_to_extract_it_first(tmp_path, monkeypatch):
    # As in a container, whose data folder is mounted read-only (root ignores file modes).
    tarball = write_cifar10_archive(tmp_path / "data" / "cifar-10-python.tar.gz")
    archive = dataclasses.replace(data.CIFAR10_ARCHIVE, checksum=data.checksum_of(tarball, "md5"))

    def read_only(**kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(data.tempfile, "mkdtemp", read_only)
    with pytest.raises(data.DataUnavailable, match=r"cannot extract it into .*Read-only file system.*"
                                                   r"extract it there first.*cifar-10-batches-py/"):
        data.fetch(archive, tarball.parent)


def test_missing_data_says_where_to_put_it_and_offers_synthetic(tmp_path):
    archive = dataclasses.replace(data.CIFAR10_ARCHIVE, url=(tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(data.DataUnavailable) as error:
        data.fetch(archive, tmp_path / "cache")
    message = str(error.value)
    assert str(tmp_path / "cache") in message and "--data synthetic" in message and "--data-dir" in message
    assert not list((tmp_path / "cache").glob("*"))


def test_a_damaged_batch_is_reported_by_name(tmp_path):
    folder = write_cifar10_batches(tmp_path / "cifar-10-batches-py", per_batch=4)
    with open(folder / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, handle, protocol=2)
    with pytest.raises(data.DataUnavailable, match="data_batch_3"):
        data.load_cifar10(folder)


def test_synthetic_data_is_seeded_and_shaped_like_the_task():
    first = data.synthetic(CNN_CIFAR10, CNN_CIFAR10.input_shape, 64, 16, seed=3)
    again = data.synthetic(CNN_CIFAR10, CNN_CIFAR10.input_shape, 64, 16, seed=3)
    assert first.x_train.shape == (64, 3, 32, 32) and first.x_test.shape == (16, 3, 32, 32)
    np.testing.assert_array_equal(first.x_train, again.x_train)
    assert first.source == "synthetic" and set(np.unique(first.y_train)) <= set(range(10))


def test_layout_conversion_moves_channels_last_and_copies_once():
    images = np.arange(2 * 3 * 32 * 32, dtype=np.float32).reshape(2, 3, 32, 32)
    nhwc = data.to_layout(images, "NHWC")
    assert nhwc.shape == (2, 32, 32, 3) and nhwc.flags.c_contiguous
    np.testing.assert_array_equal(nhwc[1, :, :, 2], images[1, 2])
    np.testing.assert_array_equal(data.to_layout(images, "NCHW"), images)
    with pytest.raises(ValueError, match="layout"):
        data.to_layout(images, "CHWN")


def test_a_mirror_replaces_the_official_host(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    tarball = write_cifar10_archive(mirror / "cifar-10-python.tar.gz")
    monkeypatch.setenv("DLBENCH_MIRROR", mirror.as_uri())
    archive = dataclasses.replace(data.CIFAR10_ARCHIVE, checksum=data.checksum_of(tarball, "md5"))
    assert data.download_url(archive) == f"{mirror.as_uri()}/cifar-10-python.tar.gz"
    assert data.fetch(archive, tmp_path / "cache").is_dir()


def test_imdb_is_preprocessed_like_keras(tmp_path):
    path = tmp_path / "imdb.npz"
    reviews = np.empty(3, dtype=object)
    reviews[:] = [[5, 29997, 7], list(range(1, 201)), [40000]]
    np.savez(path, x_train=reviews, y_train=np.array([1, 0, 1]), x_test=reviews[:1], y_test=np.array([0]))
    dataset = data.load_imdb(path, vocabulary=30000, length=150)
    assert dataset.x_train.shape == (3, 150) and dataset.x_train.dtype == np.int32
    # Keras shuffles each split with a RandomState(113); the labels travel with their reviews.
    order = np.arange(3)
    np.random.RandomState(113).shuffle(order)
    np.testing.assert_array_equal(dataset.y_train, np.array([1, 0, 1])[order])
    rows = {len(np.flatnonzero(row)): row for row in dataset.x_train}
    # Start token 1, ids shifted by 3, ids at or above the vocabulary become 2, zeros in front.
    assert tuple(rows[4][-4:]) == (1, 8, 2, 10) and not rows[4][:-4].any()
    assert tuple(rows[2][-2:]) == (1, 2) and not rows[2][:-2].any()
    np.testing.assert_array_equal(rows[150], np.arange(51, 201) + 3)  # truncated at the front


def test_imdb_fetch_checks_the_sha256(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_imdb_npz(mirror / "imdb.npz")
    monkeypatch.setenv("DLBENCH_MIRROR", mirror.as_uri())
    with pytest.raises(data.DataUnavailable, match="SHA256 is .*expected 69664113be7568"):
        data.fetch(data.IMDB_FILE, tmp_path / "cache")
    assert not (tmp_path / "cache" / "imdb.npz").exists()
    checked = dataclasses.replace(data.IMDB_FILE, checksum=data.checksum_of(mirror / "imdb.npz", "sha256"))
    path = data.fetch(checked, tmp_path / "cache")
    assert path == tmp_path / "cache" / "imdb.npz"
    dataset = data.load_imdb(path, GRU_IMDB.vocabulary, GRU_IMDB.input_shape[0])
    assert dataset.x_train.shape == (64, 150) and dataset.x_test.shape == (32, 150)
    assert dataset.x_train.max() < 30000 and (dataset.x_train == 2).any()


def test_a_file_that_is_not_imdb_is_reported(tmp_path):
    np.savez(tmp_path / "imdb.npz", x_train=np.zeros(3))
    with pytest.raises(data.DataUnavailable, match="imdb.npz: 'y_train' is missing"):
        data.load_imdb(tmp_path / "imdb.npz", 30000, 150)


def test_chestxray14_lists_the_official_split_with_multi_hot_labels(tmp_path):
    folder = write_chestxray14(tmp_path / "chestxray14", train=6, test=3)
    assert data.chestxray14_folder(tmp_path) == folder
    dataset = data.load_chestxray14(folder, stored_size=38)
    assert len(dataset.train.paths) == 6 and len(dataset.test.paths) == 3 and dataset.stored_size == 38
    assert dataset.train.labels.shape == (6, len(CHESTXRAY14_LABELS)) == (6, DENSENET121_XRAY.num_classes)
    entries = (folder / "Data_Entry_2017.csv").read_text().splitlines()[1:]
    findings = dict(line.split(",")[:2] for line in entries)
    for path, row in zip(dataset.train.paths, dataset.train.labels):
        named = findings[path.rsplit("/", 1)[1]]
        expected = [] if named == "No Finding" else named.split("|")
        assert [CHESTXRAY14_LABELS[i] for i in np.flatnonzero(row)] == expected


def test_chestxray14_problems_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(data.DataUnavailable, match="ChestX-ray14 is not in .*--data synthetic"):
        data.chestxray14_folder(tmp_path)
    folder = write_chestxray14(tmp_path / "chestxray14", train=4, test=2)
    (folder / "images" / "00000002_000.png").unlink()
    with pytest.raises(data.DataUnavailable, match="train_val_list.txt: 1 of its images are missing .*00000002_000.png"):
        data.load_chestxray14(folder, 38)


def test_generated_pngs_are_valid_images(tmp_path):
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    raw = write_png(tmp_path / "a.png", pixels).read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and b"IHDR" in raw and raw.endswith(b"IEND\xaeB`\x82")


def test_synthetic_multilabel_and_token_data():
    tokens = data.synthetic(GRU_IMDB, GRU_IMDB.input_shape, 8, 4, seed=0)
    assert tokens.x_train.shape == (8, 150) and tokens.x_train.dtype == np.int32
    assert tokens.x_train.max() < GRU_IMDB.vocabulary and set(np.unique(tokens.y_train)) <= {0, 1}
    images = data.synthetic(DENSENET121_XRAY, (3, 32, 32), 8, 4, seed=0)
    assert images.x_train.shape == (8, 3, 32, 32) and images.y_train.shape == (8, 14)
    assert images.y_train.dtype == np.float32 and set(np.unique(images.y_train)) <= {0.0, 1.0}
    assert data.to_layout(tokens.x_train, "TNC") is tokens.x_train  # ids are transposed by the model


def _renamed(pickled: bytes, core: str) -> bytes:
    """A protocol-2 pickle whose numpy module names say ``core`` (the GLOBAL opcode names
    modules as text lines, so the bytes can be replaced)."""
    return pickled.replace(b"numpy._core.", core.encode() + b".").replace(b"numpy.core.", core.encode() + b".")


@pytest.mark.parametrize("core", ["numpy._core", "numpy.core"])
def test_cifar_batches_pickled_by_numpy_1_or_2_load(tmp_path, core):
    folder = write_cifar10_batches(tmp_path / "cifar-10-batches-py", per_batch=4)
    for batch in folder.iterdir():
        batch.write_bytes(_renamed(batch.read_bytes(), core))
    assert core.encode() + b".multiarray" in (folder / "test_batch").read_bytes()
    dataset = data.load_cifar10(folder)
    assert dataset.x_train.shape == (20, 3, 32, 32) and dataset.y_test.shape == (4,)


def test_an_older_numpy_reads_numpy_2s_module_names_as_its_own(monkeypatch):
    monkeypatch.setattr(data, "_NUMPY_CORE", "numpy.core")  # as under MXNet's numpy 1.23
    assert data.local_numpy_module("numpy._core.multiarray") == "numpy.core.multiarray"
    assert data.local_numpy_module("numpy.core") == "numpy.core"
    monkeypatch.setattr(data, "_NUMPY_CORE", "numpy._core")  # numpy 2
    assert data.local_numpy_module("numpy.core.multiarray") == "numpy._core.multiarray"
    assert data.local_numpy_module("numpy") == "numpy" and data.local_numpy_module("numpy.core_x") == "numpy.core_x"


def _numpy_1_npy(member: bytes) -> bytes:
    """A .npy member rewritten as numpy 1 writes it: object arrays pickled with protocol 2,
    naming numpy.core."""
    array = np.load(io.BytesIO(member), allow_pickle=True)
    if not array.dtype.hasobject:
        return member
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, np.lib.format.header_data_from_array_1_0(array))
    buffer.write(_renamed(pickle.dumps(array, protocol=2), "numpy.core"))
    return buffer.getvalue()


def test_imdb_object_arrays_pickled_by_numpy_1_or_2_load(tmp_path):
    numpy_2 = write_imdb_npz(tmp_path / "imdb.npz", train=8, test=4)  # as this numpy 2 writes it
    numpy_1 = tmp_path / "numpy-1.npz"
    with zipfile.ZipFile(numpy_2) as source, zipfile.ZipFile(numpy_1, "w") as target:
        for name in source.namelist():
            target.writestr(name, _numpy_1_npy(source.read(name)))
    with zipfile.ZipFile(numpy_1) as written:
        assert b"cnumpy.core.multiarray" in written.read("x_train.npy")
    for path in (numpy_2, numpy_1):
        dataset = data.load_imdb(path, 30000, 150)
        assert dataset.x_train.shape == (8, 150) and dataset.x_test.shape == (4, 150)
