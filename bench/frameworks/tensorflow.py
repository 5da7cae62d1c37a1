"""TensorFlow: tf.keras layers, a tf.function training step with tf.GradientTape, tf.data input
pipelines and tf.distribute.MirroredStrategy for data-parallel training; mixed precision with
tf.keras's dtype policies and, for float16, its LossScaleOptimizer."""
from __future__ import annotations

import functools
import os
from typing import Callable

import numpy as np
import tensorflow as tf

from .. import precision
from .. import weights as canonical
from ..specs import (BATCH_NORM, CNN, DENSENET121, FRAMEWORK_SPECS, GLOROT_UNIFORM, GRU, HE_NORMAL, ONES, ORTHOGONAL,
                     RESNET50, UNIFORM, ZEROS, Init, RunOptions, TaskSpec, Unsupported)

# Float32 variables, layers computing in the 16-bit type; other precisions keep "float32".
DTYPE_POLICIES = {"fp16": "mixed_float16", "bf16": "mixed_bfloat16"}


def describe(run: RunOptions) -> dict:
    build = tf.sysconfig.get_build_info()
    on_gpu = run.device == "gpu"
    # One switch for matrix products and convolutions alike.
    tf32 = tf.config.experimental.tensor_float_32_execution_enabled() if on_gpu else None
    return {
        "framework": "tensorflow",
        "framework_version": tf.__version__,
        # 0 means "let TensorFlow choose" (one thread per core).
        "threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "interop_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "cuda": build.get("cuda_version") if on_gpu else None,
        "cudnn": build.get("cudnn_version") if on_gpu else None,
        "math_modes": precision.math_modes(
            run.precision, tf32_matmul=tf32, tf32_convolutions=tf32,
            loss_scaling="dynamic" if tf.keras.mixed_precision.global_policy().name == "mixed_float16" else None,
            # TensorFlow autotunes cuDNN convolutions unless TF_CUDNN_USE_AUTOTUNE=0.
            autotuner=os.environ.get("TF_CUDNN_USE_AUTOTUNE", "1").lower() not in ("0", "false") if on_gpu else None,
            # By default the tf.functions are not jit-compiled: XLA only runs them if auto-clustering is on.
            xla=bool(_jit_compile(run) or tf.config.optimizer.get_jit()),
            compiler=FRAMEWORK_SPECS["tensorflow"].compiler if _jit_compile(run) else None),
        "framework_settings": {
            "keras_version": tf.keras.__version__,
            # The devices TensorFlow sees: logical CPU devices, one per replica of a data-parallel
            # CPU cell (configure() makes them), or the visible GPUs.
            "devices": [device.name for device in tf.config.list_logical_devices("GPU" if on_gpu else "CPU")],
        },
    }


def configure(run: RunOptions) -> None:
    # Device and thread options only apply before TensorFlow initialises its runtime.
    if run.device == "gpu":
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        # Steps are queued, not waited for: a train_step returns once its batch's host-to-device
        # copy and its step are queued, so the host prepares the next batch while the device
        # works (reading a loss or outputs back waits). CPUs copy nothing: they stay synchronous.
        tf.config.experimental.set_synchronous_execution(False)
    else:
        tf.config.set_visible_devices([], "GPU")
        if run.devices > 1:
            # A data-parallel CPU cell: split the host CPU into logical devices, one per replica
            # (they share the process's thread pools). keras.py does the same: the framework
            # modules share no code, so each stays readable on its own.
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(run.devices)])
    if run.threads:
        tf.config.threading.set_intra_op_parallelism_threads(run.threads)
        tf.config.threading.set_inter_op_parallelism_threads(run.threads)
    # TensorFlow runs float32 matrix products and convolutions in TF32 on Ampere and newer
    # unless told otherwise: only tf32 cells do; fp32, and the float32 parts of fp16 and bf16,
    # stay in full float32.
    tf.config.experimental.enable_tensor_float_32_execution(run.precision == "tf32")
    # Every layer built from now on keeps float32 variables and computes in the policy's dtype.
    tf.keras.mixed_precision.set_global_policy(DTYPE_POLICIES.get(run.precision, "float32"))
    tf.keras.utils.set_random_seed(run.seed)


