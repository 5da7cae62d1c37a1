"""Every framework module's gemm(size, run), which bench/ceiling.py times: the same function in
the same place of every module, multiplying two size x size matrices of the precision's compute
dtype with the framework's own matrix multiply (watched here by a spy on that function)."""
from __future__ import annotations

import ast
import json
import os
import subprocess

import numpy as np
import pytest

from bench.precision import COMPUTE_DTYPES
from bench.specs import FRAMEWORK_SPECS, RunOptions
from conftest import REPO, framework_python
from harness.parity import LOCAL_FRAMEWORKS

MODULES = sorted({name.split("-")[0] for name in FRAMEWORK_SPECS})
SIGNATURE = "def gemm(size: int, run: RunOptions) -> Callable[[], None]:"


def _functions(module: str) -> list[ast.FunctionDef]:
    tree = ast.parse((REPO / "bench" / "frameworks" / f"{module}.py").read_text())
    return [node for node in tree.body if isinstance(node, ast.FunctionDef)]


def test_every_framework_module_has_the_same_gemm_in_the_same_place():
    docstrings = set()
    for module in MODULES:
        functions = _functions(module)
        names = [function.name for function in functions]
        assert "gemm" in names, module
        gemm = functions[names.index("gemm")]
        assert f"def gemm({ast.unparse(gemm.args)}) -> {ast.unparse(gemm.returns)}:" == SIGNATURE, module
        # Beside the other module-level functions the bench calls, after device_memory_peak.
        assert names[names.index("gemm") - 1] == "device_memory_peak", module
        docstrings.add(ast.get_docstring(gemm))
    assert len(docstrings) == 1


SPY = """
import functools, importlib, json, sys
import numpy as np
from bench import frameworks
from bench.specs import RunOptions

framework, precision, attribute = sys.argv[1:4]
module = frameworks.load(framework)
run = RunOptions(device="cpu", devices=1, seed=0, threads=None, batch_size=1, input_shape=(128, 128),
                 learning_rate=0.0, precision=precision)
module.configure(run)
top, *path, name = attribute.split(".")
owner = functools.reduce(getattr, path, importlib.import_module(top))
multiply = getattr(owner, name)
calls = []


def dtype_name(x):
    dtype = x.dtype
    if isinstance(dtype, type):  # MXNet: a numpy scalar type
        return np.dtype(dtype).name
    return getattr(dtype, "name", str(dtype).replace("torch.", ""))


def spy(a, b, *args, **kwargs):
    calls.append([[list(map(int, x.shape)), dtype_name(x)] for x in (a, b)])
    return multiply(a, b, *args, **kwargs)


setattr(owner, name, spy)  # before gemm(): JAX and TensorFlow trace it there
for size in (64, 128):
    product = module.gemm(size, run)
    assert product() is None
    product()
print(json.dumps(calls))
"""

# The matrix multiply each framework's gemm must call, as module.attribute.
MULTIPLY = {"pytorch": "torch.matmul", "tensorflow": "tensorflow.linalg.matmul", "keras-tensorflow": "keras.ops.matmul",
            "keras-jax": "keras.ops.matmul", "keras-torch": "keras.ops.matmul", "jax": "jax.numpy.matmul",
            "mxnet": "mxnet.ndarray.dot", "chainer": "chainer.functions.matmul"}


@pytest.mark.integration
@pytest.mark.parametrize("framework", LOCAL_FRAMEWORKS)
def test_gemm_multiplies_matrices_of_the_compute_dtype_with_the_frameworks_own_product(framework):
    """bf16 where the framework offers it on CPUs, fp32 elsewhere."""
    precision = FRAMEWORK_SPECS[framework].precisions["cpu"][-1]
    done = subprocess.run([str(framework_python(framework)), "-c", SPY, framework, precision, MULTIPLY[framework]],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    calls = json.loads(done.stdout.strip().splitlines()[-1])
    dtype = COMPUTE_DTYPES[precision]
    # Traced once per size (JAX, TensorFlow), or called on every product.
    assert {json.dumps(call) for call in calls} == {
        json.dumps([[[size, size], dtype]] * 2) for size in (64, 128)}, calls


def test_cntk_multiplies_seeded_constants_and_reads_back_one_element(cntk_module):
    C = cntk_module.C
    run = RunOptions(device="cpu", devices=1, seed=3, threads=None, batch_size=1, input_shape=(64, 64),
                     learning_rate=0.0)
    product = cntk_module.gemm(64, run)
    (a,), (b,) = (call.args for call in C.constant.call_args_list)
    assert a.shape == b.shape == (64, 64) and a.dtype == b.dtype == np.float32
    assert not np.array_equal(a, b) and abs(a.std() - 1.0) < 0.05  # two standard-normal draws
    C.times.assert_called_once_with(C.constant.return_value, C.constant.return_value)
    # A 1 x 1 slice of the product, along both axes.
    outer, inner = C.slice.call_args_list[1], C.slice.call_args_list[0]
    assert inner.args == (C.times.return_value, 0, 0, 1) and outer.args == (C.slice.return_value, 1, 0, 1)
    C.slice.return_value.eval.assert_not_called()
    product()
    C.slice.return_value.eval.assert_called_once_with()
    C.constant.reset_mock()
    cntk_module.gemm(64, run)
    assert np.array_equal(C.constant.call_args_list[0].args[0], a)  # the seed's draws again
