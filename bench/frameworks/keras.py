"""Keras 3: keras.Model built from keras.layers (keras.applications for DenseNet-121),
compile(), fit() and predict_on_batch(), on the backend that KERAS_BACKEND names
(tensorflow, jax or torch); the loader sets it before this import. DenseNet-121 runs
data-parallel with each backend's standard mechanism: tf.distribute.MirroredStrategy on
TensorFlow, keras.distribution.DataParallel on JAX; Keras has none for torch. Images come
from a keras.utils.PyDataset that decodes with keras.utils.load_img (Pillow). Mixed precision
with Keras's dtype policies, on every backend."""
from __future__ import annotations

import collections
import contextlib
import itertools
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import keras
import numpy as np

from .. import precision
from .. import weights as canonical
from ..data import ImageFiles
from ..shards import Rows, global_batches
from ..specs import (BATCH_NORM, CNN, DENSENET121, FRAMEWORK_SPECS, GLOROT_UNIFORM, GRU, HE_NORMAL, ONES,
                     ORTHOGONAL, RESNET50, UNIFORM, ZEROS, Init, RunOptions, TaskSpec, Unsupported)

BACKEND = keras.backend.backend()  # "tensorflow", "jax" or "torch"
# Each backend's CPU layout. TensorFlow's CPU convolutions (oneDNN) only take NHWC (NCHW
# fails in the backward pass unless XLA compiles it, and XLA was 2.5x slower here); JAX and
# torch measured the same in both layouts (2-core EPYC), so Keras's default, channels_last.
CPU_LAYOUTS = {"tensorflow": "NHWC", "jax": "NHWC", "torch": "NHWC"}
Batch = tuple[Any, Any]
# Float32 variables, layers computing in the 16-bit type; other precisions keep "float32".
DTYPE_POLICIES = {"fp16": "mixed_float16", "bf16": "mixed_bfloat16"}


def describe(run: RunOptions) -> dict:
    on_gpu = run.device == "gpu"
    cuda, cudnn = _cuda_cudnn() if on_gpu else (None, None)
    tf32_matmul, tf32_convolutions = _tf32_in_force() if on_gpu else (None, None)
    # What compile() is asked for; a model that Keras compiles otherwise corrects it (_Compiled).
    xla, compiler = _compiled_by(_jit_compile(run))
    return {
        "framework": f"keras-{BACKEND}",
        "framework_version": keras.__version__,
        "threads": _threads(),
        "interop_threads": _interop_threads(),
        "cuda": cuda,
        "cudnn": cudnn,
        "math_modes": precision.math_modes(
            run.precision, tf32_matmul=tf32_matmul, tf32_convolutions=tf32_convolutions,
            # compile() wraps the optimizer of a mixed_float16 model in a LossScaleOptimizer.
            loss_scaling="dynamic" if keras.mixed_precision.global_policy().name == "mixed_float16" else None,
            autotuner=_autotuner(xla) if on_gpu else None,
            xla=xla, compiler=compiler),
        "framework_settings": {
            "keras_version": keras.__version__,
            "keras_backend": BACKEND,
            "keras_backend_version": _backend_module().__version__,
            "data_parallel": _data_parallel_mechanism(run),
        },
    }


def configure(run: RunOptions) -> None:
    # TF32 only in tf32 cells: fp32, and the float32 parts of fp16 and bf16, stay in full float32.
    tf32 = run.precision == "tf32"
    if BACKEND == "tensorflow":
        tf = _backend_module()
        # Device options only apply before TensorFlow initialises its runtime: first.
        if run.device == "gpu":
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
        else:
            tf.config.set_visible_devices([], "GPU")
            if run.devices > 1:
                # MirroredStrategy's replicas on CPU: the one CPU split into logical devices
                # (they share TensorFlow's thread pools). tensorflow.py does the same: the
                # framework modules share no code, so each stays readable on its own.
                cpu = tf.config.list_physical_devices("CPU")[0]
                tf.config.set_logical_device_configuration(
                    cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(run.devices)])
        if run.threads:
            tf.config.threading.set_intra_op_parallelism_threads(run.threads)
            tf.config.threading.set_inter_op_parallelism_threads(run.threads)
        # TensorFlow's default runs float32 matrix products and convolutions in TF32 on Ampere
        # and newer.
        tf.config.experimental.enable_tensor_float_32_execution(tf32)
    elif BACKEND == "torch":
        torch = _backend_module()
        if run.threads:
            torch.set_num_threads(run.threads)
            torch.set_num_interop_threads(run.threads)
        # The cuDNN autotuner picks the fastest convolution algorithm for fixed shapes.
        torch.backends.cudnn.benchmark = run.device == "gpu"
        # torch's default lets cuDNN convolutions use TF32 but not matrix products. These flags
        # work without a warning on torch 2.7 to 2.13; the fp32_precision API of torch 2.9 and
        # newer does not exist before it (and mixing the two warns).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    else:
        jax = _backend_module()
        # The precision of products and convolutions of float32 operands (16-bit ones keep
        # theirs): XLA's default takes TF32 on Ampere and newer, "highest" is full float32.
        jax.config.update("jax_default_matmul_precision", "tensorfloat32" if tf32 else "highest")
        if run.device == "cpu":
            # XLA reads its thread count (and, for several devices, the CPU device count) from
            # XLA_FLAGS, which the bench sets before JAX is imported. A CPU cell must not start
            # JAX's CUDA backend (which would take 75% of a GPU's memory).
            jax.config.update("jax_platforms", "cpu")
    # Every layer built from now on keeps float32 variables and computes in the policy's dtype;
    # losses compute in float32 whatever the outputs' dtype.
    keras.mixed_precision.set_global_policy(DTYPE_POLICIES.get(run.precision, "float32"))
    keras.utils.set_random_seed(run.seed)  # Python, numpy and the backend's generators


