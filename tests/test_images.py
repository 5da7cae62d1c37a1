"""images/: the catalog of variants, each framework's Dockerfile, and image recipes whose tag
changes exactly when something that goes into the image changes."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from bench.specs import FRAMEWORKS
from conftest import REPO, write_matrix
from harness import images
from harness.images import BuildOptions, load_catalog, recipe
from harness.matrix import MatrixError

CATALOG = load_catalog()


def test_every_framework_has_a_dockerfile_a_cpu_variant_and_gpu_variants():
    for framework in FRAMEWORKS:
        assert (REPO / "images" / framework / "Dockerfile").is_file()
        devices = [v.device for v in CATALOG.frameworks[framework]]
        assert devices[0] == "cpu" and "gpu" in devices, framework


@pytest.mark.parametrize("framework, cudas", [
    ("pytorch", {"13.0", "12.8", "12.6", "11.8"}), ("mxnet", {"11.2", "11.7"}), ("chainer", {"11.8", "12.2"}),
    ("cntk", {"10.0"}), ("jax", {"12.8"})])
def test_the_cuda_builds_each_framework_offers(framework, cudas):
    assert {v.cuda for v in CATALOG.frameworks[framework] if v.device == "gpu"} == cudas


def test_a_cell_gets_the_variant_of_its_device_and_cuda_version():
    assert CATALOG.variant_for("pytorch", "cpu", "auto").variant.variant == "cpu"
    assert CATALOG.variant_for("pytorch", "gpu", "auto").variant.variant == "cuda13.0"  # the newest, host unknown
    assert CATALOG.variant_for("pytorch", "gpu", "11.8").variant.requirements == "requirements-cu118.txt"
    assert CATALOG.variant_for("mxnet", "gpu", "12.4") == (
        "no mxnet release in images/catalog.yml is built for CUDA 12.4 (it has 11.7, 11.2)")


R535 = dict(driver="535.104.05", driver_cuda="12.2")  # a driver for CUDA 12.2: no CUDA 13 build runs
V100, A100, H100 = "7.0", "8.0", "9.0"


@pytest.mark.parametrize("framework, capability, variant, jit", [
    # CUDA 13.0 needs R580; the CUDA 12.8 build dropped Volta, so a V100 gets CUDA 12.6.
    ("pytorch", V100, "cuda12.6", False), ("pytorch", A100, "cuda12.8", False), ("pytorch", H100, "cuda12.8", False),
    ("tensorflow", A100, "cuda12.5", False), ("jax", H100, "cuda12.8", False), ("chainer", H100, "cuda12.2", False),
    # MXNet's newest build has code up to sm_86 and PTX an R535 driver compiles for Hopper.
    ("mxnet", A100, "cuda11.7", False), ("mxnet", H100, "cuda11.7", True), ("cntk", V100, "cuda10.0", False)])
def test_cuda_auto_takes_the_newest_build_the_driver_runs_with_code_for_the_gpu(framework, capability, variant, jit):
    choice = CATALOG.variant_for(framework, "gpu", "auto", images.GpuHost(**R535, compute_capability=capability))
    assert isinstance(choice, images.Choice), choice
    assert (choice.variant.variant, choice.jit) == (variant, jit), choice.why


def test_the_reasons_a_gpu_cell_cannot_run_on_this_host_are_given():
    def why(framework, capability, cuda="auto"):
        return CATALOG.variant_for(framework, "gpu", cuda, images.GpuHost(**R535, compute_capability=capability))

    assert why("pytorch", H100).why.startswith("native code for compute capability 9.0 (newer builds passed over: "
                                               "the cuda13.0 image needs driver 580.65.06 or newer")
    assert why("pytorch", H100, cuda="13.0") == ("the cuda13.0 image needs driver 580.65.06 or newer "
                                                 "(this host has 535.104.05)")
    assert why("cntk", H100) == ("no cntk GPU image runs on driver 535.104.05 (CUDA 12.2), compute capability 9.0: "
                                 "the cuda10.0 image is built for compute capability 3.0, 3.5, 3.7, 5.0, 5.2, 6.0, "
                                 "6.1, 7.0; the GPU is 9.0")
    # Hopper runs TensorFlow's PTX only through a driver as new as its CUDA 12.5.
    assert "needs its PTX compiled by a driver for CUDA 12.5 or newer (this host's is for CUDA 12.2)" in \
        why("tensorflow", H100)
    newer = images.GpuHost("580.65.06", "13.0", H100)
    assert CATALOG.variant_for("tensorflow", "gpu", "auto", newer).jit
    assert CATALOG.variant_for("pytorch", "gpu", "auto", newer).variant.variant == "cuda13.0"
    # Sm_86 code runs on an sm_89 GPU (same major architecture, a later revision), not on sm_80.
    assert not CATALOG.variant_for("mxnet", "gpu", "11.7", images.GpuHost(**R535, compute_capability="8.9")).jit


def test_every_variant_can_run_the_bench_on_its_python():
    """Each framework module parses under the oldest Python of its images, the shared bench
    modules under the oldest of all (CNTK's 3.6, which tests/test_py36.py checks further)."""
    oldest = {name: min(tuple(map(int, v.python.split("."))) for v in variants)
              for name, variants in CATALOG.frameworks.items()}
    for framework, version in oldest.items():
        module = "keras" if framework.startswith("keras-") else framework
        source = (REPO / "bench" / "frameworks" / f"{module}.py").read_text()
        ast.parse(source, feature_version=version)


def test_requirement_files_pin_every_package():
    for framework, variants in CATALOG.frameworks.items():
        for variant in variants:
            path = REPO / "images" / framework / variant.requirements
            for line in path.read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    assert re.fullmatch(r"[A-Za-z0-9_.\[\]-]+==[\w.+]+", line.strip()), (path, line)


def catalog_file(tmp_path, text):
    return write_matrix(tmp_path / "catalog.yml", text)


@pytest.mark.parametrize("text, message", [
    ("frameworks:\n  pytorch:\n    - {variant: cpu, device: cpu, base: cpu, python: '3.11'}\n",
     r"catalog.yml:3: frameworks.pytorch\[0\].requirements: required key 'requirements' is missing"),
    ("frameworks:\n  pytorch:\n    - {variant: gpu, device: gpu, base: x, python: '3.11', requirements: requirements-gpu.txt}\n",
     r"catalog.yml:3: .*a gpu variant names its cuda version"),
    ("frameworks:\n  torch: []\n", r"catalog.yml:2: frameworks.torch: 'torch' is not allowed"),
    ("frameworks:\n  pytorch:\n    - {variant: cpu, device: cpu, base: cpu, python: '3.11', requirements: requirements-cpu.txt, tag: x}\n",
     r"catalog.yml:3: frameworks.pytorch\[0\].tag: unknown key 'tag'; allowed keys here: variant, device, base"),
])
def test_a_bad_catalog_names_the_line_and_the_fix(tmp_path, text, message):
    with pytest.raises(MatrixError, match=message):
        load_catalog(catalog_file(tmp_path, text))


def test_a_catalog_naming_a_missing_requirement_file(tmp_path):
    text = "frameworks:\n" + "".join(
        f"  {name}:\n    - {{variant: cpu, device: cpu, base: cpu, python: '3.11', requirements: "
        f"{'requirements-nope.txt' if name == 'chainer' else 'requirements-cpu.txt'}}}\n" for name in FRAMEWORKS)
    with pytest.raises(MatrixError, match=r"frameworks.chainer\[0\].requirements: images/chainer/requirements-nope.txt "
                                          r"does not exist; add it or fix the name"):
        load_catalog(catalog_file(tmp_path, text))


def pytorch_cpu(options=BuildOptions()):
    return recipe("pytorch", CATALOG.variant_for("pytorch", "cpu", "auto").variant, options)


def copied_paths(dockerfile: str, build_args: dict[str, str]) -> list[tuple[str, bool]]:
    """The context paths a Dockerfile's COPY lines name, with the build arguments filled in,
    each with whether it must exist (a wildcard may match nothing)."""
    paths = []
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, flags=re.M):
        for source in line.split()[:-1]:
            source = re.sub(r"\$\{(\w+)\}", lambda m: build_args[m.group(1)], source)
            paths.append((source, not re.search(r"[*?[]", source)))
    return paths


