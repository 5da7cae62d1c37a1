"""JAX: Flax NNX modules, an optax optimiser, an nnx.jit-compiled training step."""
from __future__ import annotations

import os
import re

import flax
import jax
import jaxlib
import numpy as np
import optax
from flax import nnx

from ..specs import TaskSpec


def _cuda_versions() -> tuple[str | None, str | None]:
    """CUDA runtime and cuDNN versions as JAX's CUDA plugin reports them, None if it can't say."""
    try:
        from jax._src.lib import cuda_versions  # no public API for these yet
        cuda = cuda_versions.cuda_runtime_get_version()  # e.g. 12080
        return f"{cuda // 1000}.{cuda % 1000 // 10}", str(cuda_versions.cudnn_get_version())
    except Exception:  # a CPU-only jaxlib has no CUDA plugin
        return None, None


def _xla_threads() -> int | None:
    """The CPU threads XLA was told to use (XLA_FLAGS, read when JAX starts), None if not told."""
    found = re.search(r"intra_op_parallelism_threads=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(found.group(1)) if found else None


def describe(device: str) -> dict:
    on_gpu = device == "gpu"
    cuda, cudnn = _cuda_versions() if on_gpu else (None, None)
    return {
        "framework": "jax",
        "framework_version": jax.__version__,
        # None means "XLA chooses" (one thread per core); XLA has no separate inter-op pool.
        "threads": _xla_threads(),
        "interop_threads": None,
        "cuda": cuda,
        "cudnn": cudnn,  # the same number as PyTorch's, e.g. "91002"
        "framework_settings": {
            "flax_version": flax.__version__,
            "optax_version": optax.__version__,
            "jaxlib_version": jaxlib.__version__,
            "platform": _jax_device(device).platform,
        },
    }


def configure(device: str, seed: int, threads: int | None) -> None:
    # JAX has no global seed: each model draws from the nnx.Rngs(seed) it is built with.
    # XLA reads its thread count from XLA_FLAGS, which bench.environment.limit_threads sets
    # before JAX is imported: nothing to do here for `threads`.
    # A CPU cell must not start the CUDA backend (which would take 75% of a GPU's memory).
    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")


def _jax_device(device: str) -> jax.Device:
    return jax.devices("gpu" if device == "gpu" else "cpu")[0]


class CnnCifar10Net(nnx.Module):
    def __init__(self, spec: TaskSpec, rngs: nnx.Rngs):
        channels = spec.input_shape[0]
        conv = dict(kernel_size=(3, 3), padding="SAME", kernel_init=nnx.initializers.glorot_uniform(),
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)
        dense = dict(kernel_init=nnx.initializers.glorot_uniform(),
                     bias_init=nnx.initializers.zeros_init(), rngs=rngs)
        self.conv1 = nnx.Conv(channels, 50, **conv)
        self.conv2 = nnx.Conv(50, 50, **conv)
        self.dropout1 = nnx.Dropout(0.25, rngs=rngs)
        self.conv3 = nnx.Conv(50, 100, **conv)
        self.conv4 = nnx.Conv(100, 100, **conv)
        self.dropout2 = nnx.Dropout(0.25, rngs=rngs)
        height, width = spec.input_shape[1] // 4, spec.input_shape[2] // 4
        self.dense1 = nnx.Linear(100 * height * width, 512, **dense)
        self.dropout3 = nnx.Dropout(0.5, rngs=rngs)
        self.dense2 = nnx.Linear(512, spec.num_classes, **dense)  # logits: softmax lives in the loss

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv1(x))
        x = self.dropout1(nnx.relu(nnx.max_pool(self.conv2(x), (2, 2), strides=(2, 2))))
        x = nnx.relu(self.conv3(x))
        x = self.dropout2(nnx.relu(nnx.max_pool(self.conv4(x), (2, 2), strides=(2, 2))))
        x = x.reshape(x.shape[0], -1)
        x = self.dropout3(nnx.relu(self.dense1(x)))
        return self.dense2(x)


@nnx.jit
def _train_step(model: CnnCifar10Net, optimizer: nnx.Optimizer, images: jax.Array,
                labels: jax.Array) -> jax.Array:
    def loss_fn(model: CnnCifar10Net) -> jax.Array:
        logits = model(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)  # updates the model's parameters in place
    return loss


@nnx.jit
def _predict(model: CnnCifar10Net, images: jax.Array) -> jax.Array:
    return model(images).argmax(axis=1)


class CnnCifar10:
    def __init__(self, spec: TaskSpec, device: str, seed: int):
        self.device = _jax_device(device)
        # Flax convolutions take NHWC; on GPU XLA picks the cuDNN layout itself.
        self.layout = "NHWC"
        with jax.default_device(self.device):
            self.model = CnnCifar10Net(spec, nnx.Rngs(seed))
            self.optimizer = nnx.Optimizer(self.model, optax.sgd(spec.learning_rate, momentum=spec.momentum),
                                           wrt=nnx.Param)
        self._last_loss: jax.Array | None = None

    def parameter_count(self) -> int:
        return sum(p.size for p in jax.tree.leaves(nnx.state(self.model, nnx.Param)))

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.model.train()  # dropout on
        # The numpy batch is copied to the device here, inside the timed step.
        x = jax.device_put(images, self.device)
        y = jax.device_put(labels, self.device)
        self._last_loss = _train_step(self.model, self.optimizer, x, y)

    def loss(self) -> float:
        """The last step's loss, after the device has finished all queued work."""
        # Waiting on the updated parameters too: the loss alone is known before the update.
        jax.block_until_ready((self._last_loss, nnx.state(self.model, nnx.Param)))
        return float(self._last_loss)

    def predict(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        self.model.eval()  # dropout off
        return np.concatenate([
            np.asarray(_predict(self.model, jax.device_put(images[start:start + batch_size], self.device)))
            for start in range(0, len(images), batch_size)
        ])


TASKS = {"cnn_cifar10": CnnCifar10}
