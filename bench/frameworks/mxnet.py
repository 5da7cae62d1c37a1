"""MXNet: Gluon HybridSequential models, hybridized, a gluon.Trainer with autograd.record."""
from __future__ import annotations

import ctypes
import os
import platform
import re
from importlib import metadata

import numpy as np
import mxnet as mx
from mxnet import autograd, gluon
from mxnet.gluon import nn

from ..specs import TaskSpec

# Runtime features worth recording: the CPU kernels (oneDNN, still called MKLDNN) and the GPU stack.
_FEATURES = ("MKLDNN", "OPENMP", "CUDA", "CUDNN", "NCCL", "TENSORRT")


def describe(device: str) -> dict:
    features = mx.runtime.Features()
    on_gpu = device == "gpu"
    return {
        "framework": "mxnet",
        "framework_version": mx.__version__,
        "threads": _omp_threads(),
        # The engine's CPU worker threads: how many operators run at once (each with its OpenMP pool).
        "interop_threads": int(os.environ.get("MXNET_CPU_WORKER_NTHREADS", "1")),
        "cuda": _build_cuda_version() if on_gpu else None,
        "cudnn": _cudnn_version() if on_gpu else None,
        "framework_settings": {
            "features": [name for name in _FEATURES if features.is_enabled(name)],
            "hybridize": {"static_alloc": True, "static_shape": True},
            # MXNet's cuDNN autotuner: on ("1", limited workspace) unless the environment says otherwise.
            "cudnn_autotune": os.environ.get("MXNET_CUDNN_AUTOTUNE_DEFAULT", "1") if on_gpu else None,
        },
    }


def _omp_threads() -> int:
    """MXNet has no call that reports its thread count; this is the rule its engine applied
    when it loaded: OMP_NUM_THREADS, else half the available processors on x86 (it assumes
    hyperthreading: 1 thread on a 2-core VM), capped by MXNET_OMP_MAX_THREADS."""
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    if not mx.runtime.Features().is_enabled("OPENMP"):
        return 1
    processors = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if os.environ.get("MXNET_OMP_MAX_THREADS", "").strip().isdigit():
        return min(processors, int(os.environ["MXNET_OMP_MAX_THREADS"]))
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        processors >>= 1
    return max(1, processors)


def _build_cuda_version() -> str | None:
    """The CUDA version the GPU build was compiled for, from its package name (mxnet-cu112 -> 11.2)."""
    for distribution in metadata.distributions():
        match = re.fullmatch(r"mxnet[-_]cu(\d+)(\d)", distribution.metadata["Name"] or "", re.IGNORECASE)
        if match:
            return f"{match.group(1)}.{match.group(2)}"
    return None


def _cudnn_version() -> str | None:
    """The cuDNN library the GPU build loaded (MXNet 1.x does not report it itself)."""
    for library in ("libcudnn.so.8", "libcudnn.so"):
        try:
            return str(ctypes.CDLL(library).cudnnGetVersion())
        except (OSError, AttributeError):
            continue
    return None


def configure(device: str, seed: int, threads: int | None) -> None:
    # MXNet has no thread API: it sizes its OpenMP pool from OMP_NUM_THREADS when it loads, and
    # the bench sets that before importing it when threads are asked for. The engine keeps
    # its default of one CPU worker (MXNET_CPU_WORKER_NTHREADS), one operator at a time.
    mx.random.seed(seed)  # initializers and dropout masks draw from MXNet's own generator


def _mx_context(device: str) -> mx.Context:
    return mx.gpu(0) if device == "gpu" else mx.cpu()


def build_cnn_cifar10(spec: TaskSpec) -> nn.HybridSequential:
    channels, height, width = spec.input_shape
    # in_channels/in_units make every shape known at construction: no deferred initialisation.
    conv = dict(kernel_size=3, padding=1, layout="NCHW")
    net = nn.HybridSequential()
    net.add(
        nn.Conv2D(50, in_channels=channels, **conv), nn.Activation("relu"),
        nn.Conv2D(50, in_channels=50, **conv), nn.MaxPool2D(2), nn.Activation("relu"), nn.Dropout(0.25),
        nn.Conv2D(100, in_channels=50, **conv), nn.Activation("relu"),
        nn.Conv2D(100, in_channels=100, **conv), nn.MaxPool2D(2), nn.Activation("relu"), nn.Dropout(0.25),
        nn.Flatten(),
        nn.Dense(512, in_units=100 * (height // 4) * (width // 4)), nn.Activation("relu"), nn.Dropout(0.5),
        nn.Dense(spec.num_classes, in_units=512),  # logits: softmax lives in the loss
    )
    return net


class CnnCifar10:
    def __init__(self, spec: TaskSpec, device: str, seed: int):
        mx.random.seed(seed)
        self.ctx = _mx_context(device)
        # NCHW everywhere: cuDNN's layout, and the only one MXNet's CPU convolutions (oneDNN) take.
        self.layout = "NCHW"
        self.net = build_cnn_cifar10(spec)
        # Glorot uniform (sqrt(6 / (fan_in + fan_out))) for the weights; the layers' own
        # bias_initializer ("zeros") takes precedence for the biases.
        self.net.initialize(mx.init.Xavier(rnd_type="uniform", factor_type="avg", magnitude=3), ctx=self.ctx)
        self.net.hybridize(static_alloc=True, static_shape=True)
        # Per-example losses; backward() sums their gradients and trainer.step(batch_size)
        # rescales by 1/batch_size: the gradient of the mean loss, as in the other frameworks.
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        # MXNet's SGD momentum (m = 0.9 m - lr g; w += m) is classic momentum, like PyTorch's.
        self.trainer = gluon.Trainer(self.net.collect_params(), "sgd",
                                     {"learning_rate": spec.learning_rate, "momentum": spec.momentum})
        self._last_loss: mx.nd.NDArray | None = None

    def parameter_count(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.net.collect_params().values() if p.grad_req != "null")

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> None:
        # The numpy batch is copied to the device here, inside the timed step; the copy waits for
        # no queued work. Nothing else blocks: MXNet's engine queues the step and returns at once.
        x = mx.nd.array(images, ctx=self.ctx)
        y = mx.nd.array(labels, ctx=self.ctx, dtype="float32")
        with autograd.record():  # training mode: dropout on
            loss = self.loss_fn(self.net(x), y)
        loss.backward()
        self.trainer.step(images.shape[0])
        self._last_loss = loss

    def loss(self) -> float:
        """The last step's loss, after the device has finished all queued work."""
        # Reading the loss alone would wait for the last forward pass only, not for its
        # backward pass and update: wait for everything first.
        mx.nd.waitall()
        return float(self._last_loss.mean().asscalar())

    def predict(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        # Outside autograd.record() Gluon runs in inference mode: dropout off.
        return np.concatenate([
            self.net(mx.nd.array(images[start:start + batch_size], ctx=self.ctx)).argmax(axis=1).asnumpy()
            for start in range(0, len(images), batch_size)
        ]).astype(np.int64)


TASKS = {"cnn_cifar10": CnnCifar10}