@pytest.mark.parametrize("framework", ["pytorch", "chainer", "mxnet", "cntk"])
def test_the_context_holds_the_repository_paths_the_dockerfile_copies(tmp_path, framework):
    made = recipe(framework, CATALOG.variant_for(framework, "cpu", "auto").variant, BuildOptions())
    made.write_context(tmp_path)
    dockerfile = (tmp_path / made.dockerfile).read_text()
    for source, required in copied_paths(dockerfile, made.build_args):
        matched = list(tmp_path.glob(source.rstrip("/"))) if not required else [tmp_path / source]
        assert not required or matched[0].exists(), source
        if framework == "chainer" and "build-constraints" in source:
            assert matched, "chainer's build constraints are copied"
    assert (tmp_path / "bench" / "__main__.py").is_file() and (tmp_path / "bench" / "result.schema.json").is_file()
    assert not list(tmp_path.rglob("__pycache__"))
    assert made.build_args["FRAMEWORK"] == framework
    assert made.build_args["SYSTEM_PACKAGES"] == ("libgomp1 libquadmath0" if framework == "mxnet" else "")
    assert made.labels["org.dlbench.bench-hash"] == made.build_args["BENCH_HASH"]
    if framework != "cntk":
        assert made.build_args["BASE_IMAGE"] == "debian:bookworm-slim"


