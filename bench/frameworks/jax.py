"""JAX: Flax NNX modules, optax optimisers, jax.jit-compiled steps over the modules' state (one
replica per device of a mesh, under jax.shard_map, for data parallelism), and a Pillow thread
pool for image files (JAX has no data loader). Mixed precision the Flax way: float32
parameters, modules computing in the ``dtype`` they are given."""
from __future__ import annotations

import functools
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from flax import nnx
from flax.training.dynamic_scale import DynamicScale
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from .. import precision
from .. import weights as canonical
from ..specs import (BATCH_NORM, CNN, DENSENET121, FRAMEWORK_SPECS, GLOROT_UNIFORM, GRU, HE_NORMAL, ONES, ORTHOGONAL,
                     RESNET50, UNIFORM, ZEROS, Init, RunOptions, TaskSpec)

if TYPE_CHECKING:  # for annotations only: the bench's data module is not imported at run time
    from ..data import ImageFiles


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


def _xla_autotuner(run: RunOptions) -> bool | None:
    """Whether XLA autotunes its GPU kernels (cuDNN convolutions, GEMMs): on unless XLA_FLAGS sets
    --xla_gpu_autotune_level=0; None on CPU, which has no autotuner."""
    if run.device != "gpu":
        return None
    found = re.search(r"xla_gpu_autotune_level=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return found is None or int(found.group(1)) > 0


def _xla_tf32(run: RunOptions) -> bool | None:
    """Whether XLA may run float32 convolutions and matrix products in TF32 on GPU: at every
    default precision but "highest" (XLA's own default, None, included); None on CPU."""
    if run.device != "gpu":
        return None
    return jax.lax.Precision(jax.config.jax_default_matmul_precision) is not jax.lax.Precision.HIGHEST


def describe(run: RunOptions) -> dict:
    on_gpu = run.device == "gpu"
    cuda, cudnn = _cuda_versions() if on_gpu else (None, None)
    tf32 = _xla_tf32(run)
    return {
        "framework": "jax",
        "framework_version": jax.__version__,
        # None means "XLA chooses" (one thread per core); XLA has no separate inter-op pool.
        "threads": _xla_threads(),
        "interop_threads": None,
        "cuda": cuda,
        "cudnn": cudnn,  # the same number as PyTorch's, e.g. "91002"
        "math_modes": precision.math_modes(
            run.precision, tf32_matmul=tf32, tf32_convolutions=tf32,
            loss_scaling="dynamic" if run.precision == "fp16" else None,
            # Every step is jax.jit-compiled, in both compile profiles.
            autotuner=_xla_autotuner(run), xla=True, compiler=FRAMEWORK_SPECS["jax"].compiler),
        "framework_settings": {
            "flax_version": flax.__version__,
            "optax_version": optax.__version__,
            "jaxlib_version": jaxlib.__version__,
            "platform": _jax_devices(run)[0].platform,
            "devices_visible": len(jax.devices(_platform(run))),
        },
    }


def configure(run: RunOptions) -> None:
    # JAX has no global seed: each model draws from the nnx.Rngs(run.seed) it is built with.
    # XLA reads its thread count (bench.environment.limit_threads) and, for a data-parallel CPU
    # cell, its number of CPU devices (expose_cpu_devices) from XLA_FLAGS, which the bench sets
    # before JAX is imported: nothing to do here for `threads` or `devices`. XLA autotunes its
    # GPU kernels unless XLA_FLAGS turns it off (--xla_gpu_autotune_level=0).
    # A CPU cell must not start the CUDA backend (which would take 75% of a GPU's memory).
    if run.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    # XLA's default precision runs float32 convolutions and matrix products in TF32 on Ampere
    # and newer GPUs; "highest" keeps them float32 (fp32, and the float32 parts of fp16 and
    # bf16). It applies to 32-bit operands only: 16-bit layers keep their tensor-core math.
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if run.precision == "tf32" else "highest")


