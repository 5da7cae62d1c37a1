"""The real CIFAR-10 loader and fetch step, on files generated in the official format."""
from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from bench import data
from bench.specs import CNN_CIFAR10
from conftest import write_cifar10_archive, write_cifar10_batches


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
    archive = dataclasses.replace(data.CIFAR10_ARCHIVE, url=tarball.as_uri(), md5=data.md5_of(tarball))
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


def test_missing_data_says_where_to_put_it_and_offers_synthetic(tmp_path):
    archive = dataclasses.replace(data.CIFAR10_ARCHIVE, url=(tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(data.DataUnavailable) as error:
        data.fetch(archive, tmp_path / "cache")
    message = str(error.value)
    assert str(tmp_path / "cache") in message and "--synthetic" in message and "--data-dir" in message
    assert not list((tmp_path / "cache").glob("*"))


def test_a_damaged_batch_is_reported_by_name(tmp_path):
    folder = write_cifar10_batches(tmp_path / "cifar-10-batches-py", per_batch=4)
    with open(folder / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, handle, protocol=2)
    with pytest.raises(data.DataUnavailable, match="data_batch_3"):
        data.load_cifar10(folder)


def test_synthetic_data_is_seeded_and_shaped_like_the_task():
    first = data.synthetic(CNN_CIFAR10, 64, 16, seed=3)
    again = data.synthetic(CNN_CIFAR10, 64, 16, seed=3)
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
    archive = dataclasses.replace(data.CIFAR10_ARCHIVE, md5=data.md5_of(tarball))
    assert data.download_url(archive) == f"{mirror.as_uri()}/cifar-10-python.tar.gz"
    assert data.fetch(archive, tmp_path / "cache").is_dir()