def device_memory_peak(run: RunOptions) -> int | None:
    """The allocator's peak on the busiest of the cell's GPUs; None on CPU."""
    if run.device != "gpu":
        return None
    return max(tf.config.experimental.get_memory_info(f"GPU:{index}")["peak"] for index in range(run.devices))


def gemm(size: int, run: RunOptions) -> Callable[[], None]:
    """A function computing one product of two ``size`` x ``size`` matrices with the framework's
    own matrix multiply, returning once the device has finished (bench/ceiling.py). The two
    matrices are made once, here: seeded standard-normal values on the cell's device, in the
    precision's compute dtype."""
    device = _tf_device(run.device)
    with tf.device(device):
        generator = tf.random.Generator.from_seed(run.seed)
        a, b = (generator.normal((size, size), dtype=precision.COMPUTE_DTYPES[run.precision]) for _ in range(2))
    multiply = tf.function(tf.linalg.matmul, jit_compile=_jit_compile(run))

    def product() -> None:
        with tf.device(device):
            multiply(a, b)
        if run.device == "gpu":  # GPU steps are queued (configure()); CPU ones return when done
            tf.test.experimental.sync_devices()
    return product


def _jit_compile(run: RunOptions) -> bool | None:
    """The tf.functions' jit_compile: True in the compiled profile (XLA compiles each function
    whole); None by default, TensorFlow's own choice: XLA only where auto-clustering is on."""
    return True if run.compile == "compiled" else None


def _tf_device(device: str) -> str:
    return "/GPU:0" if device == "gpu" else "/CPU:0"


def _replica_devices(run: RunOptions) -> list:
    """The logical devices a data-parallel run mirrors over: the first run.devices GPUs, or the
    CPU's logical devices that configure() made."""
    kind = "GPU" if run.device == "gpu" else "CPU"
    devices = tf.config.list_logical_devices(kind)
    if len(devices) < run.devices:
        raise Unsupported(f"{run.devices} {kind} devices asked for, {len(devices)} visible to TensorFlow")
    return devices[:run.devices]


def _layout(device: str) -> str:
    # NCHW for cuDNN; TensorFlow's CPU convolutions (oneDNN) only take NHWC.
    return "NCHW" if device == "gpu" else "NHWC"


def _data_format(layout: str) -> str:
    return "channels_first" if layout == "NCHW" else "channels_last"


def _image_shape(input_shape: tuple, data_format: str) -> tuple:
    """One example's shape in the data format, from the channel-first (C, H, W)."""
    channels, height, width = input_shape
    return (channels, height, width) if data_format == "channels_first" else (height, width, channels)


def _parameter_count(model: tf.keras.Model) -> int:
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


def _initializer(init: Init) -> tf.keras.initializers.Initializer:
    """A specs initialiser as a new Keras initializer, one per weight: a Keras initializer made
    without a seed fixes one at creation, so a shared one would give every weight the same draw.
    Keras computes fans from its kernel shapes (kh, kw, in, out) and (in, out) as PyTorch does."""
    if init.kind == ZEROS:
        return tf.keras.initializers.Zeros()
    if init.kind == ONES:
        return tf.keras.initializers.Ones()
    if init.kind == UNIFORM:
        return tf.keras.initializers.RandomUniform(-init.limit, init.limit)
    if init.kind == GLOROT_UNIFORM:
        return tf.keras.initializers.GlorotUniform()
    if init.kind == HE_NORMAL:  # tf.keras.initializers.HeNormal is truncated: not the task's
        return tf.keras.initializers.VarianceScaling(2.0, mode=init.fan, distribution="untruncated_normal")
    if init.kind == ORTHOGONAL:
        return tf.keras.initializers.Orthogonal()
    raise ValueError(f"no Keras initializer for {init.kind!r}")


def _reinitialise(variable: tf.Variable, init: Init) -> None:
    variable.assign(_initializer(init)(variable.shape, variable.dtype))


