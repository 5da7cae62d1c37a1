"""Chainer: chainer.Chain models, chainer.optimizers, a define-by-run training loop."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import chainer
import chainer.functions as F
import chainer.links as L
from chainer.backends import cuda

from ..specs import TaskSpec


def describe(device: str) -> dict:
    on_gpu = device == "gpu"
    return {
        "framework": "chainer",
        "framework_version": chainer.__version__,
        # Chainer's CPU convolutions are im2col + numpy matrix products: numpy's BLAS threads.
        "threads": _blas_threads(),
        "interop_threads": None,  # no inter-op pool: Chainer runs one function after another
        "cuda": _cuda_version() if on_gpu else None,
        "cudnn": str(cuda.cupy.cuda.cudnn.getVersion()) if on_gpu and cuda.cudnn_enabled else None,
        "framework_settings": {
            "autotune": chainer.config.autotune,
            "use_cudnn": chainer.config.use_cudnn,
            "type_check": chainer.config.type_check,
            "cupy_version": cuda.cupy.__version__ if on_gpu else None,
            "numpy_version": np.__version__,
        },
    }


def _openblas(name: str):
    """A function of the OpenBLAS that numpy's wheel bundles, or None when numpy's BLAS is
    something else (a distribution's numpy, MKL)."""
    for path in sorted((Path(np.__file__).parent.parent / "numpy.libs").glob("libopenblas*.so*")):
        try:
            library = ctypes.CDLL(str(path))  # already loaded by numpy: the same handle
        except OSError:
            continue
        for symbol in (f"openblas_{name}64_", f"openblas_{name}"):  # 64-bit-integer builds: 64_
            if hasattr(library, symbol):
                return getattr(library, symbol)
    return None


def _blas_threads() -> int | None:
    get_num_threads = _openblas("get_num_threads")
    return int(get_num_threads()) if get_num_threads else None


def _cuda_version() -> str:
    version = cuda.cupy.cuda.runtime.runtimeGetVersion()  # 12080 -> "12.8"
    return f"{version // 1000}.{version % 1000 // 10}"


def _seed(device: str, seed: int) -> None:
    np.random.seed(seed)  # Chainer's CPU randomness (initializers, dropout masks) is numpy's
    if device == "gpu":
        cuda.cupy.random.seed(seed)


def configure(device: str, seed: int, threads: int | None) -> None:
    _seed(device, seed)
    # bench.environment.limit_threads set OPENBLAS_NUM_THREADS before numpy loaded; say it again.
    set_num_threads = _openblas("set_num_threads")
    if threads and set_num_threads:
        set_num_threads(threads)
    # Argument type checks on every function call are a debugging aid; they cost Python time.
    chainer.global_config.type_check = False
    if device == "gpu":
        # cuDNN for convolutions and pooling, and its autotuner picks the fastest convolution
        # algorithm for fixed shapes.
        chainer.global_config.use_cudnn = "always"
        chainer.global_config.autotune = True


def _chainer_device(device: str) -> chainer.backend.Device:
    return chainer.get_device("@cupy:0" if device == "gpu" else "@numpy")


class CnnCifar10Net(chainer.Chain):
    def __init__(self, spec: TaskSpec):
        super().__init__()
        channels = spec.input_shape[0]
        height, width = spec.input_shape[1] // 4, spec.input_shape[2] // 4
        glorot = dict(initialW=chainer.initializers.GlorotUniform(), initial_bias=0)
        with self.init_scope():
            self.conv1 = L.Convolution2D(channels, 50, ksize=3, pad=1, **glorot)
            self.conv2 = L.Convolution2D(50, 50, ksize=3, pad=1, **glorot)
            self.conv3 = L.Convolution2D(50, 100, ksize=3, pad=1, **glorot)
            self.conv4 = L.Convolution2D(100, 100, ksize=3, pad=1, **glorot)
            # Input sizes given: every parameter exists now, none is initialised lazily.
            self.fc1 = L.Linear(100 * height * width, 512, **glorot)
            self.fc2 = L.Linear(512, spec.num_classes, **glorot)

    def forward(self, x: chainer.Variable) -> chainer.Variable:
        h = F.relu(self.conv1(x))
        h = F.dropout(F.relu(F.max_pooling_2d(self.conv2(h), 2)), 0.25)
        h = F.relu(self.conv3(h))
        h = F.dropout(F.relu(F.max_pooling_2d(self.conv4(h), 2)), 0.25)
        h = F.dropout(F.relu(self.fc1(h)), 0.5)  # L.Linear flattens (N, C, H, W) to (N, C*H*W)
        return self.fc2(h)  # logits: softmax lives in the loss


class CnnCifar10:
    def __init__(self, spec: TaskSpec, device: str, seed: int):
        _seed(device, seed)
        self.device = _chainer_device(device)
        self.device.use()
        # NCHW: Chainer's only layout, on the CPU and for cuDNN alike.
        self.layout = "NCHW"
        self.model = CnnCifar10Net(spec)
        self.model.to_device(self.device)
        self.optimizer = chainer.optimizers.MomentumSGD(lr=spec.learning_rate, momentum=spec.momentum)
        self.optimizer.setup(self.model)
        self._last_loss = None

    def parameter_count(self) -> int:
        return sum(p.size for p in self.model.params() if p.update_rule is None or p.update_rule.enabled)

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> None:
        # The numpy batch is copied to the device here, inside the timed step.
        x, t = self.device.send(images), self.device.send(labels)
        with chainer.using_config("train", True):
            loss = F.softmax_cross_entropy(self.model(x), t)
        self.model.cleargrads()
        loss.backward()
        self.optimizer.update()
        self._last_loss = loss.array

    def loss(self) -> float:
        """The last step's loss, after the device has finished all queued work."""
        if self.device.xp is not np:
            self.device.device.synchronize()
        return float(self._last_loss)

    def predict(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        predictions = []
        with chainer.using_config("train", False), chainer.no_backprop_mode():  # dropout off
            for start in range(0, len(images), batch_size):
                logits = self.model(self.device.send(images[start:start + batch_size]))
                predictions.append(cuda.to_cpu(logits.array.argmax(axis=1)))
        return np.concatenate(predictions)


TASKS = {"cnn_cifar10": CnnCifar10}