def _compute_dtype(run: RunOptions) -> jnp.dtype | None:
    """The dtype Flax modules compute in: float16 or bfloat16 under mixed precision (their
    parameters stay float32), else None, Flax's default: the parameters' float32."""
    return jnp.dtype(precision.COMPUTE_DTYPES[run.precision]) if precision.is_mixed(run.precision) else None


def _dynamic_scale(run: RunOptions) -> DynamicScale | None:
    """fp16's loss scale: Flax's DynamicScale, with its (and PyTorch's GradScaler's) defaults:
    the scale starts at 2**16, halves when the gradients overflow, doubles after 2000 finite
    steps. Its fields as arrays: NNX then carries them in the train state, not in the graph."""
    return DynamicScale(fin_steps=jnp.int32(0), scale=jnp.float32(2.0 ** 16)) if run.precision == "fp16" else None


def device_memory_peak(run: RunOptions) -> int | None:
    """XLA's allocator peak on the busiest of the cell's GPUs; None on CPU, or when the
    platform keeps no statistics."""
    if run.device != "gpu":
        return None
    stats = [device.memory_stats() for device in _jax_devices(run)]
    return max(s["peak_bytes_in_use"] for s in stats) if all(stats) else None


def gemm(size: int, run: RunOptions) -> Callable[[], None]:
    """A function computing one product of two ``size`` x ``size`` matrices with the framework's
    own matrix multiply, returning once the device has finished (bench/ceiling.py). The two
    matrices are made once, here: seeded standard-normal values on the cell's device, in the
    precision's compute dtype."""
    dtype = jnp.dtype(precision.COMPUTE_DTYPES[run.precision])
    device = _jax_devices(run)[0]
    a, b = (jax.device_put(jax.random.normal(key, (size, size), dtype), device)
            for key in jax.random.split(jax.random.key(run.seed)))
    multiply = jax.jit(jnp.matmul)

    def product() -> None:
        multiply(a, b).block_until_ready()
    return product


def _platform(run: RunOptions) -> str:
    return "gpu" if run.device == "gpu" else "cpu"


def _jax_devices(run: RunOptions) -> list[jax.Device]:
    """The cell's ``run.devices`` devices: GPUs, or the CPU devices XLA was asked to make."""
    devices = jax.devices(_platform(run))
    if len(devices) < run.devices:
        if run.device == "cpu":
            raise RuntimeError(
                f"JAX sees {len(devices)} CPU device(s) but the cell asks for {run.devices}: "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={run.devices} must be set before "
                f"JAX is imported (bench.environment.expose_cpu_devices)")
        raise RuntimeError(f"JAX sees {len(devices)} GPU(s) but the cell asks for {run.devices}")
    return devices[:run.devices]


def _functional(model: nnx.Module, optimizer: nnx.Optimizer, dynamic_scale: DynamicScale | None,
                placement: jax.Device | NamedSharding) -> tuple[nnx.GraphDef, nnx.GraphDef, nnx.State]:
    """Flax's functional API, for hot loops: the static structure of (model, optimiser, fp16's
    loss scale or None) in training mode and of the model in inference mode, and all their
    arrays as one pytree put on the device(s). nnx.jit would walk the module graph in Python on
    every call (tens of milliseconds for ResNet-50, more than a GPU step); jax.jit over
    (graphdef, state) does not. The module objects keep their initial arrays; training advances
    the returned state."""
    model.eval()  # dropout off, batch norm on running statistics
    inference = nnx.graphdef(model)
    model.train()
    training, state = nnx.split((model, optimizer, dynamic_scale))
    return training, inference, jax.device_put(state, placement)


def _parameter_count(model: nnx.Module) -> int:
    """Trainable parameters: nnx.Param leaves only (batch-norm statistics are nnx.BatchStat)."""
    return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _multilabel_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()  # over labels and batch


LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _step(graph: nnx.GraphDef, state: nnx.State, inputs: jax.Array, labels: jax.Array, loss_fn: LossFn,
          axis_name: str | None = None) -> tuple[jax.Array, nnx.State]:
    """One optimiser step. Under jax.shard_map, ``axis_name`` the mesh's batch axis, it is one
    replica's, as in PyTorch's DistributedDataParallel: forward and backward on the replica's
    shard of the batch, every batch norm normalising with the shard's own statistics."""
    model, optimizer, dynamic_scale = nnx.merge(graph, state)

    def model_loss(model: nnx.Module) -> jax.Array:
        # float32 logits: under mixed precision the softmax or sigmoid and the loss stay float32
        loss = loss_fn(model(inputs).astype(jnp.float32), labels)
        # The global batch's loss, the mean of the replicas'. shard_map differentiates a replicated
        # parameter by summing its replicas' gradients (the all-reduce): of this mean, the mean of
        # theirs. (A pmean of those gradients would count each replica's again.)
        return loss if axis_name is None else jax.lax.pmean(loss, axis_name)

    if dynamic_scale is None:
        loss, grads = nnx.value_and_grad(model_loss)(model)
        optimizer.update(model, grads)  # updates the merged model's parameters in place
    else:
        loss, dynamic_scale = _loss_scaled_update(model, optimizer, dynamic_scale, model_loss)
    if axis_name is not None:  # the replicas' running statistics averaged: every replica keeps one state
        nnx.update(model, jax.lax.pmean(nnx.state(model, nnx.BatchStat), axis_name))
    return loss, nnx.state((model, optimizer, dynamic_scale))


# The old state's buffers are donated: XLA writes the new state over them instead of holding two
# copies (accelerator memory).
_train_step = jax.jit(_step, static_argnames="loss_fn", donate_argnames="state")


def _data_parallel_train_step(graph: nnx.GraphDef, loss_fn: LossFn, mesh: Mesh) -> Callable[..., tuple]:
    """step(state, inputs, labels): one jitted step of a replica on every device of a one-axis
    mesh (jax.shard_map), the state replicated, the global batch split along the axis."""
    axis = mesh.axis_names[0]
    replica_step = jax.shard_map(functools.partial(_step, graph, loss_fn=loss_fn, axis_name=axis), mesh=mesh,
                                 in_specs=(PartitionSpec(), PartitionSpec(axis), PartitionSpec(axis)),
                                 out_specs=PartitionSpec())
    return jax.jit(replica_step, donate_argnums=0)


def _loss_scaled_update(model: nnx.Module, optimizer: nnx.Optimizer, dynamic_scale: DynamicScale,
                        model_loss: Callable[[nnx.Module], jax.Array]) -> tuple[jax.Array, DynamicScale]:
    """fp16's step: the loss scaled up, so that small gradients do not flush to zero in float16,
    the gradients scaled back; a step whose gradients overflowed leaves the parameters and the
    optimiser state as they were. Returns the loss and the updated scale. DynamicScale wraps
    jax.value_and_grad: it differentiates the parameters as a pytree, and the rest of the model's
    state (batch statistics, dropout keys), which the forward pass advances, comes out as aux."""
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def params_loss(params: nnx.State) -> tuple[jax.Array, nnx.State]:
        # Copies: NNX lets a trace update (batch statistics, dropout counts) only variables made in it.
        model = nnx.merge(graph, params, rest, copy=True)
        return model_loss(model), nnx.state(model, nnx.Not(nnx.Param))

    dynamic_scale, finite, (loss, advanced), grads = dynamic_scale.value_and_grad(params_loss, has_aux=True)(params)
    nnx.update(model, advanced)
    trained = nnx.Any(nnx.Param, nnx.OptState)
    before = nnx.as_pure(nnx.state((model, optimizer), trained))  # the arrays: the update mutates the variables
    optimizer.update(model, grads)
    after = nnx.as_pure(nnx.state((model, optimizer), trained))
    # A select, not a conditional: XLA runs conditionals slowly on GPUs (Flax's advice).
    nnx.update((model, optimizer), jax.tree.map(functools.partial(jnp.where, finite), after, before))
    return loss, dynamic_scale