def device_memory_peak(run: RunOptions) -> int | None:
    """The backend's allocator peak on the busiest of the cell's GPUs; None on CPU."""
    if run.device != "gpu":
        return None
    module = _backend_module()
    if BACKEND == "torch":
        return module.cuda.max_memory_allocated()
    if BACKEND == "tensorflow":
        return max(module.config.experimental.get_memory_info(f"GPU:{index}")["peak"]
                   for index in range(run.devices))
    stats = [device.memory_stats() for device in module.devices("gpu")[:run.devices]]
    return max(s["peak_bytes_in_use"] for s in stats) if all(stats) else None


def gemm(size: int, run: RunOptions) -> Callable[[], None]:
    """A function computing one product of two ``size`` x ``size`` matrices with the framework's
    own matrix multiply, returning once the device has finished (bench/ceiling.py). The two
    matrices are made once, here: seeded standard-normal values on the cell's device, in the
    precision's compute dtype."""
    device = _keras_device(run.device)
    with _device_scope(device):
        seed = keras.random.SeedGenerator(run.seed)
        a, b = (keras.random.normal((size, size), dtype=precision.COMPUTE_DTYPES[run.precision], seed=seed)
                for _ in range(2))

    def product() -> None:
        with _device_scope(device):
            # One element read back waits for the product on every backend (JAX dispatches
            # asynchronously, on CPUs too); as a 1 x 1 array, since Keras cannot convert a
            # bfloat16 scalar of TensorFlow's to numpy.
            keras.ops.convert_to_numpy(keras.ops.matmul(a, b)[:1, :1])
    return product


def _backend_module():
    """The backend framework itself, imported only to ask it about itself, to configure it,
    to sync and (TensorFlow) for its distribution strategy."""
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


def _tf32_in_force() -> tuple[bool, bool]:
    """Whether the backend lets float32 matrix products, and convolutions, run in TF32."""
    module = _backend_module()
    if BACKEND == "torch":
        return module.backends.cuda.matmul.allow_tf32, module.backends.cudnn.allow_tf32
    if BACKEND == "tensorflow":
        enabled = module.config.experimental.tensor_float_32_execution_enabled()
        return enabled, enabled
    # One setting for both; unset ("default") is XLA's default, which takes TF32.
    enabled = module.config.jax_default_matmul_precision in (None, "default", "tensorfloat32")
    return enabled, enabled


def _autotuner(xla: bool) -> bool:
    """Whether convolution algorithms are picked by timing them on the GPU: torch's cuDNN
    benchmark flag; for a model XLA compiles, XLA's autotuner (on unless XLA_FLAGS sets
    --xla_gpu_autotune_level=0); otherwise TensorFlow's cuDNN autotuner (on unless
    TF_CUDNN_USE_AUTOTUNE=0)."""
    if BACKEND == "torch":
        return _backend_module().backends.cudnn.benchmark
    if xla:
        found = re.search(r"--xla_gpu_autotune_level=(\d+)", os.environ.get("XLA_FLAGS", ""))
        return found is None or int(found.group(1)) > 0
    return os.environ.get("TF_CUDNN_USE_AUTOTUNE", "1").lower() not in ("0", "false")


def _jit_compile(run: RunOptions, data_parallel: bool = False) -> bool:
    """compile()'s jit_compile. The compiled profile: True on every backend (XLA on TensorFlow
    and JAX, torch.compile on torch). By default, what compile(jit_compile="auto") picks on a
    host that has only the cell's devices: XLA always for JAX; eager for torch; for TensorFlow
    on GPUs only (Keras turns it off on CPU, slower there). Keras on TensorFlow cannot compile
    a step under tf.distribute (one XLA cluster cannot reach the other replicas' variables:
    "Trying to access resource ... located in device ...:1 from device ...:0"), so by default
    a data-parallel task runs without XLA on one device too, the same at every device count.
    Said explicitly so that a CPU cell on a GPU host gets the same."""
    if run.compile == "compiled":
        return True
    if BACKEND == "tensorflow":
        return run.device == "gpu" and not data_parallel
    return BACKEND == "jax"


