"""The local backend's environments: built once from the pinned file, reused, rebuilt when
the pins change or a build was cut short, and a failed build explains itself."""
from __future__ import annotations

import pytest

from harness.backends import BackendError, base
from harness.backends.local import VirtualenvBackend


@pytest.fixture
def images(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "IMAGES_DIR", tmp_path / "images")
    (tmp_path / "images" / "pytorch").mkdir(parents=True)
    return tmp_path / "images"


def pins(images, text):
    (images / "pytorch" / "requirements-cpu.txt").write_text(text)


def test_an_environment_is_built_once_and_reused(tmp_path, images):
    pins(images, "# nothing to install\n")
    first = VirtualenvBackend(tmp_path / "cache")
    first.prepare_environment("pytorch", "cpu")
    path = first.environment_path("pytorch", "cpu")
    assert (path / "bin" / "python").exists() and (path / ".complete").is_file()
    marker = (path / ".complete").stat().st_mtime_ns
    VirtualenvBackend(tmp_path / "cache").prepare_environment("pytorch", "cpu")
    assert (path / ".complete").stat().st_mtime_ns == marker


def test_changed_pins_name_a_new_environment(tmp_path, images):
    backend = VirtualenvBackend(tmp_path / "cache")
    pins(images, "# one\n")
    before = backend.environment_path("pytorch", "cpu")
    pins(images, "# two\n")
    assert backend.environment_path("pytorch", "cpu") != before
    assert before.name.startswith("pytorch-cpu-")


def test_a_build_that_was_cut_short_starts_over(tmp_path, images):
    pins(images, "# nothing\n")
    backend = VirtualenvBackend(tmp_path / "cache")
    path = backend.environment_path("pytorch", "cpu")
    path.mkdir(parents=True)
    (path / "leftover").write_text("half a build")
    backend.prepare_environment("pytorch", "cpu")
    assert not (path / "leftover").exists() and (path / ".complete").is_file()


def test_a_failed_build_says_where_its_log_is(tmp_path, images):
    pins(images, "this is not a requirement ===\n")
    backend = VirtualenvBackend(tmp_path / "cache")
    with pytest.raises(BackendError, match=r"building pytorch-cpu-\w+ failed at .* see .*\.log"):
        backend.prepare_environment("pytorch", "cpu")
    assert not (backend.environment_path("pytorch", "cpu") / ".complete").exists()


def test_a_framework_without_pins_for_a_device(tmp_path, images):
    with pytest.raises(BackendError, match="requirements-gpu.txt is missing: pytorch has no gpu environment"):
        VirtualenvBackend(tmp_path / "cache").prepare_environment("pytorch", "gpu")


def test_build_constraints_are_part_of_the_environment(tmp_path, images):
    pins(images, "# nothing\n")
    backend = VirtualenvBackend(tmp_path / "cache")
    before = backend.environment_path("pytorch", "cpu")
    (images / "pytorch" / "build-constraints.txt").write_text("not a constraint ===\n")
    assert backend.environment_path("pytorch", "cpu") != before
    with pytest.raises(BackendError):  # pip read the constraints, so it was given them
        backend.prepare_environment("pytorch", "cpu")
    log = backend.environment_path("pytorch", "cpu").with_suffix(".log").read_text()
    assert "build-constraints.txt" in log