@functools.partial(jax.jit, static_argnames="activation")
def _predict(graph: nnx.GraphDef, state: nnx.State, inputs: jax.Array,
             activation: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    outputs = nnx.merge(graph, state)(inputs).astype(jnp.float32)  # float32 also from 16-bit layers
    return outputs if activation is None else activation(outputs)


def _finished_loss(loss: jax.Array, state: nnx.State) -> float:
    """The last step's loss, after the device has finished all queued work."""
    # Waiting on the updated state too: the loss alone is known before the update.
    jax.block_until_ready((loss, state))
    return float(loss)


def _initializer(init: Init) -> nnx.Initializer:
    """A specs initialiser in JAX's terms. JAX's fans are PyTorch's: its kernels are (..., in,
    out), the receptive field in the leading axes."""
    if init.kind == ZEROS:
        return nnx.initializers.zeros_init()
    if init.kind == ONES:
        return nnx.initializers.ones_init()
    if init.kind == UNIFORM:  # JAX's own uniform draws from [0, scale)
        return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -init.limit, init.limit)
    if init.kind == GLOROT_UNIFORM:
        return nnx.initializers.glorot_uniform()
    if init.kind == HE_NORMAL:  # JAX's he_normal is truncated; "normal" is not
        return nnx.initializers.variance_scaling(2.0, init.fan, "normal")
    if init.kind == ORTHOGONAL:
        return nnx.initializers.orthogonal()
    raise ValueError(f"no JAX initializer for {init}")


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def _max_pool_2x2(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (2, 2), strides=(2, 2))