def _compiled_by(jit_compile: bool) -> tuple[bool, str | None]:
    """For a model compiled with ``jit_compile``: whether XLA compiles it, and the compiler it
    runs through (specs.FRAMEWORK_SPECS): XLA on TensorFlow and JAX, torch.compile on torch;
    None without jit_compile (TensorFlow's tf.function graph, torch's eager modules)."""
    if not jit_compile:
        return False, None
    return BACKEND != "torch", FRAMEWORK_SPECS[f"keras-{BACKEND}"].compiler


class _Compiled:
    """A task whose compiled Keras model says after the run what compile() really chose
    (protocol.py: math_modes): Keras turns jit_compile off for a model with a layer XLA cannot
    compile (on TensorFlow, a GRU that runs cuDNN's kernel), whatever was asked, and the model
    then runs through no compiler."""

    model: keras.Model
    on_gpu: bool
    held: tuple[np.ndarray, np.ndarray] | None = None  # the array data fit() is given rows of

    def math_modes(self) -> dict:
        xla, compiler = _compiled_by(bool(self.model.jit_compile))
        return {"xla": xla, "autotuner": _autotuner(xla) if self.on_gpu else None, "compiler": compiler}

    def array_batches(self, inputs: np.ndarray, labels: np.ndarray, batch_size: int,
                      order: np.ndarray | None) -> Iterator[tuple[Rows, None]]:
        """Global batches of array data as Rows of the arrays, reordered here once, before any
        timed step: fit() is then given a block's or an epoch's rows as arrays, not fed batch
        by batch from a generator (on TensorFlow a Python call every step: 10% of a CPU GRU
        step)."""
        self.held = (inputs, labels) if order is None else (inputs[order], labels[order])
        return ((rows, None) for rows in global_batches(len(inputs), batch_size, None))


def _data_parallel_mechanism(run: RunOptions) -> str | None:
    mechanism = FRAMEWORK_SPECS["keras-" + BACKEND].data_parallel
    if run.devices == 1 or mechanism is None:
        return None
    return f"{mechanism}, {run.devices} {run.device} devices"


def _keras_device(device: str) -> str:
    # No device index: Keras 3.15's torch backend moves each new variable with .to("cpu:0"),
    # which torch counts as a copy from "cpu" that drops the Parameter type, and Dropout's
    # integer seed variable then fails ("Only Tensors of floating point ... require gradients").
    return "gpu" if device == "gpu" else "cpu"


def _device_scope(device: str) -> contextlib.AbstractContextManager:
    """Where a model's variables and steps live: the cell's device, said explicitly only where
    the backend could put them elsewhere (a GPU it sees). A CPU cell on a host without one
    needs no scope, and TensorFlow's explicit CPU placement cost 6 to 14% of a CPU CNN step
    (the same fit() with and without it, alternating in one process)."""
    if device == "cpu" and not _backend_sees_gpu():
        return contextlib.nullcontext()
    return keras.device(device)


def _backend_sees_gpu() -> bool:
    module = _backend_module()
    if BACKEND == "tensorflow":
        return bool(module.config.list_physical_devices("GPU"))
    if BACKEND == "torch":
        return module.cuda.is_available()
    return any(device.platform == "gpu" for device in module.devices())  # configure() limits a CPU cell's


def _image_layout(device: str) -> str:
    # NCHW for cuDNN on every backend; on CPU the layout CPU_LAYOUTS gives (measured).
    return "NCHW" if device == "gpu" else CPU_LAYOUTS[BACKEND]


def _data_format(layout: str) -> str:
    return "channels_first" if layout == "NCHW" else "channels_last"


def _image_shape(input_shape: tuple[int, ...], data_format: str) -> tuple[int, ...]:
    """One example's shape in the model's data format, from the channel-first (C, H, W)."""
    channels, height, width = input_shape
    return (channels, height, width) if data_format == "channels_first" else (height, width, channels)


def _parameter_count(model: keras.Model) -> int:
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def _initializer(init: Init) -> keras.initializers.Initializer:
    """A specs initialiser as a new Keras initializer, one per weight: a Keras initializer made
    without a seed fixes one at creation, so a shared one would give every weight the same draw.
    Keras computes fans from its kernel shapes (kh, kw, in, out) and (in, out) as PyTorch does."""
    if init.kind == ZEROS:
        return keras.initializers.Zeros()
    if init.kind == ONES:
        return keras.initializers.Ones()
    if init.kind == UNIFORM:
        return keras.initializers.RandomUniform(-init.limit, init.limit)
    if init.kind == GLOROT_UNIFORM:
        return keras.initializers.GlorotUniform()
    if init.kind == HE_NORMAL:  # keras.initializers.HeNormal is truncated: not the task's
        return keras.initializers.VarianceScaling(2.0, mode=init.fan, distribution="untruncated_normal")
    if init.kind == ORTHOGONAL:
        return keras.initializers.Orthogonal()
    raise ValueError(f"no Keras initializer for {init.kind!r}")


