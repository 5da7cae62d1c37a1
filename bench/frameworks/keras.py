"""Keras 3: a keras.Sequential model, compile() and train_on_batch(), on the backend that
KERAS_BACKEND names (tensorflow, jax or torch); the loader sets it before this import."""
from __future__ import annotations

import os
import re

import keras
import numpy as np

from ..specs import TaskSpec

BACKEND = keras.backend.backend()  # "tensorflow", "jax" or "torch"
# Each backend's CPU layout. TensorFlow's CPU convolutions (oneDNN) only take NHWC (NCHW
# fails in the backward pass unless XLA compiles it, and XLA was 2.5x slower here); JAX and
# torch measured the same in both layouts (2-core EPYC), so Keras's default, channels_last.
CPU_LAYOUTS = {"tensorflow": "NHWC", "jax": "NHWC", "torch": "NHWC"}


def describe(device: str) -> dict:
    on_gpu = device == "gpu"
    cuda, cudnn = _cuda_cudnn() if on_gpu else (None, None)
    settings = {
        "keras_version": keras.__version__,
        "backend": BACKEND,
        "backend_version": _backend_module().__version__,
        "jit_compile": _jit_compile(device),
    }
    if BACKEND == "torch":
        settings["cudnn_benchmark"] = _backend_module().backends.cudnn.benchmark
    return {
        "framework": f"keras-{BACKEND}",
        "framework_version": keras.__version__,
        "threads": _threads(),
        "interop_threads": _interop_threads(),
        "cuda": cuda,
        "cudnn": cudnn,
        "framework_settings": settings,
    }


def configure(device: str, seed: int, threads: int | None) -> None:
    keras.utils.set_random_seed(seed)  # Python, numpy and the backend's generators
    if BACKEND == "tensorflow":
        tf = _backend_module()
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        if device == "gpu":
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
        else:
            tf.config.set_visible_devices([], "GPU")
    elif BACKEND == "torch":
        torch = _backend_module()
        if threads:
            torch.set_num_threads(threads)
            torch.set_num_interop_threads(threads)
        # The cuDNN autotuner picks the fastest convolution algorithm for fixed shapes.
        torch.backends.cudnn.benchmark = device == "gpu"
    elif device == "cpu":
        # XLA reads its thread count from XLA_FLAGS, which bench.environment.limit_threads sets
        # before JAX is imported. A CPU cell must not start JAX's CUDA backend (which would
        # take 75% of a GPU's memory).
        _backend_module().config.update("jax_platforms", "cpu")


def _backend_module():
    """The backend framework itself, imported only to ask it about itself and to sync."""
    if BACKEND == "tensorflow":
        import tensorflow
        return tensorflow
    if BACKEND == "jax":
        import jax
        return jax
    import torch
    return torch