class CnnCifar10Net(nnx.Module):
    def __init__(self, spec: TaskSpec, dtype: jnp.dtype | None, rngs: nnx.Rngs):
        initializers = dict(kernel_init=_initializer(CNN.kernel_init), bias_init=_initializer(CNN.bias_init),
                            dtype=dtype, rngs=rngs)
        conv = dict(kernel_size=(CNN.kernel_size, CNN.kernel_size), padding="SAME", **initializers)
        layers, channels = [], spec.input_shape[0]
        for first, second in CNN.filters:
            layers += [nnx.Conv(channels, first, **conv), nnx.relu, nnx.Conv(first, second, **conv), _max_pool_2x2,
                       nnx.relu, nnx.Dropout(CNN.conv_dropout, rngs=rngs)]
            channels = second
        self.features = nnx.Sequential(*layers)
        height, width = (size // 2 ** len(CNN.filters) for size in spec.input_shape[1:])
        self.classifier = nnx.Sequential(
            _flatten,
            nnx.Linear(channels * height * width, CNN.dense_units, **initializers), nnx.relu,
            nnx.Dropout(CNN.dense_dropout, rngs=rngs),
            nnx.Linear(CNN.dense_units, spec.num_classes, **initializers),  # logits: softmax lives in the loss
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.classifier(self.features(x))


class _SoftmaxClassifier:
    """The CNN and the GRU: one NNX model and its optax optimizer, trained batch by batch with
    softmax cross-entropy on logits through jitted functional steps."""
    parameter_note = None

    def __init__(self, run: RunOptions, model: nnx.Module, transform: optax.GradientTransformation):
        self.device = _jax_devices(run)[0]
        self.model = model
        optimizer = nnx.Optimizer(self.model, transform, wrt=nnx.Param)
        # Dropout is on in the training graph, off in the inference graph.
        self._training, self._inference, self._state = _functional(self.model, optimizer, _dynamic_scale(run),
                                                                   self.device)
        self._last_loss: jax.Array | None = None

    def parameter_count(self) -> int:
        return _parameter_count(self.model)

    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        # The numpy batch is copied to the device here, inside the timed step, once each, and
        # asynchronously: device_put returns at once, the step queued after it waits for it.
        x = jax.device_put(inputs, self.device)
        y = jax.device_put(labels, self.device)
        self._last_loss, self._state = _train_step(self._training, self._state, x, y,
                                                   loss_fn=_classification_loss)

    def loss(self) -> float:
        return _finished_loss(self._last_loss, self._state)

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        outputs = _predict(self._inference, self._state[0], jax.device_put(inputs, self.device))  # [0]: the model's
        return np.asarray(outputs)  # the read-back waits for the device


class CnnCifar10(_SoftmaxClassifier):
    # Flax convolutions take NHWC; on GPU XLA picks the cuDNN layout itself.
    layout = "NHWC"

    def __init__(self, spec: TaskSpec, run: RunOptions):
        super().__init__(run, CnnCifar10Net(spec, _compute_dtype(run), nnx.Rngs(run.seed)),
                         optax.sgd(spec.learning_rate, momentum=spec.momentum))


def _conv(in_features: int, out_features: int, kernel: int, stride: int = 1, *, init: Init,
          dtype: jnp.dtype | None, rngs: nnx.Rngs) -> nnx.Conv:
    """A bias-free convolution padded like PyTorch's: kernel // 2 on every side. (XLA's "SAME"
    pads a stride-2 convolution asymmetrically, which would shift every output.)"""
    pad = kernel // 2
    return nnx.Conv(in_features, out_features, (kernel, kernel), strides=stride,
                    padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_initializer(init), dtype=dtype,
                    rngs=rngs)


def _batch_norm(features: int, dtype: jnp.dtype | None, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # Flax's momentum is the weight of the old average: PyTorch's 1 - momentum.
    # Under mixed precision Flax computes the batch statistics in float32 and keeps the running
    # ones in float32; only the normalised output is in the compute dtype.
    return nnx.BatchNorm(features, momentum=BATCH_NORM.decay, epsilon=BATCH_NORM.epsilon,
                         scale_init=_initializer(BATCH_NORM.scale_init), bias_init=_initializer(BATCH_NORM.shift_init),
                         dtype=dtype, rngs=rngs)


def _max_pool(x: jax.Array) -> jax.Array:
    """The stem's 3×3/2 max-pool, padded by 1 (with -inf) like PyTorch's."""
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Bottleneck(nnx.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3×3 convolution; no convolution biases."""

    def __init__(self, channels: int, width: int, stride: int, dtype: jnp.dtype | None, rngs: nnx.Rngs):
        out = width * RESNET50.expansion
        conv = functools.partial(_conv, init=RESNET50.conv_init, dtype=dtype, rngs=rngs)
        self.conv1, self.bn1 = conv(channels, width, 1), _batch_norm(width, dtype, rngs)
        self.conv2, self.bn2 = conv(width, width, 3, stride), _batch_norm(width, dtype, rngs)
        self.conv3, self.bn3 = conv(width, out, 1), _batch_norm(out, dtype, rngs)
        self.downsample = (nnx.Sequential(conv(channels, out, 1, stride), _batch_norm(out, dtype, rngs))
                           if stride != 1 or channels != out else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return nnx.relu(self.bn3(self.conv3(x)) + shortcut)


class Resnet50(nnx.Module):
    """ResNet-50 v1.5 up to global average pooling; attribute names follow torchvision's, which
    are the canonical weights file's."""

    def __init__(self, dtype: jnp.dtype | None, rngs: nnx.Rngs):
        self.conv1 = _conv(3, RESNET50.stem, 7, 2, init=RESNET50.conv_init, dtype=dtype, rngs=rngs)
        self.bn1 = _batch_norm(RESNET50.stem, dtype, rngs)
        channels = RESNET50.stem
        for stage, (width, blocks) in enumerate(RESNET50.stages, start=1):
            stride = 1 if stage == 1 else 2
            layers = []
            for block in range(blocks):
                layers.append(Bottleneck(channels, width, stride if block == 0 else 1, dtype, rngs))
                channels = width * RESNET50.expansion
            setattr(self, f"layer{stage}", nnx.Sequential(*layers))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _max_pool(nnx.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(axis=(1, 2))  # global average pooling over H and W (NHWC)


def _load_canonical(model: nnx.Module, arrays: dict[str, np.ndarray]) -> None:
    """Copy a canonical weights file into a model whose attributes carry torchvision's names."""
    batch_norm_fields = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
    for name, value in arrays.items():
        *path, field = name.split(".")
        layer = model
        for part in path:  # e.g. layer1.0.downsample.1: digits index an nnx.Sequential
            layer = layer.layers[int(part)] if part.isdigit() else getattr(layer, part)
        if isinstance(layer, nnx.Conv):
            layer.kernel.set_value(jnp.asarray(value.transpose(2, 3, 1, 0)))  # O,I,kH,kW -> kH,kW,I,O
        else:
            getattr(layer, batch_norm_fields[field]).set_value(jnp.asarray(value))


class Resnet50Inference:
    parameter_note = None

    def __init__(self, spec: TaskSpec, run: RunOptions):
        self.device = _jax_devices(run)[0]
        # NHWC is XLA's native image layout; on GPU XLA's layout assignment picks cuDNN's.
        self.layout = "NHWC"
        self.model = Resnet50(_compute_dtype(run), nnx.Rngs(run.seed))
        if run.weights:
            _load_canonical(self.model, canonical.load(run.weights, canonical.resnet50_shapes()))
        self.model.eval()  # batch norm on its running statistics
        self._inference, state = nnx.split(self.model)  # Flax's functional API: see _functional
        self._state = jax.device_put(state, self.device)

    def parameter_count(self) -> int:
        return _parameter_count(self.model)

    def predict(self, images: np.ndarray) -> np.ndarray:
        # Forward only: no gradient is ever asked for, so none is computed.
        outputs = _predict(self._inference, self._state, jax.device_put(images, self.device))
        return np.asarray(outputs)  # the read-back waits for the device


class CudnnGRUCell(nnx.GRUCell):
    """Flax's GRU cell with cuDNN's convention (PyTorch's, and Keras's reset_after): biases on
    the hidden-to-hidden projections too, b_hn inside the reset gate, n = tanh(W_in x + b_in +
    r * (W_hn h + b_hn)). Flax's own cell has none there: 300 parameters fewer for this task,
    and b_hn has no counterpart. Its call is Flax's, over the biased projection."""

    def __init__(self, in_features: int, hidden_features: int, *, kernel_init: nnx.Initializer,
                 recurrent_kernel_init: nnx.Initializer, bias_init: nnx.Initializer, dtype: jnp.dtype | None,
                 rngs: nnx.Rngs):
        super().__init__(in_features, hidden_features, kernel_init=kernel_init,
                         recurrent_kernel_init=recurrent_kernel_init, bias_init=bias_init, dtype=dtype, rngs=rngs)
        self.dense_h = nnx.Linear(hidden_features, 3 * hidden_features, use_bias=True,
                                  kernel_init=recurrent_kernel_init, bias_init=bias_init,
                                  dtype=self.dtype, param_dtype=self.param_dtype, promote_dtype=self.promote_dtype,
                                  rngs=rngs)


class GruImdbNet(nnx.Module):
    # JAX has no cuDNN GRU (jax.experimental.rnn wraps cuDNN's LSTM only): the recurrence is an
    # XLA scan of GRUCell steps, on GPU as on CPU.
    def __init__(self, spec: TaskSpec, dtype: jnp.dtype | None, rngs: nnx.Rngs):
        # A lookup, with no arithmetic to speed up: it stays float32 under mixed precision, and so
        # does its gradient's scatter-add over repeated tokens; the GRU casts what it reads.
        self.embedding = nnx.Embed(spec.vocabulary, GRU.embedding, embedding_init=_initializer(GRU.embedding_init),
                                   rngs=rngs)
        # Flax's kernels hold the three gates side by side, (in, 3 × units): each is initialised whole.
        cell = CudnnGRUCell(GRU.embedding, GRU.units, kernel_init=_initializer(GRU.input_kernel_init),
                            recurrent_kernel_init=_initializer(GRU.recurrent_kernel_init),
                            bias_init=_initializer(GRU.bias_init), dtype=dtype, rngs=rngs)
        # Time-major: the scan steps over the leading axis, so no activation is transposed. The
        # carry starts in the parameters' float32, and stays so under mixed precision.
        self.gru = nnx.RNN(cell, time_major=True)
        # Logits: softmax lives in the loss.
        self.dense = nnx.Linear(GRU.units, spec.num_classes, kernel_init=_initializer(GRU.dense_kernel_init),
                                bias_init=_initializer(GRU.dense_bias_init), dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embedding(tokens.T)  # ids (N, T) -> (T, N): transposing ints is the cheap place
        outputs = self.gru(x)  # (T, N, units)
        return self.dense(outputs[-1])  # the last time step's output


class GruImdb(_SoftmaxClassifier):
    layout = "TNC"

    def __init__(self, spec: TaskSpec, run: RunOptions):
        super().__init__(run, GruImdbNet(spec, _compute_dtype(run), nnx.Rngs(run.seed)),
                         optax.adam(run.learning_rate, b1=0.9, b2=0.999, eps=1e-8))


class DenseLayer(nnx.Module):
    """BN-ReLU-conv 1×1 (bottleneck), BN-ReLU-conv 3×3 (growth); its output joins its input."""

    def __init__(self, channels: int, dtype: jnp.dtype | None, rngs: nnx.Rngs):
        width = DENSENET121.bottleneck_width
        self.norm1 = _batch_norm(channels, dtype, rngs)
        self.conv1 = _conv(channels, width, 1, init=DENSENET121.conv_init, dtype=dtype, rngs=rngs)
        self.norm2 = _batch_norm(width, dtype, rngs)
        self.conv2 = _conv(width, DENSENET121.growth, 3, init=DENSENET121.conv_init, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv1(nnx.relu(self.norm1(x)))
        y = self.conv2(nnx.relu(self.norm2(y)))
        return jnp.concatenate([x, y], axis=-1)  # channels last


class Transition(nnx.Module):
    """BN-ReLU-conv 1×1 to fewer channels, then 2×2/2 average pooling."""

    def __init__(self, channels: int, out: int, dtype: jnp.dtype | None, rngs: nnx.Rngs):
        self.norm = _batch_norm(channels, dtype, rngs)
        self.conv = _conv(channels, out, 1, init=DENSENET121.conv_init, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.avg_pool(self.conv(nnx.relu(self.norm(x))), (2, 2), strides=(2, 2))


class DenseNet121(nnx.Module):
    def __init__(self, spec: TaskSpec, dtype: jnp.dtype | None, rngs: nnx.Rngs):
        self.conv0 = _conv(3, DENSENET121.stem, 7, 2, init=DENSENET121.conv_init, dtype=dtype, rngs=rngs)
        self.norm0 = _batch_norm(DENSENET121.stem, dtype, rngs)
        layers, channels = [], DENSENET121.stem
        for index, count in enumerate(DENSENET121.blocks):
            for _ in range(count):
                layers.append(DenseLayer(channels, dtype, rngs))
                channels += DENSENET121.growth
            if index < len(DENSENET121.blocks) - 1:
                out = int(channels * DENSENET121.compression)
                layers.append(Transition(channels, out, dtype, rngs))
                channels = out
        self.blocks = nnx.Sequential(*layers)
        self.norm5 = _batch_norm(channels, dtype, rngs)
        # Logits: the sigmoid lives in the loss.
        self.classifier = nnx.Linear(channels, spec.num_classes,
                                     kernel_init=_initializer(DENSENET121.dense_kernel_init),
                                     bias_init=_initializer(DENSENET121.dense_bias_init), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _max_pool(nnx.relu(self.norm0(self.conv0(x))))
        x = nnx.relu(self.norm5(self.blocks(x)))
        return self.classifier(x.mean(axis=(1, 2)))  # global average pooling (NHWC)


def _read_image(path: str, stored_size: int, size: int, left: int, top: int, flip: bool) -> np.ndarray:
    """One example, HWC in [0, 1]: decoded as RGB (grayscale and RGBA files alike), resized
    bilinearly to the stored size, cropped to the input size, maybe mirrored."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    if image.size != (stored_size, stored_size):
        image = image.resize((stored_size, stored_size), Image.Resampling.BILINEAR)
    image = image.crop((left, top, left + size, top + size))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image, dtype=np.float32) / np.float32(255.0)


class Densenet121Xray:
    parameter_note = None

    def __init__(self, spec: TaskSpec, run: RunOptions):
        devices = _jax_devices(run)
        self.layout = "NHWC"
        self.input_size = run.input_shape[-1]
        self.loader_workers = run.loader_workers
        self.replicas = run.devices
        self.model = DenseNet121(spec, _compute_dtype(run), nnx.Rngs(run.seed))
        optimizer = nnx.Optimizer(self.model, optax.adam(run.learning_rate), wrt=nnx.Param)
        mesh = Mesh(np.array(devices), ("data",))
        # The global batch split along the mesh's axis; parameters, optimizer state and batch
        # statistics replicated.
        self._batch_placement = NamedSharding(mesh, PartitionSpec("data"))
        # Batch norm uses batch statistics in the training graph, running ones in inference.
        self._training, self._inference, self._state = _functional(self.model, optimizer, _dynamic_scale(run),
                                                                   NamedSharding(mesh, PartitionSpec()))
        # Data parallelism as every other framework has it: a replica per device, its batch norms
        # normalising with its own shard's statistics. (jax.jit alone over the split batch would
        # normalise with the global batch's: sync-BN.)
        self._step = (functools.partial(_train_step, self._training, loss_fn=_multilabel_loss) if run.devices == 1
                      else _data_parallel_train_step(self._training, _multilabel_loss, mesh))
        self._last_loss: jax.Array | None = None

    def parameter_count(self) -> int:
        return _parameter_count(self.model)

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> None:
        x = jax.device_put(images, self._batch_placement)  # the global batch, split over the mesh
        y = jax.device_put(labels, self._batch_placement)
        self._last_loss, self._state = self._step(self._state, x, y)

    def loss(self) -> float:
        return _finished_loss(self._last_loss, self._state)

    def predict(self, images: np.ndarray) -> np.ndarray:
        count = len(images)
        padding = -count % self.replicas  # a mesh splits a batch evenly: pad a last partial batch
        if padding:
            images = np.concatenate([np.asarray(images), np.zeros((padding,) + images.shape[1:], np.float32)])
        probabilities = _predict(self._inference, self._state[0], jax.device_put(images, self._batch_placement),
                                 activation=nnx.sigmoid)
        return np.asarray(probabilities)[:count]  # the read-back waits for the devices

    def input_pipeline(self, files: ImageFiles, stored_size: int, batch_size: int, training: bool,
                       seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Global batches (NHWC float32, multi-hot labels). JAX leaves input pipelines to the
        user (its docs point to tf.data or Grain): Pillow decodes a batch's files in a thread
        pool (PNG decoding and resizing release the GIL) while the previous batch trains."""
        count, size = len(files.paths), self.input_size
        rng = np.random.default_rng(seed)  # order, crop corners and flips: all drawn up front
        if training:
            order = rng.permutation(count)
            corners = rng.integers(0, stored_size - size + 1, size=(count, 2))
            flips = rng.random(count) < 0.5
            starts = range(0, count - batch_size + 1, batch_size)  # whole batches only
        else:
            order = np.arange(count)
            corners = np.full((count, 2), (stored_size - size) // 2)  # the centre crop
            flips = np.zeros(count, dtype=bool)
            starts = range(0, count, batch_size)  # the last partial batch too
        pool = ThreadPoolExecutor(self.loader_workers)

        def submit(start: int) -> tuple[np.ndarray, list[Future]]:
            indices = order[start:start + batch_size]
            return indices, [pool.submit(_read_image, files.paths[i], stored_size, size, int(corners[i, 0]),
                                         int(corners[i, 1]), bool(flips[i])) for i in indices]

        def collect(indices: np.ndarray, images: list[Future]) -> tuple[np.ndarray, np.ndarray]:
            return np.stack([image.result() for image in images]), files.labels[indices]

        try:
            ready = None
            for start in starts:
                ahead = submit(start)  # the next batch decodes while the caller uses this one
                if ready is not None:
                    yield collect(*ready)
                ready = ahead
            if ready is not None:
                yield collect(*ready)
        finally:  # also when the caller stops early (throughput mode)
            pool.shutdown(wait=True, cancel_futures=True)


TASKS = {"cnn_cifar10": CnnCifar10, "resnet50_inference": Resnet50Inference, "gru_imdb": GruImdb,
         "densenet121_xray": Densenet121Xray}