def _loss_and_gradients(model: tf.keras.Model, optimizer: tf.keras.optimizers.Optimizer, loss_fn: Callable,
                        inputs: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """Forward in training mode and gradients with tf.GradientTape: the loss and the gradients."""
    with tf.GradientTape() as tape:
        # Keras losses compute in float32 whatever the dtype of the outputs.
        loss = loss_fn(labels, model(inputs, training=True))
        # A LossScaleOptimizer (fp16) multiplies by its dynamic scale; other optimizers return
        # the loss as it is.
        scaled_loss = optimizer.scale_loss(loss)
    return loss, tape.gradient(scaled_loss, model.trainable_variables)


def _optimiser_step(model: tf.keras.Model, optimizer: tf.keras.optimizers.Optimizer, loss_and_gradients: Callable,
                    inputs: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """``loss_and_gradients`` (_loss_and_gradients with the model, optimizer and loss given), then
    one update; the loss."""
    loss, gradients = loss_and_gradients(inputs, labels)
    # A LossScaleOptimizer unscales the gradients, and skips the step (halving its scale) when
    # they overflowed.
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    return loss


def _with_loss_scaling(optimizer: tf.keras.optimizers.Optimizer) -> tf.keras.optimizers.Optimizer:
    """Under the mixed_float16 policy, the optimizer wrapped in a LossScaleOptimizer: dynamic
    loss scaling keeps small float16 gradients from flushing to zero. Otherwise the optimizer."""
    if tf.keras.mixed_precision.global_policy().name == "mixed_float16":
        return tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def _float32(outputs: tf.Tensor) -> tf.Tensor:
    """Model outputs (float16 or bfloat16 under a mixed policy) as float32."""
    return tf.cast(outputs, tf.float32)


def _adam(learning_rate: float) -> tf.keras.optimizers.Adam:
    # PyTorch's epsilon (Keras's default is 1e-7).
    return tf.keras.optimizers.Adam(learning_rate=learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-8)


def _read_loss(loss: tf.Tensor, on_gpu: bool) -> float:
    """A loss tensor as a float, after the device has finished all queued work."""
    if on_gpu:
        tf.test.experimental.sync_devices()
    return float(loss.numpy())


def build_cnn_cifar10(spec: TaskSpec, data_format: str) -> tf.keras.Model:
    layers = tf.keras.layers

    def conv(filters: int, activation: str | None = None) -> tf.keras.layers.Conv2D:
        return layers.Conv2D(filters, CNN.kernel_size, padding="same", activation=activation, data_format=data_format,
                             kernel_initializer=_initializer(CNN.kernel_init),
                             bias_initializer=_initializer(CNN.bias_init))

    def dense(units: int, activation: str | None = None) -> tf.keras.layers.Dense:
        return layers.Dense(units, activation=activation, kernel_initializer=_initializer(CNN.kernel_init),
                            bias_initializer=_initializer(CNN.bias_init))

    stack = [tf.keras.Input(shape=_image_shape(spec.input_shape, data_format))]
    for first, second in CNN.filters:
        stack += [conv(first, "relu"), conv(second), layers.MaxPooling2D(2, data_format=data_format),
                  layers.ReLU(), layers.Dropout(CNN.conv_dropout)]
    return tf.keras.Sequential(stack + [
        layers.Flatten(data_format=data_format),
        dense(CNN.dense_units, "relu"), layers.Dropout(CNN.dense_dropout),
        dense(spec.num_classes),  # logits: softmax lives in the loss
    ])


class _SoftmaxClassifier:
    """The CNN and the GRU: one model trained batch by batch with softmax cross-entropy on
    logits, its training step and inference traced once each by tf.function (and compiled
    whole by XLA in the compiled profile)."""
    parameter_note = None

    def __init__(self, run: RunOptions, build_model: Callable[[], tf.keras.Model],
                 build_optimizer: Callable[[], tf.keras.optimizers.Optimizer], inputs: tf.TensorSpec):
        tf.keras.utils.set_random_seed(run.seed)
        self.on_gpu = run.device == "gpu"
        self.device = _tf_device(run.device)
        with tf.device(self.device):
            self.model = build_model()
            self.loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            self.optimizer = _with_loss_scaling(build_optimizer())
        signature = [inputs, tf.TensorSpec((None,), tf.int32)]
        loss_and_gradients = functools.partial(_loss_and_gradients, self.model, self.optimizer, self.loss_fn)
        self._train_step = tf.function(
            lambda x, y: _optimiser_step(self.model, self.optimizer, loss_and_gradients, x, y),
            input_signature=signature, jit_compile=_jit_compile(run))
        self._predict = tf.function(lambda x: _float32(self.model(x, training=False)), input_signature=signature[:1],
                                    jit_compile=_jit_compile(run))
        self._last_loss: tf.Tensor | None = None

    def parameter_count(self) -> int:
        return _parameter_count(self.model)

    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        with tf.device(self.device):
            # On GPUs the batch's copy to the device and the step are queued (configure()).
            self._last_loss = self._train_step(inputs, labels)

    def loss(self) -> float:
        """The last step's loss, after the device has finished all queued work."""
        return _read_loss(self._last_loss, self.on_gpu)

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        with tf.device(self.device):
            return self._predict(inputs).numpy()  # dropout off; the read-back waits for the device


class CnnCifar10(_SoftmaxClassifier):
    def __init__(self, spec: TaskSpec, run: RunOptions):
        self.layout = _layout(run.device)
        data_format = _data_format(self.layout)
        super().__init__(
            run, lambda: build_cnn_cifar10(spec, data_format),
            lambda: tf.keras.optimizers.SGD(learning_rate=spec.learning_rate, momentum=spec.momentum),
            tf.TensorSpec((None, *_image_shape(spec.input_shape, data_format)), tf.float32))


def build_resnet50(input_shape: tuple, data_format: str) -> tf.keras.Model:
    """ResNet-50 v1.5 up to global average pooling. Layers carry torchvision's names (those of
    the canonical weights file); the stride sits on each stage's first 3×3 convolution; no
    convolution biases."""
    layers = tf.keras.layers
    axis = 1 if data_format == "channels_first" else -1

    def conv(x: tf.Tensor, filters: int, size: int, stride: int, name: str) -> tf.Tensor:
        padding = "valid" if size == 1 else "same"
        if size > 1 and stride > 1:
            # "same" pads a strided convolution more at the end than at the start; PyTorch pads
            # both sides equally, so pad explicitly.
            x = layers.ZeroPadding2D(size // 2, data_format=data_format, name=name + "_pad")(x)
            padding = "valid"
        return layers.Conv2D(filters, size, strides=stride, padding=padding, use_bias=False,
                             data_format=data_format, kernel_initializer=_initializer(RESNET50.conv_init),
                             name=name)(x)

    def batch_norm(x: tf.Tensor, name: str) -> tf.Tensor:
        # Keras's momentum is the weight of the old average; its defaults (0.99, epsilon 1e-3) are not the task's.
        return layers.BatchNormalization(axis=axis, momentum=BATCH_NORM.decay, epsilon=BATCH_NORM.epsilon,
                                         gamma_initializer=_initializer(BATCH_NORM.scale_init),
                                         beta_initializer=_initializer(BATCH_NORM.shift_init), name=name)(x)

    def bottleneck(x: tf.Tensor, width: int, stride: int, name: str) -> tf.Tensor:
        out = width * RESNET50.expansion
        shortcut = x
        if stride != 1 or x.shape[axis] != out:
            shortcut = batch_norm(conv(x, out, 1, stride, name + ".downsample.0"), name + ".downsample.1")
        x = layers.ReLU()(batch_norm(conv(x, width, 1, 1, name + ".conv1"), name + ".bn1"))
        x = layers.ReLU()(batch_norm(conv(x, width, 3, stride, name + ".conv2"), name + ".bn2"))
        x = batch_norm(conv(x, out, 1, 1, name + ".conv3"), name + ".bn3")
        return layers.ReLU()(layers.Add()([x, shortcut]))

    inputs = tf.keras.Input(shape=input_shape)
    x = layers.ReLU()(batch_norm(conv(inputs, RESNET50.stem, 7, 2, "conv1"), "bn1"))
    # Zero padding equals PyTorch's -inf padding here: the inputs are ReLU outputs, >= 0.
    x = layers.ZeroPadding2D(1, data_format=data_format, name="maxpool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, data_format=data_format, name="maxpool")(x)
    for stage, (width, blocks) in enumerate(RESNET50.stages, start=1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            x = bottleneck(x, width, stride, f"layer{stage}.{block}")
    outputs = layers.GlobalAveragePooling2D(data_format=data_format)(x)
    return tf.keras.Model(inputs, outputs, name="resnet50_v1_5")


def load_resnet50(model: tf.keras.Model, path: str) -> None:
    """Canonical (torchvision-named) tensors into the layers of the same names."""
    arrays = canonical.load(path, canonical.resnet50_shapes())
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv2D):
            # O×I×kH×kW to Keras's kH×kW×I×O (the same in both data formats).
            layer.set_weights([arrays[layer.name + ".weight"].transpose(2, 3, 1, 0)])
        elif isinstance(layer, tf.keras.layers.BatchNormalization):
            # gamma, beta, moving mean, moving variance
            layer.set_weights([arrays[f"{layer.name}.{field}"]
                               for field in ("weight", "bias", "running_mean", "running_var")])


class Resnet50Inference:
    parameter_note = None

    def __init__(self, spec: TaskSpec, run: RunOptions):
        tf.keras.utils.set_random_seed(run.seed)
        self.device = _tf_device(run.device)
        self.layout = _layout(run.device)
        data_format = _data_format(self.layout)
        shape = _image_shape(run.input_shape, data_format)
        with tf.device(self.device):
            self.model = build_resnet50(shape, data_format)
        if run.weights:
            load_resnet50(self.model, run.weights)
        # Inference mode: batch norm uses its running statistics; no tape, so no gradients.
        self._predict = tf.function(lambda x: _float32(self.model(x, training=False)),
                                    input_signature=[tf.TensorSpec((None, *shape), tf.float32)],
                                    jit_compile=_jit_compile(run))

    def parameter_count(self) -> int:
        return _parameter_count(self.model)

    def predict(self, images: np.ndarray) -> np.ndarray:
        with tf.device(self.device):
            return self._predict(images).numpy()  # the copy back waits for the device


def build_gru_imdb(spec: TaskSpec) -> tf.keras.Model:
    layers = tf.keras.layers
    return tf.keras.Sequential([
        tf.keras.Input(shape=spec.input_shape, dtype="int32"),
        layers.Embedding(spec.vocabulary, GRU.embedding, embeddings_initializer=_initializer(GRU.embedding_init)),
        # Default arguments (tanh, sigmoid, reset_after=True, no dropout, no mask) are what
        # let Keras run the cuDNN kernel on a GPU; only the last step's output comes out. Keras
        # keeps the three gates' matrices stacked, so each initializer covers them all, as the task says.
        layers.GRU(GRU.units, kernel_initializer=_initializer(GRU.input_kernel_init),
                   recurrent_initializer=_initializer(GRU.recurrent_kernel_init),
                   bias_initializer=_initializer(GRU.bias_init)),
        layers.Dense(spec.num_classes, kernel_initializer=_initializer(GRU.dense_kernel_init),
                     bias_initializer=_initializer(GRU.dense_bias_init)),  # logits: softmax lives in the loss
    ])


class GruImdb(_SoftmaxClassifier):
    # Keras RNNs take batch-major input; the cuDNN kernel transposes to time-major inside.
    layout = "NTC"

    def __init__(self, spec: TaskSpec, run: RunOptions):
        super().__init__(run, lambda: build_gru_imdb(spec), lambda: _adam(run.learning_rate),
                         tf.TensorSpec((None, *spec.input_shape), tf.int32))


def build_densenet121(spec: TaskSpec, input_shape: tuple) -> tf.keras.Model:
    """Keras's zoo DenseNet-121 without its ImageNet head, global average pooling, then a dense
    layer of 14 logits; channels-last input. The zoo's network is DENSENET121's (stem, blocks,
    growth, bottleneck, compression), though its API takes none of them; its layers are
    re-initialised and its batch norms set as the task says."""
    features = tf.keras.applications.DenseNet121(weights=None, include_top=False, pooling="avg",
                                                 input_shape=input_shape)
    for layer in features.layers:
        if isinstance(layer, tf.keras.layers.Conv2D):  # the zoo's are Glorot
            _reinitialise(layer.kernel, DENSENET121.conv_init)
        elif isinstance(layer, tf.keras.layers.BatchNormalization):
            # The zoo's are momentum 0.99, epsilon 1.001e-5; both are read when the layer is called.
            layer.momentum, layer.epsilon = BATCH_NORM.decay, BATCH_NORM.epsilon
            _reinitialise(layer.gamma, BATCH_NORM.scale_init)
            _reinitialise(layer.beta, BATCH_NORM.shift_init)
    logits = tf.keras.layers.Dense(spec.num_classes, kernel_initializer=_initializer(DENSENET121.dense_kernel_init),
                                   bias_initializer=_initializer(DENSENET121.dense_bias_init),
                                   name="logits")(features.output)  # the sigmoid lives in the loss
    return tf.keras.Model(features.input, logits, name="densenet121")


class Densenet121Xray:
    parameter_note = None

    def __init__(self, spec: TaskSpec, run: RunOptions):
        tf.keras.utils.set_random_seed(run.seed)
        self.on_gpu = run.device == "gpu"
        # Keras's DenseNet refuses channels_first, so NHWC on GPUs too; there TensorFlow's graph
        # optimiser (Grappler) converts the convolutions to cuDNN's NCHW inside the tf.function.
        self.layout = "NHWC"
        self.image_size = run.input_shape[-1]
        self.loader_workers = run.loader_workers
        devices = [device.name for device in _replica_devices(run)]
        if run.devices > 1:
            # One replica per device, each normalising with its own batch's statistics (Keras's
            # batch norms are not synchronized); the replicas' gradients are summed by NCCL on
            # GPUs (by the strategy's default for CPUs there) before every replica applies the
            # same update.
            self.strategy = tf.distribute.MirroredStrategy(
                devices, cross_device_ops=tf.distribute.NcclAllReduce() if self.on_gpu else None)
        else:
            self.strategy = tf.distribute.OneDeviceStrategy(devices[0])
        shape = _image_shape(run.input_shape, "channels_last")
        with self.strategy.scope():  # variables mirrored on every replica
            self.model = build_densenet121(spec, shape)
            self.optimizer = _with_loss_scaling(_adam(run.learning_rate))
            # Its slots (and loss scale) are created here, mirrored, not lazily inside a replica's step.
            self.optimizer.build(self.model.trainable_variables)
        # Per example: the mean over the 14 labels of sigmoid cross-entropy.
        self.per_example_loss = tf.keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)
        # Each replica's forward and backward, compiled by XLA in the compiled profile. The
        # gradients' all-reduce and the update stay outside it: XLA cannot compile a step that
        # reaches every replica's variables ("Trying to access resource ... located in device
        # ...:1 from device ...:0"). One device runs the same split, so that device counts compare.
        self._loss_and_gradients = tf.function(
            functools.partial(_loss_and_gradients, self.model, self.optimizer, self._average_loss),
            jit_compile=_jit_compile(run))
        # No input signature: the batches come as the strategy distributes them (one trace a run).
        self._train_step = tf.function(self._replicated_step)
        # The sigmoid in float32, as the loss's.
        self._predict = tf.function(lambda x: tf.sigmoid(_float32(self.model(x, training=False))),
                                    input_signature=[tf.TensorSpec((None, *shape), tf.float32)],
                                    jit_compile=_jit_compile(run))
        self._last_loss: tf.Tensor | None = None

    def parameter_count(self) -> int:
        return _parameter_count(self.model)

    def _average_loss(self, labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
        # Divided by the global batch: the all-reduce sums the replicas' gradients.
        return tf.nn.compute_average_loss(self.per_example_loss(labels, logits))

    def _replicated_step(self, images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """One step on every replica's share of the global batch; the global batch's mean loss."""
        losses = self.strategy.run(
            lambda x, y: _optimiser_step(self.model, self.optimizer, self._loss_and_gradients, x, y),
            args=(images, labels))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    def train_step(self, images: np.ndarray | tf.Tensor, labels: np.ndarray | tf.Tensor) -> None:
        """A global batch of arrays, or one input_pipeline's strategy has distributed already."""
        if isinstance(images, np.ndarray):
            images, labels = self.strategy.experimental_distribute_values_from_function(
                lambda context: _replica_share(images, labels, context))
        self._last_loss = self._train_step(images, labels)

    def loss(self) -> float:
        return _read_loss(self._last_loss, self.on_gpu)

    def predict(self, images: np.ndarray | tf.Tensor) -> np.ndarray:
        # Scoring on the first replica's device: the mirrored variables read as one model.
        return self._predict(images).numpy()

    def input_pipeline(self, files, stored_size: int, batch_size: int, training: bool,
                       seed: int) -> tf.data.Dataset | tf.distribute.DistributedDataset:
        """tf.data over a bench.data.ImageFiles: decode and augment in parallel threads, batch,
        prefetch; global batches of (images, multi-hot labels). Training batches come split by the
        strategy, each replica's share prefetched onto its device; test batches as host tensors."""
        size = self.image_size
        dataset = tf.data.Dataset.from_tensor_slices((tf.constant(files.paths, tf.string), files.labels))
        if training:
            # One epoch per call, shuffled with this epoch's seed.
            dataset = dataset.shuffle(max(len(files.paths), 1), seed=seed, reshuffle_each_iteration=False)

        def load(index: tf.Tensor, example: tuple) -> tuple:
            path, label = example
            image = tf.io.decode_png(tf.io.read_file(path), channels=3)  # grey or RGBA to RGB
            image = tf.image.convert_image_dtype(image, tf.float32)  # [0, 1]
            stored = tf.reduce_all(tf.shape(image)[:2] == stored_size)
            # Bilinear, antialiased when shrinking as PIL's bilinear resize is.
            image = tf.cond(stored, lambda: image,
                            lambda: tf.image.resize(image, (stored_size, stored_size), antialias=True))
            if training:
                # Stateless ops seeded by (epoch seed, position): the same augmentation however
                # the parallel calls are scheduled.
                crop_seed, flip_seed = tf.unstack(tf.random.split(tf.stack([tf.constant(seed, tf.int64), index])))
                image = tf.image.stateless_random_crop(image, (size, size, 3), seed=crop_seed)
                image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
            else:
                offset = (stored_size - size) // 2
                image = tf.image.crop_to_bounding_box(image, offset, offset, size, size)
            return image, label

        # The loader's workers decode in parallel, in a thread pool of that size (not AUTOTUNE's choice).
        dataset = dataset.enumerate().map(load, num_parallel_calls=self.loader_workers)
        dataset = dataset.batch(batch_size, drop_remainder=training).prefetch(tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.threading.private_threadpool_size = self.loader_workers
        dataset = dataset.with_options(options)
        return self.strategy.experimental_distribute_dataset(dataset) if training else dataset


def _replica_share(images: np.ndarray, labels: np.ndarray, context: tf.distribute.experimental.ValueContext) -> tuple:
    """This replica's consecutive share of a global batch of arrays, as host tensors: the step
    copies each share to its own replica's device."""
    size = len(images) // context.num_replicas_in_sync
    start = context.replica_id_in_sync_group * size
    return tf.convert_to_tensor(images[start:start + size]), tf.convert_to_tensor(labels[start:start + size])


TASKS = {"cnn_cifar10": CnnCifar10, "resnet50_inference": Resnet50Inference, "gru_imdb": GruImdb,
         "densenet121_xray": Densenet121Xray}