def _threads() -> int | None:
    module = _backend_module()
    if BACKEND == "torch":
        return module.get_num_threads()
    if BACKEND == "tensorflow":
        # 0 means "let TensorFlow choose" (one thread per core).
        return module.config.threading.get_intra_op_parallelism_threads()
    # JAX: the CPU threads XLA was told to use (XLA_FLAGS, read when JAX starts); None means
    # "XLA chooses" (one thread per core).
    found = re.search(r"intra_op_parallelism_threads=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(found.group(1)) if found else None


def _interop_threads() -> int | None:
    module = _backend_module()
    if BACKEND == "torch":
        return module.get_num_interop_threads()
    if BACKEND == "tensorflow":
        return module.config.threading.get_inter_op_parallelism_threads()
    return None  # XLA has no separate inter-op pool


def _cuda_cudnn() -> tuple[str | None, str | None]:
    module = _backend_module()
    if BACKEND == "torch":
        return module.version.cuda, str(module.backends.cudnn.version())
    if BACKEND == "tensorflow":
        build = module.sysconfig.get_build_info()
        return build.get("cuda_version"), build.get("cudnn_version")
    try:  # JAX: as its CUDA plugin reports them; no public API for these yet
        from jax._src.lib import cuda_versions
        runtime = cuda_versions.cuda_runtime_get_version()  # e.g. 12080
        return f"{runtime // 1000}.{runtime % 1000 // 10}", str(cuda_versions.cudnn_get_version())
    except Exception:  # a CPU-only jaxlib has no CUDA plugin
        return None, None


def _jit_compile(device: str) -> bool:
    """What compile(jit_compile="auto") picks on a host that has only the cell's device: XLA
    always for JAX, for TensorFlow on GPU only (Keras turns it off on CPU: slower there),
    eager for torch. Said explicitly so that a CPU cell on a GPU host gets the same."""
    if BACKEND == "tensorflow":
        return device == "gpu"
    return BACKEND == "jax"


def _keras_device(device: str) -> str:
    # No device index: Keras 3.15's torch backend moves each new variable with .to("cpu:0"),
    # which torch counts as a copy from "cpu" that drops the Parameter type, and Dropout's
    # integer seed variable then fails ("Only Tensors of floating point ... require gradients").
    return "gpu" if device == "gpu" else "cpu"


def _sync_device(model: keras.Model) -> None:
    """Wait for the GPU. train_on_batch already returns the loss as a Python float (Keras 3
    turns its logs into host numbers), which waits for the step; this makes sure of it."""
    if BACKEND == "torch":
        _backend_module().cuda.synchronize()
    elif BACKEND == "tensorflow":
        _backend_module().test.experimental.sync_devices()
    else:
        _backend_module().block_until_ready([v.value for v in model.variables])


def build_cnn_cifar10(spec: TaskSpec, data_format: str) -> keras.Sequential:
    layers = keras.layers
    channels, height, width = spec.input_shape
    shape = (channels, height, width) if data_format == "channels_first" else (height, width, channels)
    conv = dict(kernel_size=3, padding="same", data_format=data_format,
                kernel_initializer="glorot_uniform", bias_initializer="zeros")
    dense = dict(kernel_initializer="glorot_uniform", bias_initializer="zeros")
    return keras.Sequential([
        keras.Input(shape=shape),
        layers.Conv2D(50, activation="relu", **conv),
        layers.Conv2D(50, **conv), layers.MaxPooling2D(2, data_format=data_format), layers.ReLU(), layers.Dropout(0.25),
        layers.Conv2D(100, activation="relu", **conv),
        layers.Conv2D(100, **conv), layers.MaxPooling2D(2, data_format=data_format), layers.ReLU(), layers.Dropout(0.25),
        layers.Flatten(data_format=data_format),
        layers.Dense(512, activation="relu", **dense), layers.Dropout(0.5),
        layers.Dense(spec.num_classes, **dense),  # logits: softmax lives in the loss
    ])


class CnnCifar10:
    def __init__(self, spec: TaskSpec, device: str, seed: int):
        keras.utils.set_random_seed(seed)
        self.on_gpu = device == "gpu"
        self.device = _keras_device(device)
        # NCHW for cuDNN on every backend; on CPU the layout CPU_LAYOUTS gives (measured).
        self.layout = "NCHW" if self.on_gpu else CPU_LAYOUTS[BACKEND]
        data_format = "channels_first" if self.layout == "NCHW" else "channels_last"
        with keras.device(self.device):
            self.model = build_cnn_cifar10(spec, data_format)
            self.model.compile(
                optimizer=keras.optimizers.SGD(learning_rate=spec.learning_rate, momentum=spec.momentum),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=_jit_compile(device),
            )
        self._last_loss: float | None = None

    def parameter_count(self) -> int:
        return int(sum(np.prod(v.shape) for v in self.model.trainable_weights))

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> None:
        with keras.device(self.device):
            # The numpy batch is copied to the device here, inside the timed step; the loss
            # comes back as a Python float, so every step ends with the device finished.
            self._last_loss = self.model.train_on_batch(images, labels)

    def loss(self) -> float:
        """The last step's loss, after the device has finished all queued work."""
        if self.on_gpu:
            _sync_device(self.model)
        return float(self._last_loss)

    def predict(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        with keras.device(self.device):
            # predict_on_batch runs the model with training=False: dropout off.
            return np.concatenate([
                np.argmax(self.model.predict_on_batch(images[start:start + batch_size]), axis=1)
                for start in range(0, len(images), batch_size)
            ])


TASKS = {"cnn_cifar10": CnnCifar10}
