"""Chainer: chainer.Chain models, chainer.optimizers, a define-by-run training loop."""
from __future__ import annotations

import atexit
import ctypes
import functools
import multiprocessing
import os
import queue
from pathlib import Path
from typing import Callable

import numpy as np
import chainer
import chainer.functions as F
import chainer.links as L
from chainer.backends import cuda
# MultiprocessParallelUpdater's module: its gradient packing, and CuPy's NCCL where CuPy has it.
from chainer.training.updaters import multiprocess_parallel_updater as multiprocess_updater
from PIL import Image

from .. import precision
from .. import weights as canonical
from ..shards import LoaderStep, RankGroup, Rows, rank_share
from ..specs import (BATCH_NORM, CNN, DENSENET121, GLOROT_UNIFORM, GRU, HE_NORMAL, ONES, ORTHOGONAL, RESNET50,
                     UNIFORM, ZEROS, Init, RunOptions, TaskSpec)


def describe(run: RunOptions) -> dict:
    on_gpu = run.device == "gpu"
    return {
        "framework": "chainer",
        "framework_version": chainer.__version__,
        # Chainer's CPU convolutions are im2col + numpy matrix products: numpy's BLAS threads, per
        # process (a data-parallel run has one per replica).
        "threads": _blas_threads(),
        "interop_threads": None,  # no inter-op pool: Chainer runs one function after another
        "cuda": _cuda_version() if on_gpu else None,
        "cudnn": str(cuda.cupy.cuda.cudnn.getVersion()) if on_gpu and cuda.cudnn_enabled else None,
        "math_modes": precision.math_modes(
            run.precision, tf32_matmul=_cupy_tf32() if on_gpu else None,
            # Chainer has no TF32 switch for cuDNN: its float32 convolutions (and cuDNN's GRU) run
            # cuDNN's default math, which takes TF32 on Ampere and newer; only NVIDIA_TF32_OVERRIDE=0,
            # which the bench sets for every precision but tf32, keeps it out.
            tf32_convolutions=os.environ.get("NVIDIA_TF32_OVERRIDE") != "0" if on_gpu else None,
            loss_scaling="dynamic" if run.precision == "fp16" else None,
            autotuner=chainer.config.autotune if on_gpu else None,
            xla=False, compiler=None),
        "framework_settings": {
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


def _cupy_tf32() -> bool:
    """Whether CuPy's float32 matrix products (Chainer's dense layers) may run in TF32: CuPy's
    rule for CUPY_TF32 (configure sets it; off unless "1"), which NVIDIA_TF32_OVERRIDE=0 overrules
    in cuBLAS. CuPy has no public getter of the mode it chose."""
    return os.environ.get("CUPY_TF32", "0") != "0" and os.environ.get("NVIDIA_TF32_OVERRIDE") != "0"


def _cuda_version() -> str:
    version = cuda.cupy.cuda.runtime.runtimeGetVersion()  # 12080 -> "12.8"
    return f"{version // 1000}.{version % 1000 // 10}"


def _seed(device: str, seed: int) -> None:
    np.random.seed(seed)  # Chainer's CPU randomness (initializers, dropout masks) is numpy's
    if device == "gpu":
        cuda.cupy.random.seed(seed)


def configure(run: RunOptions) -> None:
    _seed(run.device, run.seed)
    # bench.environment.limit_threads set OPENBLAS_NUM_THREADS before numpy loaded; say it again.
    set_num_threads, threads = _openblas("set_num_threads"), _threads_per_process(run)
    if threads and set_num_threads:
        set_num_threads(threads)
    # Argument type checks on every function call are a debugging aid; they cost Python time.
    chainer.global_config.type_check = False
    if run.device == "gpu":
        # cuDNN for convolutions, pooling, batch norm and the GRU, and its autotuner picks the
        # fastest convolution algorithm for fixed shapes.
        chainer.global_config.use_cudnn = "always"
        chainer.global_config.autotune = True
        # TF32 for CuPy's float32 matrix products with tf32 only; CuPy reads it at the first one.
        os.environ["CUPY_TF32"] = "1" if run.precision == "tf32" else "0"
    if precision.is_mixed(run.precision):
        # mixed16, before any model is built: links create float16 weights (batch norm float32
        # ones) and compute in float16; the optimizers keep float32 copies (_setup_optimizer).
        chainer.global_config.dtype = chainer.mixed16


def _threads_per_process(run: RunOptions) -> int | None:
    """run.threads; a data-parallel run has one process per replica, which share the threads."""
    if run.devices == 1:
        return run.threads
    return max(1, (run.threads or _blas_threads() or os.cpu_count()) // run.devices)


def device_memory_peak(run: RunOptions) -> int | None:
    # CuPy's memory pool reports what it holds now, no peak: NVML measures the cell.
    return None


def gemm(size: int, run: RunOptions) -> Callable[[], None]:
    """A function computing one product of two ``size`` x ``size`` matrices with the framework's
    own matrix multiply, returning once the device has finished (bench/ceiling.py). The two
    matrices are made once, here: seeded standard-normal values on the cell's device, in the
    precision's compute dtype."""
    device = _chainer_device(run.device)
    _seed(run.device, run.seed)
    normal = chainer.initializers.Normal(scale=1.0)  # drawn by numpy, or by CuPy on the GPU
    a, b = (chainer.initializers.generate_array(normal, (size, size), device.xp,
                                                dtype=precision.COMPUTE_DTYPES[run.precision], device=device)
            for _ in range(2))

    def product() -> None:
        with chainer.no_backprop_mode():  # no graph kept for a backward pass
            F.matmul(a, b)
        _synchronize(device)
    return product


def _chainer_device(device: str, index: int = 0) -> chainer.backend.Device:
    return chainer.get_device(f"@cupy:{index}" if device == "gpu" else "@numpy")


def _trainable_parameters(model: chainer.Link) -> int:
    return sum(p.size for p in model.params() if p.update_rule is None or p.update_rule.enabled)


def _synchronize(device: chainer.backend.Device) -> None:
    if device.xp is not np:
        device.device.synchronize()


def _setup_optimizer(optimizer: chainer.Optimizer, model: chainer.Link, run: RunOptions) -> chainer.Optimizer:
    """The optimizer on the model. With fp16 (mixed16's float16 weights) it updates float32 master
    copies of them, its state float32 too (use_fp32_update), and scales the loss dynamically: it
    skips the update when the gradients overflowed, checking them parameter by parameter (a wait
    for the device each), and adapts the scale (loss_scaling)."""
    optimizer.setup(model)
    if run.precision == "fp16":
        optimizer.use_fp32_update()
        optimizer.loss_scaling()
    return optimizer


def _images(device: chainer.backend.Device, images: np.ndarray):
    """A batch of images on the device in the dtype the layers compute in: float16 under mixed16
    (chainer.get_dtype()), float32 otherwise (no copy).

    Every host batch goes to a GPU through device.send, that is cupy.asarray, which stages it in
    pinned memory and copies it asynchronously on the current stream, the one that computes: the
    host does not wait, and the kernels that read the batch queue behind its copy. A separate copy
    stream (to_gpu's deprecated stream argument) would overlap the copy with compute, but CuPy's
    memory pool, which keeps freed blocks per stream and has no record_stream, could then hand a
    batch still being read to the next copy."""
    return device.send(images).astype(chainer.get_dtype(), copy=False)


def _float32(outputs: chainer.Variable) -> chainer.Variable:
    """Logits or features as float32: under mixed16 they leave a float16 layer, and the loss, the
    sigmoid and the arrays predict returns stay in float32 (F.cast: differentiable)."""
    return outputs if outputs.dtype == np.float32 else F.cast(outputs, np.float32)


# The specs' initialisers as Chainer's, whose fans are the specs' (PyTorch's (out, in, kh, kw)).
_INITIALIZERS = {
    ZEROS: lambda init: chainer.initializers.Zero(),
    ONES: lambda init: chainer.initializers.One(),
    UNIFORM: lambda init: chainer.initializers.Uniform(scale=init.limit),
    GLOROT_UNIFORM: lambda init: chainer.initializers.GlorotUniform(),
    HE_NORMAL: lambda init: chainer.initializers.HeNormal(fan_option=init.fan),  # not truncated
    ORTHOGONAL: lambda init: chainer.initializers.Orthogonal(scale=1.0),  # Chainer's default gain is 1.1
}


def _initializer(init: Init) -> chainer.Initializer:
    return _INITIALIZERS[init.kind](init)


def _conv(channels: int, filters: int, ksize: int, init: Init, stride: int = 1, pad: int = 0) -> L.Convolution2D:
    """A convolution without bias (batch norm follows)."""
    return L.Convolution2D(channels, filters, ksize, stride=stride, pad=pad, nobias=True,
                           initialW=_initializer(init))


def _batch_norm(channels: int) -> L.BatchNormalization:
    # Chainer's decay is the weight of the old average (its default epsilon, 2e-5, is not the task's).
    return L.BatchNormalization(channels, eps=BATCH_NORM.epsilon, decay=BATCH_NORM.decay,
                                initial_gamma=_initializer(BATCH_NORM.scale_init),
                                initial_beta=_initializer(BATCH_NORM.shift_init))


def _max_pool(x: chainer.Variable) -> chainer.Variable:
    # cover_all=False: PyTorch's output size (Chainer's default, True, can add a row and column).
    return F.max_pooling_2d(x, 3, stride=2, pad=1, cover_all=False)


def _global_average_pool(x: chainer.Variable) -> chainer.Variable:
    return F.mean(x, axis=(2, 3))


class Stack(chainer.ChainList):
    """Links applied in turn. chainer.Sequential would be the idiom, but Chainer 7.8.1's
    Sequential.insert registers every link appended after the second at position 1, so the
    parameter order differs from the call order and addgrads/copyparams between two copies
    pair the wrong layers (they index the call order, iterate the registration order)."""

    def forward(self, x: chainer.Variable) -> chainer.Variable:
        for link in self:
            x = link(x)
        return x


def _cnn_layer_initializers() -> dict:
    return dict(initialW=_initializer(CNN.kernel_init), initial_bias=_initializer(CNN.bias_init))


class ConvPair(chainer.Chain):
    """conv + ReLU, conv, 2×2 max pooling, ReLU, dropout."""

    def __init__(self, channels: int, filters: tuple[int, int]):
        super().__init__()
        same, initializers = CNN.kernel_size // 2, _cnn_layer_initializers()  # the padding that keeps the size
        with self.init_scope():
            self.conv1 = L.Convolution2D(channels, filters[0], CNN.kernel_size, pad=same, **initializers)
            self.conv2 = L.Convolution2D(filters[0], filters[1], CNN.kernel_size, pad=same, **initializers)

    def forward(self, x: chainer.Variable) -> chainer.Variable:
        h = F.relu(self.conv1(x))
        return F.dropout(F.relu(F.max_pooling_2d(self.conv2(h), 2)), CNN.conv_dropout)


class CnnCifar10Net(chainer.Chain):
    def __init__(self, spec: TaskSpec):
        super().__init__()
        channels = spec.input_shape[0]
        pairs = []
        for filters in CNN.filters:
            pairs.append(ConvPair(channels, filters))
            channels = filters[-1]
        height, width = (size // 2 ** len(CNN.filters) for size in spec.input_shape[1:])  # pooled once per pair
        initializers = _cnn_layer_initializers()
        with self.init_scope():
            self.features = Stack(*pairs)
            # Input sizes given: every parameter exists now, none is initialised lazily.
            self.fc1 = L.Linear(channels * height * width, CNN.dense_units, **initializers)
            self.fc2 = L.Linear(CNN.dense_units, spec.num_classes, **initializers)

    def forward(self, x: chainer.Variable) -> chainer.Variable:
        h = self.features(x)
        h = F.dropout(F.relu(self.fc1(h)), CNN.dense_dropout)  # L.Linear flattens (N, C, H, W) to (N, C*H*W)
        return self.fc2(h)  # logits: softmax lives in the loss


class _SoftmaxClassifier:
    """The CNN and the GRU: one Chain trained batch by batch with softmax cross-entropy on
    logits, define-by-run. Each task turns a numpy batch into the model's input on the device
    (_inputs)."""
    parameter_note = None

    def __init__(self, run: RunOptions, model: chainer.Chain, optimizer: chainer.Optimizer):
        self.device = _chainer_device(run.device)
        self.device.use()
        self.model = model
        self.model.to_device(self.device)
        self.optimizer = _setup_optimizer(optimizer, self.model, run)
        self._last_loss = None

    def parameter_count(self) -> int:
        return _trainable_parameters(self.model)

    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        # The numpy batch is copied to the device here, inside the timed step.
        x, t = self._inputs(inputs), self.device.send(labels)
        with chainer.using_config("train", True):
            # StandardUpdater's step: clear the gradients, backpropagate from the loss (scaled
            # with fp16), update.
            self.optimizer.update(self._loss, x, t)

    def _loss(self, x, t) -> chainer.Variable:
        loss = F.softmax_cross_entropy(_float32(self.model(x)), t)
        self._last_loss = loss.array
        return loss

    def loss(self) -> float:
        """The last step's loss, after the device has finished all queued work."""
        _synchronize(self.device)
        return float(self._last_loss)

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        with chainer.using_config("train", False), chainer.no_backprop_mode():  # dropout off
            return cuda.to_cpu(_float32(self.model(self._inputs(inputs))).array)


class CnnCifar10(_SoftmaxClassifier):
    # NCHW: Chainer's only layout, on the CPU and for cuDNN alike.
    layout = "NCHW"

    def __init__(self, spec: TaskSpec, run: RunOptions):
        _seed(run.device, run.seed)
        super().__init__(run, CnnCifar10Net(spec),
                         chainer.optimizers.MomentumSGD(lr=spec.learning_rate, momentum=spec.momentum))

    def _inputs(self, images: np.ndarray):
        return _images(self.device, images)


class Bottleneck(chainer.Chain):
    """ResNet v1.5 bottleneck: the stride sits on the 3×3 convolution; no convolution biases."""

    def __init__(self, channels: int, width: int, stride: int):
        super().__init__()
        out = width * RESNET50.expansion
        projected = stride != 1 or channels != out
        if not projected:
            self.downsample = None
        with self.init_scope():
            self.conv1, self.bn1 = _conv(channels, width, 1, RESNET50.conv_init), _batch_norm(width)
            self.conv2 = _conv(width, width, 3, RESNET50.conv_init, stride=stride, pad=1)
            self.bn2 = _batch_norm(width)
            self.conv3, self.bn3 = _conv(width, out, 1, RESNET50.conv_init), _batch_norm(out)
            if projected:
                self.downsample = Stack(_conv(channels, out, 1, RESNET50.conv_init, stride=stride), _batch_norm(out))

    def forward(self, x: chainer.Variable) -> chainer.Variable:
        shortcut = x if self.downsample is None else self.downsample(x)
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return F.relu(self.bn3(self.conv3(h)) + shortcut)


class Resnet50(chainer.Chain):
    """ResNet-50 v1.5 up to global average pooling, with torchvision's attribute names (the
    canonical weights file's): chainer.links.ResNet50Layers is v1, the stride on the 1×1."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv1 = _conv(3, RESNET50.stem, 7, RESNET50.conv_init, stride=2, pad=3)
            self.bn1 = _batch_norm(RESNET50.stem)
            channels = RESNET50.stem
            for stage, (width, blocks) in enumerate(RESNET50.stages, start=1):
                stride = 1 if stage == 1 else 2
                layers = []
                for block in range(blocks):
                    layers.append(Bottleneck(channels, width, stride if block == 0 else 1))
                    channels = width * RESNET50.expansion
                setattr(self, f"layer{stage}", Stack(*layers))

    def forward(self, x: chainer.Variable) -> chainer.Variable:
        h = _max_pool(F.relu(self.bn1(self.conv1(x))))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return _global_average_pool(h)


# torchvision's batch-norm names -> Chainer's (scale and shift are parameters, the running
# statistics persistent values); convolution kernels are O×I×kH×kW in both.
_CHAINER_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "avg_mean", "running_var": "avg_var"}


def _load_canonical(model: chainer.Chain, arrays: dict) -> None:
    """Copy the canonical file's arrays into the model, walking torchvision's dotted names
    (``layer1.0.downsample.0.weight``) down the same attribute and index path."""
    for name, value in arrays.items():
        *path, field = name.split(".")
        link = model
        for part in path:
            link = link[int(part)] if part.isdigit() else getattr(link, part)
        if isinstance(link, L.Convolution2D):
            target = link.W.array
        else:
            target = getattr(link, _CHAINER_NAMES[field])
            target = target.array if isinstance(target, chainer.Variable) else target
        if target.shape != value.shape:
            raise ValueError(f"{name}: shape {value.shape}, the model has {target.shape}")
        target[...] = value


class Resnet50Inference:
    parameter_note = None

    def __init__(self, spec: TaskSpec, run: RunOptions):
        _seed(run.device, run.seed)
        self.device = _chainer_device(run.device)
        self.device.use()
        self.layout = "NCHW"  # Chainer's only layout
        self.model = Resnet50()
        if run.weights:
            _load_canonical(self.model, canonical.load(run.weights, canonical.resnet50_shapes()))
        self.model.to_device(self.device)

    def parameter_count(self) -> int:
        return _trainable_parameters(self.model)

    def predict(self, images: np.ndarray) -> np.ndarray:
        # train=False: batch norm uses its running statistics; no graph is kept.
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            return cuda.to_cpu(_float32(self.model(_images(self.device, images))).array)  # waits for the device


def _initialize_gates(gru: L.NStepGRU) -> None:
    """The specs' kernels are drawn over the gates' matrices stacked, (gates × units, inputs);
    NStepGRU keeps one matrix per gate, the input side's (ws[0][:3]) then the recurrent side's."""
    weights = gru.ws[0]
    for gates, init in ((weights[:GRU.gates], GRU.input_kernel_init), (weights[GRU.gates:], GRU.recurrent_kernel_init)):
        stacked = np.empty((GRU.gates * GRU.units, gates[0].shape[1]), dtype=np.float32)
        _initializer(init)(stacked)
        for weight, matrix in zip(gates, np.split(stacked, GRU.gates)):
            weight.array[...] = matrix  # float16 under mixed16


class GruImdbNet(chainer.Chain):
    def __init__(self, spec: TaskSpec):
        super().__init__()
        with self.init_scope():
            self.embed = L.EmbedID(spec.vocabulary, GRU.embedding, initialW=_initializer(GRU.embedding_init))
            # cuDNN's GRU (and its convention off the GPU too): six weight matrices and six bias
            # vectors, two per gate, the reset gate applied after the recurrent matmul.
            self.gru = L.NStepGRU(1, GRU.embedding, GRU.units, dropout=0.0,
                                  initial_bias=_initializer(GRU.bias_init))
            self.fc = L.Linear(GRU.units, spec.num_classes, initialW=_initializer(GRU.dense_kernel_init),
                               initial_bias=_initializer(GRU.dense_bias_init))
        _initialize_gates(self.gru)

    def forward(self, ids: chainer.Variable) -> chainer.Variable:
        # NStepGRU takes a list of (T, embedding) sequences, one per review, and runs time-major
        # inside (cuDNN on the GPU). With one unidirectional layer, the final hidden state
        # hy[-1] is the last time step's output: it saves slicing the 150-step outputs ys.
        sequences = F.separate(self.embed(ids), axis=0)
        hy, _ = self.gru(None, sequences)
        return self.fc(hy[-1])  # logits: softmax lives in the loss


class GruImdb(_SoftmaxClassifier):
    # Batch-major token ids, as NStepGRU consumes its list of sequences.
    layout = "NTC"

    def __init__(self, spec: TaskSpec, run: RunOptions):
        _seed(run.device, run.seed)
        super().__init__(run, GruImdbNet(spec),
                         chainer.optimizers.Adam(alpha=run.learning_rate, beta1=0.9, beta2=0.999, eps=1e-8))

    def _inputs(self, ids: np.ndarray):
        return self.device.send(ids)  # token ids: integers whatever the precision


class DenseLayer(chainer.Chain):
    """BN-ReLU-conv 1×1 (bottleneck × growth) then BN-ReLU-conv 3×3 (growth), concatenated to the input."""

    def __init__(self, channels: int):
        super().__init__()
        width = DENSENET121.bottleneck_width
        with self.init_scope():
            self.norm1, self.conv1 = _batch_norm(channels), _conv(channels, width, 1, DENSENET121.conv_init)
            self.norm2 = _batch_norm(width)
            self.conv2 = _conv(width, DENSENET121.growth, 3, DENSENET121.conv_init, pad=1)

    def forward(self, x: chainer.Variable) -> chainer.Variable:
        h = self.conv1(F.relu(self.norm1(x)))
        h = self.conv2(F.relu(self.norm2(h)))
        return F.concat((x, h), axis=1)


class Transition(chainer.Chain):
    """BN-ReLU-conv 1×1 to compression × the channels, then 2×2 average pooling."""

    def __init__(self, channels: int, out: int):
        super().__init__()
        with self.init_scope():
            self.norm, self.conv = _batch_norm(channels), _conv(channels, out, 1, DENSENET121.conv_init)

    def forward(self, x: chainer.Variable) -> chainer.Variable:
        return F.average_pooling_2d(self.conv(F.relu(self.norm(x))), 2, stride=2)


class Densenet121(chainer.Chain):
    """torchvision's DenseNet-121 with a ``classes``-output head."""

    def __init__(self, classes: int):
        super().__init__()
        channels = DENSENET121.stem
        features = []
        for index, layers in enumerate(DENSENET121.blocks):
            for _ in range(layers):
                features.append(DenseLayer(channels))
                channels += DENSENET121.growth
            if index != len(DENSENET121.blocks) - 1:
                out = int(channels * DENSENET121.compression)
                features.append(Transition(channels, out))
                channels = out
        with self.init_scope():
            self.conv0 = _conv(3, DENSENET121.stem, 7, DENSENET121.conv_init, stride=2, pad=3)
            self.norm0 = _batch_norm(DENSENET121.stem)
            self.features = Stack(*features)
            self.norm5 = _batch_norm(channels)
            self.classifier = L.Linear(channels, classes, initialW=_initializer(DENSENET121.dense_kernel_init),
                                       initial_bias=_initializer(DENSENET121.dense_bias_init))

    def forward(self, x: chainer.Variable) -> chainer.Variable:
        h = _max_pool(F.relu(self.norm0(self.conv0(x))))
        h = F.relu(self.norm5(self.features(h)))
        return self.classifier(_global_average_pool(h))  # logits: the sigmoid lives in the loss


class XrayImages(chainer.dataset.DatasetMixin):
    """PNG files as (float32 CHW image in [0, 1], float32 multi-hot labels): read as RGB,
    resized to the stored size, then randomly cropped and flipped (training) or centre-cropped."""

    def __init__(self, files, stored_size: int, crop_size: int, training: bool, seed: int):
        self.paths, self.labels = files.paths, files.labels
        self.stored_size, self.crop_size = stored_size, crop_size
        self.training, self.seed = training, seed

    def __len__(self) -> int:
        return len(self.paths)

    def get_example(self, index: int):
        with Image.open(self.paths[index]) as image:
            image = image.convert("RGB")  # grayscale and RGBA X-rays alike
        size = (self.stored_size, self.stored_size)
        if image.size != size:
            image = image.resize(size, Image.BILINEAR)
        margin = self.stored_size - self.crop_size
        if self.training:
            # One generator per (epoch seed, example): the same crops whichever loader thread
            # reads the example.
            rng = np.random.default_rng([self.seed, index])
            left, top = (int(offset) for offset in rng.integers(0, margin + 1, size=2))
            flip = bool(rng.random() < 0.5)
        else:
            left = top = margin // 2
            flip = False
        image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
        return np.ascontiguousarray(pixels), self.labels[index]


# How long a rank waits for the others in the gradients' all-reduce, or for a reply, before failing.
_COLLECTIVE_TIMEOUT_S = 600


class NcclMean:
    """Gradients averaged over the GPUs as MultiprocessParallelUpdater exchanges them: packed into
    one float32 buffer (gather_grads), summed by NCCL's all-reduce on the stream that computed
    them, divided and unpacked (scatter_grads)."""

    def __init__(self, devices: int, comm_id: tuple, rank: int):
        self.devices = devices
        self.communicator = multiprocess_updater.nccl.NcclCommunicator(devices, comm_id, rank)

    def __call__(self, model: chainer.Link) -> None:
        packed = multiprocess_updater.gather_grads(model)  # float32 whatever the parameters' type
        nccl = multiprocess_updater.nccl
        self.communicator.allReduce(packed.data.ptr, packed.data.ptr, packed.size, nccl.NCCL_FLOAT, nccl.NCCL_SUM,
                                    cuda.Stream.null.ptr)
        packed /= self.devices
        multiprocess_updater.scatter_grads(model, packed)


class SharedMemoryMean:
    """Gradients averaged over CPU processes: each rank packs its gradients into its row of a
    shared buffer, in MultiprocessParallelUpdater's order (sorted parameter names); once every
    row is written, every rank takes the mean of the rows in the same order, so all get the
    same values."""

    def __init__(self, devices: int, rows, barrier, rank: int):
        self.rows = np.frombuffer(rows, dtype=np.float32).reshape(devices, -1)
        self.barrier, self.rank = barrier, rank

    def __call__(self, model: chainer.Link) -> None:
        params = [param for _, param in sorted(model.namedparams())]
        np.concatenate([param.grad.ravel() for param in params], out=self.rows[self.rank])
        self.barrier.wait()
        mean = self.rows.mean(axis=0)
        self.barrier.wait()  # every rank has read the rows: the next step may write them
        offset = 0
        for param in params:
            param.grad[...] = mean[offset:offset + param.size].reshape(param.shape)
            offset += param.size


def _gradient_mean(run: RunOptions, parameters: int) -> functools.partial:
    """What each rank calls with its rank to make its gradient averager (in its own process)."""
    if run.device == "gpu":
        return functools.partial(NcclMean, run.devices, multiprocess_updater.nccl.get_unique_id())
    context = multiprocessing.get_context("spawn")
    return functools.partial(SharedMemoryMean, run.devices, context.RawArray("f", run.devices * parameters),
                             context.Barrier(run.devices, timeout=_COLLECTIVE_TIMEOUT_S))


class DensenetReplica:
    """One replica of the data-parallel model on its device: rank 0 runs it in the bench's
    process, ranks 1..N-1 each in a worker process, as MultiprocessParallelUpdater and ChainerMN
    run them. Every rank starts from the same seeded weights and, with several ranks, averages
    its gradients with the others' before its Adam step (ChainerMN's multi-node optimizer), so
    the replicas stay identical. Each rank loads its own shard of every global batch: from its
    own iterator over its part of the files, or as rows of the array data it holds."""

    def __init__(self, spec: TaskSpec, run: RunOptions, rank: int):
        self.rank, self.ranks = rank, run.devices
        self.crop_size = run.input_shape[-1]
        # The run's loader workers decode a global batch: each rank's iterator has its share.
        self.loader_workers = max(1, run.loader_workers // run.devices)
        _seed(run.device, run.seed)  # the same initial weights on every rank
        self.device = _chainer_device(run.device, rank)  # GPU: rank r uses the r-th visible GPU
        self.device.use()
        self.model = Densenet121(spec.num_classes)
        self.model.to_device(self.device)
        adam = chainer.optimizers.Adam(alpha=run.learning_rate)  # already × devices
        self.optimizer = _setup_optimizer(adam, self.model, run)
        self.gradient_mean = None  # set once every rank has started
        self.last_loss = None
        self.shards: chainer.iterators.MultithreadIterator | None = None  # this epoch's
        self.next_step: LoaderStep | None = None
        self.arrays: tuple[np.ndarray, np.ndarray] | None = None  # inputs and labels the batches are rows of

    def start_epoch(self, files, stored_size: int, batch_size: int, seed: int) -> None:
        """Start this rank's iterator over its part of the epoch's files: the parts of one
        permutation the seed draws (split_dataset_n_random, as MultiprocessParallelUpdater's
        users give each device its own iterator), read in order, so that shard k of every rank
        makes up global batch k; whole shards only, so the iterator, which reads ahead, does not
        decode the part's last partial shard."""
        if self.shards is not None:
            self.shards.finalize()
        images = XrayImages(files, stored_size, self.crop_size, True, seed)
        part = chainer.datasets.split_dataset_n_random(images, self.ranks, seed=seed)[self.rank]
        shard_size = batch_size // self.ranks
        whole_shards = chainer.datasets.SubDataset(part, 0, shard_size * _steps_per_epoch(files, batch_size, self.ranks))
        self.shards = chainer.iterators.MultithreadIterator(whole_shards, shard_size, repeat=False, shuffle=False,
                                                            n_threads=self.loader_workers)
        self.next_step = LoaderStep(seed, 0)

    def train_on_next_shard(self, step: LoaderStep) -> None:
        if step != self.next_step:
            raise RuntimeError(f"rank {self.rank} is at {self.next_step} of its iterator, asked for {step}")
        self.next_step = LoaderStep(step.seed, step.step + 1)
        self.train_step(*chainer.dataset.concat_examples(self.shards.next()))

    def hold_arrays(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        self.arrays = inputs, labels

    def train_on_rows(self, batch: Rows) -> None:
        """This rank's share of a global batch of the arrays held."""
        share = rank_share(batch, self.rank, self.ranks)
        inputs, labels = self.arrays
        self.train_step(inputs[share], labels[share])

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> None:
        x = _images(self.device, images)
        t = self.device.send(np.asarray(labels).astype(np.int32))  # sigmoid_cross_entropy takes int labels
        self.model.cleargrads()
        with chainer.using_config("train", True):
            # normalize=True: the mean over every label of every image in the shard.
            loss = F.sigmoid_cross_entropy(_float32(self.model(x)), t, normalize=True)
        # Optimizer.update(lossfun) split where ChainerMN splits it, to average the gradients
        # between backward and the update; with fp16 backward scales the loss dynamically.
        loss.backward(loss_scale=self.optimizer._loss_scale)
        if self.gradient_mean:
            self.gradient_mean(self.model)
        self.optimizer.update()
        self.last_loss = loss.array

    def read_loss(self) -> float:
        """The last step's loss, after the device has finished all queued work."""
        _synchronize(self.device)
        return float(self.last_loss)


def _steps_per_epoch(files, batch_size: int, ranks: int) -> int:
    """Global batches in an epoch of a data-parallel run: the whole shards in each rank's part
    (split_dataset_n gives every rank len // ranks files)."""
    return len(files.paths) // ranks // (batch_size // ranks)


def _replica_worker(rank: int, spec: TaskSpec, run: RunOptions, gradient_mean: functools.partial,
                    commands: multiprocessing.Queue, replies: multiprocessing.Queue) -> None:
    """Rank ``rank``'s process: runs the methods rank 0 names, (method, arguments), and sends
    back what they return, until told to stop (None), or until rank 0's process has gone."""
    configure(run)  # the same settings as rank 0's, its share of the threads
    replica = DensenetReplica(spec, run, rank)
    replica.gradient_mean = gradient_mean(rank=rank)
    parent = multiprocessing.parent_process()
    while True:
        try:
            command = commands.get(timeout=1.0)
        except queue.Empty:
            if parent is None or parent.is_alive():
                continue
            break
        if command is None:
            break
        method, arguments = command
        result = getattr(replica, method)(*arguments)
        if result is not None:
            replies.put(result)


# The DenseNet instance whose worker processes are alive: one at a time.
_live_densenet: Densenet121Xray | None = None


class Densenet121Xray(RankGroup):
    parameter_note = None

    def __init__(self, spec: TaskSpec, run: RunOptions):
        global _live_densenet
        if _live_densenet is not None:  # full mode builds a fresh model per repeat
            _live_densenet.close()
        self.layout = "NCHW"
        self.devices = run.devices
        self.input_size = run.input_shape[-1]
        self.loader_workers = run.loader_workers  # the image decoding threads
        self.workers: list[multiprocessing.Process] = []
        self.commands: list[multiprocessing.Queue] = []
        self.held: tuple[np.ndarray, np.ndarray] | None = None  # the arrays every rank holds
        self.rank0 = DensenetReplica(spec, run, rank=0)
        self.model = self.rank0.model
        if run.devices > 1:
            gradient_mean = _gradient_mean(run, _trainable_parameters(self.model))
            self._start_workers(spec, run, gradient_mean)
            _live_densenet = self
            self.rank0.gradient_mean = gradient_mean(rank=0)  # NCCL: waits for every rank to join

    def _start_workers(self, spec: TaskSpec, run: RunOptions, gradient_mean: functools.partial) -> None:
        """One process per further replica, spawned: a clean interpreter, safe with CUDA."""
        context = multiprocessing.get_context("spawn")
        self.replies = context.Queue()
        for rank in range(1, run.devices):
            commands = context.Queue()
            worker = context.Process(target=_replica_worker, daemon=True, name=f"densenet-rank{rank}",
                                     args=(rank, spec, run, gradient_mean, commands, self.replies))
            worker.start()
            self.workers.append(worker)
            self.commands.append(commands)

    def close(self) -> None:
        """Stop the worker processes (a no-op with one device)."""
        global _live_densenet
        for commands in self.commands:
            commands.put(None)
        for worker in self.workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
                worker.join()
        for commands in self.commands:
            commands.close()
        self.workers, self.commands = [], []
        if _live_densenet is self:
            _live_densenet = None

    def parameter_count(self) -> int:
        return _trainable_parameters(self.model)

    def loss(self) -> float:
        """The last step's loss, averaged over the replicas once every rank has finished it."""
        losses = [self._on_every_rank("read_loss")]
        losses += [self.replies.get(timeout=_COLLECTIVE_TIMEOUT_S) for _ in self.workers]
        return float(np.mean(losses))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Label probabilities, on rank 0's replica (all replicas hold the same weights)."""
        device = self.rank0.device
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            return cuda.to_cpu(F.sigmoid(_float32(self.model(_images(device, images)))).array)

    def input_pipeline(self, files, stored_size: int, batch_size: int, training: bool, seed: int):
        """Chainer's own loading: a DatasetMixin decoding PNGs with Pillow, a MultithreadIterator
        (Pillow releases the GIL while decoding) shuffling with ``seed`` when training, and
        concat_examples stacking each batch into numpy arrays. With several ranks, training
        yields a LoaderStep per global batch, every rank decoding its own shard."""
        if training and self.workers:
            return self._loader_steps(files, stored_size, batch_size, seed)
        return self._decoded_batches(files, stored_size, batch_size, training, seed)

    def _loader_steps(self, files, stored_size: int, batch_size: int, seed: int):
        self._on_every_rank("start_epoch", files, stored_size, batch_size, seed)
        for step in range(_steps_per_epoch(files, batch_size, self.devices)):
            yield LoaderStep(seed, step), None

    def _decoded_batches(self, files, stored_size: int, batch_size: int, training: bool, seed: int):
        dataset = XrayImages(files, stored_size, self.input_size, training, seed)
        if training:
            order = dict(order_sampler=chainer.iterators.ShuffleOrderSampler(np.random.RandomState(seed)))
        else:
            order = dict(shuffle=False)
        iterator = chainer.iterators.MultithreadIterator(dataset, batch_size, repeat=False,
                                                         n_threads=self.loader_workers, **order)
        try:
            for batch in iterator:
                if training and len(batch) < batch_size:
                    break  # the last partial batch
                yield chainer.dataset.concat_examples(batch)
        finally:
            iterator.finalize()


@atexit.register
def _close_live_densenet() -> None:
    """Stop the workers cleanly when the bench exits (they are daemons: killed otherwise)."""
    if _live_densenet is not None:
        _live_densenet.close()


TASKS = {
    "cnn_cifar10": CnnCifar10,
    "resnet50_inference": Resnet50Inference,
    "gru_imdb": GruImdb,
    "densenet121_xray": Densenet121Xray,
}