def _batch_norm(axis: int, name: str | None = None) -> keras.layers.BatchNormalization:
    # Keras's momentum is the weight of the old average; its defaults (0.99, epsilon 1e-3) are not the task's.
    return keras.layers.BatchNormalization(axis=axis, momentum=BATCH_NORM.decay, epsilon=BATCH_NORM.epsilon,
                                           gamma_initializer=_initializer(BATCH_NORM.scale_init),
                                           beta_initializer=_initializer(BATCH_NORM.shift_init), name=name)


def _adam(learning_rate: float) -> keras.optimizers.Adam:
    # Keras's default epsilon is 1e-7; the task's (and PyTorch's) is 1e-8.
    return keras.optimizers.Adam(learning_rate=learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-8)


def _sync_device(model: keras.Model) -> None:
    """Wait for the GPU. fit() already ends with its logs as Python floats (Keras 3 turns
    them into host numbers), which waits for the last step; this makes sure of it."""
    if BACKEND == "torch":
        _backend_module().cuda.synchronize()
    elif BACKEND == "tensorflow":
        _backend_module().test.experimental.sync_devices()
    else:
        _backend_module().block_until_ready([v.value for v in model.variables])


def _fit(model: keras.Model, batches: Iterable[tuple[Rows, None]] | keras.utils.PyDataset, steps: int,
         arrays: tuple[np.ndarray, np.ndarray] | None) -> float:
    """One fit() epoch of `steps` steps, without shuffling; its mean loss. A PyDataset (the
    image pipeline) goes to fit as it is, for Keras's own workers to decode; array data as its
    users hand it over, arrays that fit() batches itself: the next `steps` Rows of the
    `arrays` held. Either way each backend's adapter copies a batch to the device when the step
    takes it."""
    if isinstance(batches, keras.utils.PyDataset):
        history = model.fit(batches, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
    else:
        x, y, batch_size = _block_arrays([rows for rows, _ in itertools.islice(batches, steps)], arrays)
        history = model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return history.history["loss"][-1]


def _block_arrays(block: list[Rows], arrays: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """A block's batches of the arrays held, as two arrays and the batch size: one view where
    they are consecutive rows (an epoch; a block, unless it wraps round the data), else the
    rows gathered."""
    inputs, labels = arrays
    first, last = block[0].rows, block[-1].rows
    batch_size = first.stop - first.start
    if last.stop - first.start == batch_size * len(block):
        rows = slice(first.start, last.stop)
    else:
        rows = np.concatenate([np.arange(batch.rows.start, batch.rows.stop) for batch in block])
    return inputs[rows], labels[rows], batch_size


def _read_loss(model: keras.Model, loss: float | None, on_gpu: bool) -> float:
    """The last step's loss, after the device has finished all queued work."""
    if on_gpu:
        _sync_device(model)
    return float(loss)


def build_cnn_cifar10(spec: TaskSpec, data_format: str) -> keras.Sequential:
    layers = keras.layers

    def conv(filters: int, activation: str | None = None) -> keras.layers.Conv2D:
        return layers.Conv2D(filters, CNN.kernel_size, padding="same", activation=activation, data_format=data_format,
                             kernel_initializer=_initializer(CNN.kernel_init),
                             bias_initializer=_initializer(CNN.bias_init))

    def dense(units: int, activation: str | None = None) -> keras.layers.Dense:
        return layers.Dense(units, activation=activation, kernel_initializer=_initializer(CNN.kernel_init),
                            bias_initializer=_initializer(CNN.bias_init))

    model = keras.Sequential([keras.Input(shape=_image_shape(spec.input_shape, data_format))])
    for first, second in CNN.filters:
        for layer in (conv(first, "relu"), conv(second), layers.MaxPooling2D(2, data_format=data_format),
                      layers.ReLU(), layers.Dropout(CNN.conv_dropout)):
            model.add(layer)
    for layer in (layers.Flatten(data_format=data_format), dense(CNN.dense_units, "relu"),
                  layers.Dropout(CNN.dense_dropout),
                  dense(spec.num_classes)):  # logits: softmax lives in the loss
        model.add(layer)
    return model


class _SoftmaxClassifier(_Compiled):
    """The CNN and the GRU: one compiled Keras model trained with fit() and softmax
    cross-entropy on logits."""
    parameter_note = None

    def __init__(self, run: RunOptions, build_model: Callable[[], keras.Model],
                 build_optimizer: Callable[[], keras.optimizers.Optimizer]):
        keras.utils.set_random_seed(run.seed)
        self.on_gpu = run.device == "gpu"
        self.device = _keras_device(run.device)
        with _device_scope(self.device):
            self.model = build_model()
            self.model.compile(optimizer=build_optimizer(),
                               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                               jit_compile=_jit_compile(run))
        self._last_loss: float | None = None

    def parameter_count(self) -> int:
        return _parameter_count(self.model)

    def train_steps(self, batches: Iterable[Batch], steps: int) -> None:
        with _device_scope(self.device):
            self._last_loss = _fit(self.model, batches, steps, self.held)

    def loss(self) -> float:
        return _read_loss(self.model, self._last_loss, self.on_gpu)

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        with _device_scope(self.device):
            # predict_on_batch runs the model with training=False (dropout off) and returns numpy
            # in the compute dtype.
            return np.asarray(self.model.predict_on_batch(inputs), dtype=np.float32)


class CnnCifar10(_SoftmaxClassifier):
    def __init__(self, spec: TaskSpec, run: RunOptions):
        self.layout = _image_layout(run.device)
        super().__init__(
            run, lambda: build_cnn_cifar10(spec, _data_format(self.layout)),
            lambda: keras.optimizers.SGD(learning_rate=spec.learning_rate, momentum=spec.momentum))


def build_resnet50(input_shape: tuple[int, ...], data_format: str) -> keras.Model:
    """ResNet-50 v1.5 up to global average pooling, with the functional API; layers are named
    after torchvision's modules (the canonical weights file's names). keras.applications'
    ResNet50 is v1 (stride on the first 1×1) with convolution biases: not this network."""
    layers = keras.layers
    axis = 1 if data_format == "channels_first" else -1

    def conv(x, filters: int, size: int, stride: int, name: str):
        if size > 1:
            # Symmetric padding, as PyTorch's: "same" pads stride-2 convolutions unevenly.
            x = layers.ZeroPadding2D(size // 2, data_format=data_format)(x)
        return layers.Conv2D(filters, size, strides=stride, use_bias=False, data_format=data_format,
                             kernel_initializer=_initializer(RESNET50.conv_init), name=_keras_name(name))(x)

    def batch_norm(x, name: str):
        return _batch_norm(axis, _keras_name(name))(x)

    inputs = keras.Input(shape=_image_shape(input_shape, data_format))
    x = layers.ReLU()(batch_norm(conv(inputs, RESNET50.stem, 7, 2, "conv1"), "bn1"))
    # Zero padding before the max-pool equals PyTorch's (-inf) padding: the inputs are ReLU outputs.
    x = layers.ZeroPadding2D(1, data_format=data_format)(x)
    x = layers.MaxPooling2D(3, strides=2, data_format=data_format)(x)
    for stage, (width, blocks) in enumerate(RESNET50.stages, start=1):
        out = width * RESNET50.expansion
        for block in range(blocks):
            name = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1  # v1.5: the stride sits on the 3×3 conv2
            shortcut = x
            if block == 0:  # the projection to the stage's width (and stride)
                shortcut = batch_norm(conv(x, out, 1, stride, f"{name}.downsample.0"), f"{name}.downsample.1")
            y = layers.ReLU()(batch_norm(conv(x, width, 1, 1, f"{name}.conv1"), f"{name}.bn1"))
            y = layers.ReLU()(batch_norm(conv(y, width, 3, stride, f"{name}.conv2"), f"{name}.bn2"))
            y = batch_norm(conv(y, out, 1, 1, f"{name}.conv3"), f"{name}.bn3")
            x = layers.ReLU()(layers.Add()([y, shortcut]))
    outputs = layers.GlobalAveragePooling2D(data_format=data_format)(x)
    return keras.Model(inputs, outputs, name="resnet50_v1_5")


def _keras_name(name: str) -> str:
    """A torchvision module name as a Keras layer name: the torch backend registers layers as
    torch modules, whose names cannot hold dots."""
    return name.replace(".", "_")


def _load_canonical(model: keras.Model, arrays: dict[str, np.ndarray]) -> None:
    """Copy a canonical weights file into a model whose layers are named after torchvision's
    modules: kernels O×I×kH×kW become Keras's kH×kW×I×O (in either data format); batch norm
    takes gamma, beta, moving mean, moving variance."""
    modules = {_keras_name(name.rsplit(".", 1)[0]): name.rsplit(".", 1)[0] for name in arrays}
    used = set()
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            fields = ["weight"]
        elif isinstance(layer, keras.layers.BatchNormalization):
            fields = ["weight", "bias", "running_mean", "running_var"]
        else:
            continue
        if layer.name not in modules:
            raise ValueError(f"the weights file has nothing for layer {layer.name}")
        names = [f"{modules[layer.name]}.{field}" for field in fields]
        values = [arrays[name] for name in names]
        if isinstance(layer, keras.layers.Conv2D):
            values = [values[0].transpose(2, 3, 1, 0)]
        layer.set_weights(values)
        used.update(names)
    unused = [name for name in arrays if name not in used]
    if unused:
        raise ValueError(f"the model has no layer for {', '.join(unused)}")


class Resnet50Inference(_Compiled):
    parameter_note = None

    def __init__(self, spec: TaskSpec, run: RunOptions):
        keras.utils.set_random_seed(run.seed)
        self.on_gpu = run.device == "gpu"
        self.device = _keras_device(run.device)
        self.layout = _image_layout(run.device)
        with _device_scope(self.device):
            self.model = build_resnet50(run.input_shape, _data_format(self.layout))
            if run.weights:
                _load_canonical(self.model, canonical.load(run.weights, canonical.resnet50_shapes()))
            # No optimizer or loss: compile() only sets how predict_on_batch runs (XLA or not).
            self.model.compile(jit_compile=_jit_compile(run))

    def parameter_count(self) -> int:
        return _parameter_count(self.model)

    def predict(self, images: np.ndarray) -> np.ndarray:
        with _device_scope(self.device):
            # Inference mode (batch norm on its moving statistics), no gradients; the numpy
            # result (in the compute dtype) is the read-back that waits for the device.
            return np.asarray(self.model.predict_on_batch(images), dtype=np.float32)


def build_gru_imdb(spec: TaskSpec) -> keras.Sequential:
    return keras.Sequential([
        keras.Input(shape=spec.input_shape, dtype="int32"),
        keras.layers.Embedding(spec.vocabulary, GRU.embedding, embeddings_initializer=_initializer(GRU.embedding_init)),
        # The defaults are cuDNN's GRU (reset gate after the recurrent matmul, two bias vectors),
        # which the TensorFlow and torch backends run on cuDNN on a GPU; only the last time
        # step's output comes out (return_sequences=False). Keras keeps the three gates'
        # matrices stacked, so each initializer covers them all, as the task says.
        keras.layers.GRU(GRU.units, kernel_initializer=_initializer(GRU.input_kernel_init),
                         recurrent_initializer=_initializer(GRU.recurrent_kernel_init),
                         bias_initializer=_initializer(GRU.bias_init)),
        keras.layers.Dense(spec.num_classes, kernel_initializer=_initializer(GRU.dense_kernel_init),
                           bias_initializer=_initializer(GRU.dense_bias_init)),  # logits: softmax lives in the loss
    ])


class GruImdb(_SoftmaxClassifier):
    # Keras's recurrent layers take batch-major sequences; the backends' cuDNN paths
    # transpose to time-major inside the layer.
    layout = "NTC"

    def __init__(self, spec: TaskSpec, run: RunOptions):
        super().__init__(run, lambda: build_gru_imdb(spec), lambda: _adam(run.learning_rate))


class ReplicaBatchNormalization(keras.layers.BatchNormalization):
    """Batch norm as data-parallel training runs it in every other framework: in training, each
    replica's slice of the global batch is normalised with its own statistics, and the moving
    averages take the replicas' mean statistics. keras.distribution hands the layer the global
    batch as one array sharded over the replicas, which the stock layer would normalise as a
    whole (synchronised batch norm); replica r's examples are the r-th slice of it."""

    def __init__(self, replicas: int, **kwargs):
        super().__init__(**kwargs)
        self.replicas = replicas

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        ops = keras.ops
        rank = len(inputs.shape)
        channel = self.axis % rank
        x = ops.cast(inputs, "float32")  # statistics in float32, as the stock layer computes them
        # (replicas, examples per replica, ...): each replica's statistics stay on its device.
        shards = ops.reshape(x, (self.replicas, -1) + tuple(x.shape[1:]))
        mean, variance = ops.moments(shards, [a for a in range(1, rank + 1) if a != channel + 1], keepdims=True)
        normalised = ops.reshape((shards - mean) * ops.rsqrt(variance + self.epsilon), ops.shape(x))
        channels = [-1 if a == channel else 1 for a in range(rank)]
        outputs = normalised * ops.reshape(self.gamma, channels) + ops.reshape(self.beta, channels)
        for average, statistic in ((self.moving_mean, mean), (self.moving_variance, variance)):
            replicas_mean = ops.reshape(ops.mean(statistic, axis=0), average.shape)
            average.assign(average * self.momentum + replicas_mean * (1.0 - self.momentum))
        return ops.cast(outputs, self.compute_dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "replicas": self.replicas}


def build_densenet121(input_shape: tuple[int, ...], num_classes: int, data_format: str,
                      replicas: int = 1) -> keras.Model:
    """keras.applications' DenseNet-121 without its ImageNet head, global average pooling, then
    a dense layer of num_classes logits. The zoo's network is DENSENET121's (stem, blocks,
    growth, bottleneck, compression), though its API takes none of them; its layers are
    re-initialised and its batch norms set as the task says. ``replicas``: the replicas of a
    keras.distribution run, whose batch norms become ReplicaBatchNormalization."""
    # keras.applications read the layout from the global image data format.
    keras.config.set_image_data_format(data_format)
    features = keras.applications.DenseNet121(weights=None, include_top=False, pooling="avg",
                                              input_shape=_image_shape(input_shape, data_format))
    if replicas > 1:
        features = keras.models.clone_model(features, clone_function=lambda layer: (
            ReplicaBatchNormalization(replicas, **layer.get_config())
            if isinstance(layer, keras.layers.BatchNormalization) else layer.__class__.from_config(layer.get_config())))
    for layer in features.layers:
        if isinstance(layer, keras.layers.Conv2D):  # the zoo's are Glorot
            _reinitialise(layer.kernel, DENSENET121.conv_init)
        elif isinstance(layer, keras.layers.BatchNormalization):
            # The zoo's are momentum 0.99, epsilon 1.001e-5; both are read when the layer is called.
            layer.momentum, layer.epsilon = BATCH_NORM.decay, BATCH_NORM.epsilon
            _reinitialise(layer.gamma, BATCH_NORM.scale_init)
            _reinitialise(layer.beta, BATCH_NORM.shift_init)
    logits = keras.layers.Dense(num_classes, kernel_initializer=_initializer(DENSENET121.dense_kernel_init),
                                bias_initializer=_initializer(DENSENET121.dense_bias_init),
                                name="logits")(features.output)  # the sigmoid lives in the loss
    return keras.Model(features.input, logits, name="densenet121")


def _reinitialise(variable: keras.Variable, init: Init) -> None:
    variable.assign(_initializer(init)(variable.shape, variable.dtype))


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # the logistic function, without overflow


class ChestXrayBatches(keras.utils.PyDataset):
    """Batches of PNG files: keras.utils.load_img (Pillow) decodes each as RGB (grayscale and
    RGBA files alike) resized bilinearly to stored_size; then a random crop to crop_size and a
    random horizontal flip when training, the centre crop otherwise; float32 in [0, 1] in the
    model's data format, with the files' multi-hot labels."""

    def __init__(self, files: ImageFiles, stored_size: int, crop_size: int, batch_size: int,
                 training: bool, seed: int, data_format: str, workers: int):
        # Threads, not processes: Pillow releases the GIL while it decodes and resizes.
        super().__init__(workers=workers, use_multiprocessing=False)
        self.files, self.stored_size, self.crop_size = files, stored_size, crop_size
        self.batch_size, self.training, self.seed = batch_size, training, seed
        self.data_format = data_format
        count = len(files.paths)
        self.order = np.random.default_rng(seed).permutation(count) if training else np.arange(count)

    def __len__(self) -> int:
        count = len(self.files.paths)
        # Training drops the last partial batch; scoring keeps it.
        return count // self.batch_size if self.training else -(-count // self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        indices = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        images = np.stack([self._example(i) for i in indices])
        if self.data_format == "channels_first":
            images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        return images, self.files.labels[indices]

    def _example(self, index: int) -> np.ndarray:
        size = self.stored_size
        image = keras.utils.load_img(self.files.paths[index], color_mode="rgb", target_size=(size, size),
                                     interpolation="bilinear")  # resizes only if the file is another size
        pixels = keras.utils.img_to_array(image, data_format="channels_last", dtype="float32")
        margin = size - self.crop_size
        if self.training:
            # Seeded by (epoch seed, example): the same augmentation whichever thread decodes it.
            rng = np.random.default_rng((self.seed, index))
            left, top = rng.integers(0, margin + 1, size=2)
            flip = rng.random() < 0.5
        else:
            left = top = margin // 2
            flip = False
        pixels = pixels[top:top + self.crop_size, left:left + self.crop_size]
        if flip:
            pixels = pixels[:, ::-1]
        return pixels / np.float32(255.0)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The batches in order, `workers` threads decoding up to `max_queue_size` batches
        ahead, as Keras's own enqueuer does for a PyDataset inside fit(): for scoring, and for
        throughput blocks that run on across epochs (iterated by hand, a PyDataset runs on
        one thread)."""
        pool = ThreadPoolExecutor(self.workers)
        pending = collections.deque()
        try:
            for index in range(len(self)):
                pending.append(pool.submit(self.__getitem__, index))
                if len(pending) >= self.max_queue_size:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # also when the caller stops early (throughput mode)
            pool.shutdown(wait=True, cancel_futures=True)


def _replica_devices(run: RunOptions) -> list[str]:
    """The first run.devices devices of the cell's kind: GPUs, or the CPU devices made for the
    cell (XLA_FLAGS for JAX, logical devices in configure for TensorFlow)."""
    kind = "gpu" if run.device == "gpu" else "cpu"
    if BACKEND == "tensorflow":
        devices = [device.name for device in _backend_module().config.list_logical_devices(kind.upper())]
    else:
        devices = keras.distribution.list_devices(kind)
    if len(devices) < run.devices:
        raise ValueError(f"{run.devices} {kind} devices asked for, {len(devices)} available: {devices}")
    return devices[:run.devices]


class Densenet121Xray(_Compiled):
    parameter_note = None

    def __init__(self, spec: TaskSpec, run: RunOptions):
        keras.utils.set_random_seed(run.seed)
        self.on_gpu = run.device == "gpu"
        self.device = _keras_device(run.device)
        # keras.applications' DenseNet refuses channels_first on every backend and device.
        self.layout = "NHWC"
        self.data_format = _data_format(self.layout)
        self.crop_size = run.input_shape[-1]
        self.loader_workers = run.loader_workers
        self.strategy = None  # TensorFlow's MirroredStrategy when data-parallel
        jit_compile = _jit_compile(run, spec.data_parallel)
        if run.devices > 1:
            if BACKEND == "tensorflow" and jit_compile:
                raise Unsupported("Keras on TensorFlow cannot XLA-compile a step under tf.distribute: "
                                  "compile(jit_compile=True) fails, one XLA cluster cannot reach the other "
                                  "replicas' variables")
            if BACKEND == "jax":
                # Data parallelism the Keras way: a one-axis device mesh; variables replicated,
                # fit() splits each global batch along it, and XLA all-reduces the gradients
                # (batch norms are made per replica in build_densenet121).
                keras.distribution.set_distribution(
                    keras.distribution.DataParallel(devices=_replica_devices(run)))
            else:
                # One replica per device, each on its share of the global batch, gradients
                # all-reduced; variables made in its scope are mirrored on every device.
                self.strategy = _backend_module().distribute.MirroredStrategy(_replica_devices(run))
        with self._placement():
            self.model = build_densenet121(run.input_shape, spec.num_classes, self.data_format,
                                           run.devices if BACKEND == "jax" else 1)
            self.model.compile(optimizer=_adam(run.learning_rate),
                               loss=keras.losses.BinaryCrossentropy(from_logits=True),  # mean over labels and batch
                               jit_compile=jit_compile)
        if self.strategy is not None:
            # Keras builds a compiled loss from the shapes of the first batch it sees, which
            # values split over replicas do not have: build it from one plain example first.
            example = np.zeros((1,) + _image_shape(run.input_shape, self.data_format), np.float32)
            self.model.compute_loss(x=example, y=np.zeros((1, spec.num_classes), np.float32),
                                    y_pred=self.model(example))
        self._last_loss: float | None = None

    def _placement(self) -> contextlib.AbstractContextManager:
        """Where variables and steps live: the strategy's replicas, or the one device (with
        keras.distribution, the distribution places both)."""
        return self.strategy.scope() if self.strategy is not None else _device_scope(self.device)

    def _per_replica(self, batch: np.ndarray):
        """A global batch as TensorFlow's per-replica values, replica r taking the r-th slice,
        copied to its device (given a plain array, every replica would run the whole batch)."""
        if self.strategy is None:
            return batch
        tf = _backend_module()
        devices = self.strategy.extended.worker_devices
        shards = []
        for device, shard in zip(devices, np.array_split(np.asarray(batch), len(devices))):
            with tf.device(device):
                shards.append(tf.constant(shard))
        return self.strategy.experimental_distribute_values_from_function(
            lambda context: shards[context.replica_id_in_sync_group])

    def parameter_count(self) -> int:
        return _parameter_count(self.model)

    def train_steps(self, batches: Iterable[Batch] | ChestXrayBatches, steps: int) -> None:
        with self._placement():
            # fit() splits each global batch over the replicas; each replica's loss is scaled by
            # 1 / replicas before the gradients' all-reduce (a sum), so a step is the global
            # batch's mean.
            self._last_loss = _fit(self.model, batches, steps, self.held)

    def loss(self) -> float:
        return _read_loss(self.model, self._last_loss, self.on_gpu)

    def predict(self, images: np.ndarray) -> np.ndarray:
        with self._placement():
            # Inference mode (batch norm on its moving statistics); the replicas' outputs
            # come back concatenated in order. The sigmoid in float32, as the loss's.
            logits = np.asarray(self.model.predict_on_batch(self._per_replica(images)), dtype=np.float32)
        return _sigmoid(logits)

    def input_pipeline(self, files: ImageFiles, stored_size: int, batch_size: int, training: bool,
                       seed: int) -> ChestXrayBatches:
        return ChestXrayBatches(files, stored_size, self.crop_size, batch_size, training, seed, self.data_format,
                                self.loader_workers)


TASKS = {"cnn_cifar10": CnnCifar10, "resnet50_inference": Resnet50Inference, "gru_imdb": GruImdb,
         "densenet121_xray": Densenet121Xray}