def test_one_shared_dockerfile_builds_every_framework_but_cntk():
    shared = images.IMAGES_DIR / "common" / "Dockerfile"
    for framework in FRAMEWORKS:
        dockerfile = images.IMAGES_DIR / framework / "Dockerfile"
        assert dockerfile.is_file()
        assert (dockerfile.resolve() == shared.resolve()) is (framework != "cntk"), framework


def test_the_tag_changes_with_every_input_and_only_then(tmp_path, monkeypatch):
    first = pytorch_cpu().tag("sha256:base")
    assert re.fullmatch(r"dlbench/pytorch:cpu-[0-9a-f]{12}", first)
    assert pytorch_cpu().tag("sha256:base") == first
    assert pytorch_cpu().tag("sha256:other-base") != first
    assert pytorch_cpu(BuildOptions(cpu_base="dlbench/debian:bookworm")).tag("sha256:base") != first
    certificate = tmp_path / "proxy.crt"
    certificate.write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    with_certificate = pytorch_cpu(BuildOptions(ca_certificates=(certificate,)))
    assert "images/ca-certificates/proxy.crt" in with_certificate.files
    assert with_certificate.tag("sha256:base") != first
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    (wheelhouse / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl").write_bytes(b"one")
    with_wheels = pytorch_cpu(BuildOptions(wheelhouse=wheelhouse)).tag("sha256:base")
    (wheelhouse / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl").write_bytes(b"two!")
    assert pytorch_cpu(BuildOptions(wheelhouse=wheelhouse)).tag("sha256:base") not in (first, with_wheels)
    # A wheel no lock of the image names stays out of its context: the tag does not move.
    (wheelhouse / "jaxlib-0.9.0-cp311-cp311-manylinux_2_27_x86_64.whl").write_bytes(b"other")
    (wheelhouse / "numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"old numpy")
    again = pytorch_cpu(BuildOptions(wheelhouse=wheelhouse))
    assert [name for name in again.files if name.startswith("images/wheelhouse/")] == [
        "images/wheelhouse/README.md", "images/wheelhouse/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl"]
    offline = pytorch_cpu(BuildOptions(wheelhouse=wheelhouse, offline=True))
    assert offline.build_args["PIP_OFFLINE"] == "1" and offline.build_args["PIP_EXTRA_INDEX_URL"] == ""
    # A change to the bench is a change to the image.
    bench = tmp_path / "bench"
    (bench / "frameworks").mkdir(parents=True)
    (bench / "__main__.py").write_text("print('bench')\n")
    monkeypatch.setattr(images, "BENCH_DIR", bench)
    monkeypatch.setattr(images, "bench_sources", lambda: [bench / "__main__.py"])
    monkeypatch.setattr(images, "bench_code_hash", lambda: "changed")
    assert pytorch_cpu().tag("sha256:base") != first


def test_compose_and_the_catalog_name_the_same_images():
    """docker-compose.yml builds each framework's CPU variant and its default GPU variant with
    the catalog's arguments."""
    from ruamel.yaml import YAML
    compose = YAML(typ="safe").load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    for framework in FRAMEWORKS:
        for suffix, device in (("", "cpu"), ("-gpu", "gpu")):
            variant = CATALOG.variant_for(framework, device, "auto").variant
            build = services[framework + suffix]["build"]
            assert build["dockerfile"] == f"images/{framework}/Dockerfile" and build["context"] == "."
            # The harness's build arguments, but for those of one build (bench hash, offline).
            expected = images.recipe(framework, variant, images.BuildOptions()).build_args
            expected = {name: value for name, value in expected.items()
                        if value and name not in ("BENCH_HASH", "PIP_OFFLINE")}
            expected["BENCH_HASH"] = "${DLBENCH_BENCH_HASH:-}"  # scripts/compose.sh sets it
            if variant.base == images.CPU_BASE:
                expected["BASE_IMAGE"] = "${DLBENCH_BASE_IMAGE:-debian:bookworm-slim}"
            assert build["args"] == expected, framework + suffix
        gpu = services[framework + "-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
        assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]


def test_the_build_context_of_compose_holds_only_what_the_dockerfiles_copy():
    kept = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    assert "*" in (REPO / ".dockerignore").read_text().splitlines()  # everything else stays out
    copied = set()
    for dockerfile in {path.resolve() for path in (REPO / "images").glob("*/Dockerfile")}:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                copied |= {source.split("/")[0] for source in line.split()[1:-1]}
    assert sorted(copied) == sorted(kept) == ["bench", "images"]


def test_an_image_installs_its_lock_where_there_is_one_and_says_so():
    cpu = pytorch_cpu()
    assert cpu.build_args["REQUIREMENTS"] == "requirements-cpu.lock"
    assert "images/pytorch/requirements-cpu.lock" in cpu.files and "images/pytorch/requirements-cpu.txt" not in cpu.files
    assert cpu.labels["org.dlbench.hash-checked"] == "true"
    # PyTorch's CUDA 12.8 build is only on PyTorch's index: without a lock, its pins, and a label that says so.
    cu128 = next(v for v in CATALOG.frameworks["pytorch"] if v.variant == "cuda12.8")
    unlocked = recipe("pytorch", cu128, BuildOptions())
    if not (REPO / "images" / "pytorch" / "requirements-cu128.lock").is_file():
        assert unlocked.build_args["REQUIREMENTS"] == "requirements-cu128.txt"
        assert unlocked.labels["org.dlbench.hash-checked"] == "false"
    # The Dockerfiles' own pins reach the wheelhouse filter too (CNTK's pip, its Python source).
    assert images.pins((REPO / "images" / "cntk" / "Dockerfile").read_text()) == {"pip": "21.3.1"}


@pytest.mark.parametrize("lock", sorted((REPO / "images").glob("*/requirements*.lock")), ids=lambda p: p.parent.name + "/" + p.name)
def test_every_lock_holds_its_requirements_pins(lock):
    """A lock is stale once a pin of its requirement file changes: `harness/catalog.py lock` writes it again."""
    wanted = images.pins(lock.with_suffix(".txt").read_text())
    locked = images.pins(lock.read_text())
    assert "--hash=sha256:" in lock.read_text()
    for project, version in wanted.items():
        found = {v for p, v in re.findall(r"^([A-Za-z0-9][\w.-]*)==(\S+)", lock.read_text(), re.MULTILINE)
                 if images._project(p) == project}
        assert found and all(v == version or v.split("+")[0] == version for v in found), (project, version, found)
    assert locked
