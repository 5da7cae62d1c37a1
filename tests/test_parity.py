"""The parity check: a small real data set in CIFAR-10's format, and frameworks agreeing on it."""
from __future__ import annotations

import numpy as np
import pytest

from bench.data import load_cifar10
from harness.parity import LOCAL_FRAMEWORKS
from harness import parity


def test_digits_are_written_in_cifar10s_official_format(tmp_path):
    train, test = parity.write_digits_as_cifar10(tmp_path / "cifar-10-batches-py")
    assert (train, test) == (1437, 360)
    dataset = load_cifar10(tmp_path / "cifar-10-batches-py")  # the bench's real loader
    assert dataset.x_train.shape == (1437, 3, 32, 32) and dataset.x_test.shape == (360, 3, 32, 32)
    assert sorted(np.unique(dataset.y_test)) == list(range(10))
    image = dataset.x_train[0]
    np.testing.assert_array_equal(image[0], image[2])  # grey: the same plane three times
    np.testing.assert_array_equal(image[0, :4, :4], np.full((4, 4), image[0, 0, 0]))  # 4x4 blocks
    assert dataset.x_train.max() == 1.0


@pytest.mark.integration
def test_every_framework_agrees_on_real_digits(tmp_path, capsys):
    status = parity.main(["--epochs", "3", "--backend", "local", "--results", str(tmp_path / "parity")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"parity: ok, {len(LOCAL_FRAMEWORKS)} frameworks agree within 0.05" in out
