"""MXNet: Gluon HybridBlocks, hybridized, a gluon.Trainer with autograd.record; multi-context
data parallelism (split_and_load, a kvstore) and a gluon.data input pipeline."""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import re
from importlib import metadata
from typing import Callable

import numpy as np
import mxnet as mx
from mxnet import autograd, gluon
from mxnet.contrib import amp
from mxnet.gluon import nn

from .. import precision
from .. import weights as canonical
from ..specs import (BATCH_NORM, CNN, DENSENET121, FRAMEWORK_SPECS, GLOROT_UNIFORM, GRU, HE_NORMAL, ONES, ORTHOGONAL,
                     RESNET50, UNIFORM, ZEROS, Init, RunOptions, TaskSpec)

# Runtime features worth recording: the CPU kernels (oneDNN, still called MKLDNN) and the GPU stack.
_FEATURES = ("MKLDNN", "OPENMP", "CUDA", "CUDNN", "NCCL", "TENSORRT")


def describe(run: RunOptions) -> dict:
    features = mx.runtime.Features()
    on_gpu = run.device == "gpu"
    return {
        "framework": "mxnet",
        "framework_version": mx.__version__,
        "threads": _omp_threads(),
        # The engine's CPU worker threads per CPU context: how many operators run at once (each
        # with its OpenMP pool); several CPU contexts each get their own workers.
        "interop_threads": int(os.environ.get("MXNET_CPU_WORKER_NTHREADS", "1")),
        "cuda": _build_cuda_version() if on_gpu else None,
        "cudnn": _cudnn_version() if on_gpu else None,
        "math_modes": precision.math_modes(
            run.precision, tf32_matmul=_tf32_allowed() if on_gpu else None,
            tf32_convolutions=_tf32_allowed() if on_gpu else None,
            loss_scaling="dynamic" if run.precision == "fp16" else None,
            # MXNet's cuDNN autotuner: on ("1", limited workspace) unless the environment says otherwise.
            autotuner=os.environ.get("MXNET_CUDNN_AUTOTUNE_DEFAULT", "1") != "0" if on_gpu else None,
            # Every network is hybridized, in both compile profiles.
            xla=False, compiler=FRAMEWORK_SPECS["mxnet"].compiler),
        "framework_settings": {
            "features": [name for name in _FEATURES if features.is_enabled(name)],
            "hybridize": {"static_alloc": True, "static_shape": True},
            # Data-parallel tasks: one context per replica, gradients summed by this kvstore.
            "contexts": [str(ctx) for ctx in _contexts(run)],
            "kvstore": _kvstore(run) if run.devices > 1 else None,
        },
    }


def _tf32_allowed() -> bool:
    """MXNet has no TF32 switch. Built for CUDA 11, its float32 dense layers ask cuBLAS for TF32
    (CUBLAS_TF32_TENSOR_OP_MATH, whatever MXNET_CUDA_ALLOW_TENSOR_CORE says) and its cuDNN
    convolutions and RNNs run cuDNN's default math, which takes TF32 on Ampere and newer: only
    NVIDIA_TF32_OVERRIDE=0, which the bench sets for every precision but tf32, keeps them out."""
    return os.environ.get("NVIDIA_TF32_OVERRIDE") != "0"


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


def configure(run: RunOptions) -> None:
    # MXNet has no thread API: it sizes its OpenMP pool from OMP_NUM_THREADS when it loads, and
    # the bench sets that before importing it when threads are asked for. The engine keeps
    # its default of one CPU worker (MXNET_CPU_WORKER_NTHREADS), one operator at a time.
    # CPU devices need no setup either: mx.cpu(i) contexts exist for any i.
    mx.random.seed(run.seed)  # initializers and dropout masks draw from MXNet's own generator
    if precision.is_mixed(run.precision):
        # AMP, before any network is built: it wraps MXNet's operators so that convolutions, dense
        # layers and RNNs compute in float16, softmax and reductions in float32; weights stay float32.
        amp.init(target_dtype=precision.COMPUTE_DTYPES[run.precision])


def device_memory_peak(run: RunOptions) -> int | None:
    # MXNet's storage pool reports free and total memory, no peak: NVML measures the cell.
    return None


def gemm(size: int, run: RunOptions) -> Callable[[], None]:
    """A function computing one product of two ``size`` x ``size`` matrices with the framework's
    own matrix multiply, returning once the device has finished (bench/ceiling.py). The two
    matrices are made once, here: seeded standard-normal values on the cell's device, in the
    precision's compute dtype."""
    ctx = _contexts(run)[0]
    mx.random.seed(run.seed)
    a, b = (mx.nd.random.normal(shape=(size, size), ctx=ctx, dtype=precision.COMPUTE_DTYPES[run.precision])
            for _ in range(2))

    def product() -> None:
        mx.nd.dot(a, b).wait_to_read()  # the engine runs operators asynchronously
    return product


def _contexts(run: RunOptions) -> list[mx.Context]:
    """One context per replica: GPUs, or CPU contexts, each with its own engine workers."""
    device = mx.gpu if run.device == "gpu" else mx.cpu
    return [device(index) for index in range(run.devices)]


def _kvstore(run: RunOptions) -> str:
    # "nccl" all-reduces the gradients with NCCL's collectives, GPU to GPU over NVLink or PCIe;
    # "local" sums them in host memory, the CPU contexts' own. With one context the Trainer
    # makes no kvstore at all.
    return "nccl" if run.device == "gpu" else "local"


def _initializer(init: Init) -> mx.init.Initializer:
    """A specs initialiser in MXNet's terms. Gluon shapes kernels as PyTorch does, (out, in, kh,
    kw), and Xavier's fans are the specs' own: in × kh × kw and out × kh × kw."""
    if init.kind == ZEROS:
        return mx.init.Zero()
    if init.kind == ONES:
        return mx.init.One()
    if init.kind == UNIFORM:
        return mx.init.Uniform(init.limit)
    if init.kind == GLOROT_UNIFORM:  # sqrt(3 / mean fan) = sqrt(6 / (fan_in + fan_out))
        return mx.init.Xavier(rnd_type="uniform", factor_type="avg", magnitude=3)
    if init.kind == HE_NORMAL:  # an untruncated normal of std sqrt(2 / fan)
        return mx.init.Xavier(rnd_type="gaussian", factor_type=init.fan.replace("fan_", ""), magnitude=2)
    if init.kind == ORTHOGONAL:  # gain 1, not Gluon's default sqrt(2); from a normal draw, as Keras's
        return mx.init.Orthogonal(scale=1.0, rand_type="normal")
    raise ValueError("no MXNet initializer for {!r}".format(init.kind))


def _parameter_count(net: gluon.Block) -> int:
    # Batch-norm running statistics have grad_req "null": they are not trainable.
    return sum(int(np.prod(p.shape)) for p in net.collect_params().values() if p.grad_req != "null")


class MixedPrecision:
    """fp16's dynamic loss scaling, AMP's (amp.init in configure casts the layers): the loss is
    scaled before backward, and the Trainer divides the scale out of the gradients and skips the
    update when they overflowed (reading an overflow flag back: one wait for the device per
    step). With fp32 and tf32 it is off: a plain backward pass."""

    def __init__(self, run: RunOptions):
        self.loss_scaling = run.precision == "fp16"

    def trainer(self, params: gluon.ParameterDict, optimizer: str, optimizer_params: dict,
                kvstore: str | None = None) -> gluon.Trainer:
        """``kvstore``: how replicas on several contexts sum their gradients; one needs none."""
        # The overflow check comes before the update: the kvstore must not run the update itself.
        trainer = gluon.Trainer(params, optimizer, optimizer_params, kvstore=kvstore,
                                update_on_kvstore=False if self.loss_scaling else None)
        if self.loss_scaling:
            amp.init_trainer(trainer)
        return trainer

    def backward(self, losses, trainer: gluon.Trainer) -> None:
        """Inside autograd.record(), which must record the scaling too."""
        if self.loss_scaling:
            with amp.scale_loss(losses, trainer) as scaled:
                autograd.backward(scaled)
        else:
            autograd.backward(losses)


def _float32(outputs: mx.nd.NDArray) -> mx.nd.NDArray:
    """The network's outputs as float32: with fp16 they leave AMP's last float16 layer, and the
    loss, the sigmoid and the arrays predict returns stay in float32 (amp_cast: differentiable)."""
    return outputs if outputs.dtype == np.float32 else mx.nd.amp_cast(outputs, dtype="float32")


def _host(array, ctx: mx.Context, dtype: str | None = None) -> mx.nd.NDArray:
    """A numpy batch as an NDArray in host memory from which MXNet's engine copies it to ``ctx``
    asynchronously: page-locked for a GPU (a copy from pageable memory would block the step
    until it is done), ``ctx`` itself for a CPU (no copy beyond this one). A loader's batch is
    an NDArray already, page-locked by the loader for GPUs."""
    if isinstance(array, mx.nd.NDArray):
        return array
    host = mx.cpu_pinned(ctx.device_id) if ctx.device_type == "gpu" else ctx
    return mx.nd.array(array, ctx=host, dtype=dtype or array.dtype)


def _on(array: np.ndarray, ctx: mx.Context, dtype: str | None = None) -> mx.nd.NDArray:
    """A numpy batch on ``ctx``: the engine queues the copy to a GPU and returns at once."""
    batch = _host(array, ctx, dtype)
    return batch.copyto(ctx) if ctx.device_type == "gpu" else batch


def build_cnn_cifar10(spec: TaskSpec) -> nn.HybridSequential:
    channels, height, width = spec.input_shape
    initializers = dict(weight_initializer=_initializer(CNN.kernel_init), bias_initializer=_initializer(CNN.bias_init))
    # in_channels/in_units make every shape known at construction: no deferred initialisation.
    conv = dict(kernel_size=CNN.kernel_size, padding=CNN.kernel_size // 2, layout="NCHW", **initializers)
    net = nn.HybridSequential()
    for first, second in CNN.filters:
        net.add(nn.Conv2D(first, in_channels=channels, **conv), nn.Activation("relu"),
                nn.Conv2D(second, in_channels=first, **conv), nn.MaxPool2D(2), nn.Activation("relu"),
                nn.Dropout(CNN.conv_dropout))
        channels, height, width = second, height // 2, width // 2
    net.add(nn.Flatten(),
            nn.Dense(CNN.dense_units, in_units=channels * height * width, **initializers), nn.Activation("relu"),
            nn.Dropout(CNN.dense_dropout),
            nn.Dense(spec.num_classes, in_units=CNN.dense_units, **initializers))  # logits: softmax lives in the loss
    return net


class _SoftmaxClassifier:
    """The CNN and the GRU: one hybridized Gluon network trained batch by batch with softmax
    cross-entropy on logits."""
    parameter_note = None
    input_dtype = "float32"

    def __init__(self, run: RunOptions, net: gluon.HybridBlock, optimizer: str, optimizer_params: dict):
        mx.random.seed(run.seed)
        self.ctx = _contexts(run)[0]
        self.net = net
        self.net.initialize(ctx=self.ctx)  # every layer carries its specified initializers
        self.net.hybridize(static_alloc=True, static_shape=True)
        # Per-example losses; backward() sums their gradients and trainer.step(batch_size)
        # rescales by 1/batch_size: the gradient of the mean loss, as in the other frameworks.
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        self.mixed = MixedPrecision(run)
        self.trainer = self.mixed.trainer(self.net.collect_params(), optimizer, optimizer_params)
        self._last_loss: mx.nd.NDArray | None = None

    def parameter_count(self) -> int:
        return _parameter_count(self.net)

    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        x = _on(inputs, self.ctx, self.input_dtype)
        y = _on(labels, self.ctx, "float32")
        with autograd.record():  # training mode: dropout on
            loss = self.loss_fn(_float32(self.net(x)), y)
            self.mixed.backward(loss, self.trainer)
        self.trainer.step(inputs.shape[0])
        self._last_loss = loss

    def loss(self) -> float:
        """The last step's loss, after the device has finished all queued work."""
        # Reading the loss alone would wait for the last forward pass only, not for its
        # backward pass and update: wait for everything first.
        mx.nd.waitall()
        return float(self._last_loss.mean().asscalar())

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        # Outside autograd.record() Gluon runs in inference mode: dropout off.
        outputs = _float32(self.net(_on(inputs, self.ctx, self.input_dtype)))
        return outputs.asnumpy()  # asnumpy waits for the device


class CnnCifar10(_SoftmaxClassifier):
    # NCHW everywhere: cuDNN's layout, and the only one MXNet's CPU convolutions (oneDNN) take.
    layout = "NCHW"

    def __init__(self, spec: TaskSpec, run: RunOptions):
        # MXNet's SGD momentum (m = 0.9 m - lr g; w += m) is classic momentum, like PyTorch's.
        super().__init__(run, build_cnn_cifar10(spec), "sgd",
                         {"learning_rate": run.learning_rate, "momentum": spec.momentum})


class Bottleneck(gluon.HybridBlock):
    """ResNet v1.5 bottleneck: the stride sits on the 3×3 convolution; no convolution biases.
    (gluon.model_zoo's resnet50_v1 strides the first 1×1 convolution: that is v1.)"""

    def __init__(self, channels: int, width: int, stride: int):
        super().__init__()
        out = width * RESNET50.expansion
        with self.name_scope():
            self.conv1, self.bn1 = _conv(channels, width, 1), _batch_norm(width)
            self.conv2, self.bn2 = _conv(width, width, 3, stride), _batch_norm(width)
            self.conv3, self.bn3 = _conv(width, out, 1), _batch_norm(out)
            self.downsample = None
            if stride != 1 or channels != out:
                self.downsample = nn.HybridSequential()
                self.downsample.add(_conv(channels, out, 1, stride), _batch_norm(out))

    def hybrid_forward(self, F, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.relu(self.bn3(self.conv3(x)) + shortcut)


def _conv(channels: int, out: int, kernel: int, stride: int = 1) -> nn.Conv2D:
    # Explicit symmetric padding (kernel // 2), as PyTorch's: equal outputs for stride 2 too.
    return nn.Conv2D(out, kernel, strides=stride, padding=kernel // 2, use_bias=False, in_channels=channels,
                     weight_initializer=_initializer(RESNET50.conv_init))


def _batch_norm(channels: int) -> nn.BatchNorm:
    # Gluon's momentum is the weight of the old average: PyTorch's 1 - momentum.
    return nn.BatchNorm(epsilon=BATCH_NORM.epsilon, momentum=BATCH_NORM.decay, in_channels=channels,
                        gamma_initializer=_initializer(BATCH_NORM.scale_init),
                        beta_initializer=_initializer(BATCH_NORM.shift_init))


class Resnet50(gluon.HybridBlock):
    """ResNet-50 v1.5 up to global average pooling; attribute names follow torchvision's, so
    Gluon's structural parameter names ("layer1.0.conv1.weight", "bn1.gamma") are the
    canonical weights file's, with batch norm's gamma/beta for weight/bias."""

    def __init__(self):
        super().__init__()
        with self.name_scope():
            self.conv1, self.bn1 = _conv(3, RESNET50.stem, 7, 2), _batch_norm(RESNET50.stem)
            self.maxpool = nn.MaxPool2D(3, strides=2, padding=1)
            channels = RESNET50.stem
            for stage, (width, blocks) in enumerate(RESNET50.stages, start=1):
                stride = 1 if stage == 1 else 2
                layer = nn.HybridSequential()
                for block in range(blocks):
                    layer.add(Bottleneck(channels, width, stride if block == 0 else 1))
                    channels = width * RESNET50.expansion
                setattr(self, f"layer{stage}", layer)
            self.pool = nn.GlobalAvgPool2D()

    def hybrid_forward(self, F, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.flatten(self.pool(x))


# torchvision's batch-norm names -> Gluon's.
_BATCH_NORM_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "running_mean",
                     "running_var": "running_var"}


class Resnet50Inference:
    parameter_note = None

    def __init__(self, spec: TaskSpec, run: RunOptions):
        mx.random.seed(run.seed)
        self.ctx = _contexts(run)[0]
        self.layout = "NCHW"  # MXNet's convolutions take NCHW on the CPU (oneDNN) and the GPU (cuDNN)
        self.net = Resnet50()
        self.net.initialize(ctx=self.ctx)  # every layer carries its specified initializers
        if run.weights:
            self._load(canonical.load(run.weights, canonical.resnet50_shapes()))
        self.net.hybridize(static_alloc=True, static_shape=True)

    def _load(self, arrays: dict) -> None:
        params = self.net._collect_params_with_prefix()  # structural names, as save_parameters writes
        for name, value in arrays.items():
            module, field = name.rsplit(".", 1)
            # Kernels are O, I, kH, kW in both (4-D); only batch norm's names (1-D) differ.
            if value.ndim == 1:
                field = _BATCH_NORM_NAMES[field]
            params[f"{module}.{field}"].set_data(mx.nd.array(value, ctx=self.ctx))

    def parameter_count(self) -> int:
        return _parameter_count(self.net)

    def predict(self, images: np.ndarray) -> np.ndarray:
        # Outside autograd.record() Gluon runs in inference mode (batch-norm running statistics)
        # and records nothing for gradients.
        return _float32(self.net(_on(images, self.ctx))).asnumpy()


class GruNet(gluon.HybridBlock):
    """Embedding -> one GRU layer (MXNet's fused RNN operator: cuDNN's GRU on the GPU, two bias
    vectors per gate set) -> the last time step's output -> dense (logits)."""

    def __init__(self, spec: TaskSpec):
        super().__init__()
        with self.name_scope():
            self.embedding = nn.Embedding(spec.vocabulary, GRU.embedding,
                                          weight_initializer=_initializer(GRU.embedding_init))
            # Each initializer draws over the three gates' matrices stacked, (3 × units, inputs).
            self.gru = gluon.rnn.GRU(GRU.units, layout="TNC", input_size=GRU.embedding,
                                     i2h_weight_initializer=_initializer(GRU.input_kernel_init),
                                     h2h_weight_initializer=_initializer(GRU.recurrent_kernel_init),
                                     i2h_bias_initializer=_initializer(GRU.bias_init),
                                     h2h_bias_initializer=_initializer(GRU.bias_init))
            self.output = nn.Dense(spec.num_classes, in_units=GRU.units,  # logits: softmax lives in the loss
                                   weight_initializer=_initializer(GRU.dense_kernel_init),
                                   bias_initializer=_initializer(GRU.dense_bias_init))

    def hybrid_forward(self, F, tokens):
        # Time-major for the fused RNN: transpose the (N, T) ids, not the embedded sequence.
        sequence = self.gru(self.embedding(F.transpose(tokens)))  # (T, N, hidden)
        return self.output(F.squeeze(F.slice_axis(sequence, axis=0, begin=-1, end=None), axis=0))


class GruImdb(_SoftmaxClassifier):
    layout = "TNC"
    input_dtype = "int32"

    def __init__(self, spec: TaskSpec, run: RunOptions):
        super().__init__(run, GruNet(spec), "adam",
                         {"learning_rate": run.learning_rate, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8})


def _specify_densenet(block: gluon.Block) -> None:
    """The specs in every layer of the zoo's DenseNet, built with Gluon's defaults: each
    parameter's initializer (used by initialize(), which runs later) and each batch norm's
    momentum and epsilon (the operator's arguments, which the graph reads when it is built)."""
    if isinstance(block, nn.BatchNorm):
        block._kwargs.update(eps=BATCH_NORM.epsilon, momentum=BATCH_NORM.decay)
        block.gamma.init, block.beta.init = _initializer(BATCH_NORM.scale_init), _initializer(BATCH_NORM.shift_init)
    elif isinstance(block, nn.Conv2D):  # no biases
        block.weight.init = _initializer(DENSENET121.conv_init)
    elif isinstance(block, nn.Dense):
        block.weight.init = _initializer(DENSENET121.dense_kernel_init)
        block.bias.init = _initializer(DENSENET121.dense_bias_init)
    for child in block._children.values():
        _specify_densenet(child)


def build_densenet121(spec: TaskSpec) -> nn.HybridSequential:
    """gluon.model_zoo's DenseNet (torchvision's architecture) with global average pooling in
    place of its fixed 7×7 pooling, which only pools globally at 224×224 inputs. Its
    transitions halve the channels: DENSENET121.compression is the zoo's own."""
    zoo = gluon.model_zoo.vision.DenseNet(DENSENET121.stem, DENSENET121.growth, list(DENSENET121.blocks),
                                          bn_size=DENSENET121.bottleneck, classes=spec.num_classes)
    _specify_densenet(zoo)
    net = nn.HybridSequential()
    # features[:-2] drops the 7×7 pooling and the flatten; Dense flattens its input itself.
    net.add(zoo.features[:-2], nn.GlobalAvgPool2D(), zoo.output)  # logits: the sigmoid lives in the loss
    return net


@functools.lru_cache(maxsize=None)
def _resampling(source: int, target: int) -> mx.nd.sparse.CSRNDArray:
    """Pillow's bilinear resampling of ``source`` pixels to ``target`` as a sparse (target, source)
    matrix: a triangle filter at each output pixel's centre whose support widens by the reduction
    factor when it shrinks (the antialiasing), its weights normalised to sum to 1."""
    scale = source / target
    support = max(scale, 1.0)
    centres = (np.arange(target) + 0.5) * scale
    weights = np.maximum(0.0, 1.0 - np.abs(np.arange(source) + 0.5 - centres[:, None]) / support)
    return mx.nd.sparse.csr_matrix(weights / weights.sum(axis=1, keepdims=True), dtype="float32")


def _resize_bilinear(image: mx.nd.NDArray, size: int) -> mx.nd.NDArray:
    """An HWC uint8 image resized to size × size with Pillow's antialiased bilinear filter, the
    other frameworks' (mx.image.imresize is OpenCV's INTER_LINEAR, which does not widen its
    filter and aliases when it shrinks). Two sparse products, rows then columns, in float32;
    Pillow rounds to 8 bits between its passes, this once at the end: a value differs from
    Pillow's by one level at most."""
    height, width, channels = image.shape
    rows = mx.nd.sparse.dot(_resampling(height, size), image.reshape((height, -1)).astype("float32"))
    columns = rows.reshape((size, width, channels)).transpose((1, 0, 2)).reshape((width, -1))
    resized = mx.nd.sparse.dot(_resampling(width, size), columns).reshape((size, size, channels))
    # Weighted means of 0-255 values: rounded, they are 8-bit again.
    return mx.nd.round(resized.transpose((1, 0, 2))).astype("uint8")


class XrayImages(gluon.data.Dataset):
    """ChestX-ray14 files as CHW float32 [0, 1] images: decoded with MXNet's OpenCV, resized with
    Pillow's filter, cropped (and flipped) with offsets drawn from (seed, index), so that any
    worker process draws the same augmentation for an example."""

    def __init__(self, files, stored_size: int, size: int, training: bool, seed: int):
        self.paths, self.labels = files.paths, files.labels
        self.stored_size, self.size, self.training, self.seed = stored_size, size, training, seed
        self.to_tensor = gluon.data.vision.transforms.ToTensor()  # HWC uint8 -> CHW float32 / 255

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = mx.image.imread(self.paths[index], flag=1)  # 3-channel RGB from gray, RGB or RGBA
        if image.shape[:2] != (self.stored_size, self.stored_size):
            image = _resize_bilinear(image, self.stored_size)
        if self.training:
            rng = np.random.default_rng((self.seed, index))
            x0, y0 = (int(offset) for offset in rng.integers(0, self.stored_size - self.size + 1, size=2))
            image = mx.image.fixed_crop(image, x0, y0, self.size, self.size)
            if rng.random() < 0.5:
                image = mx.nd.flip(image, axis=1)  # horizontal: the width axis of HWC
        else:
            image, _ = mx.image.center_crop(image, (self.size, self.size))
        return self.to_tensor(image), self.labels[index]


class Densenet121Xray:
    parameter_note = None

    def __init__(self, spec: TaskSpec, run: RunOptions):
        mx.random.seed(run.seed)
        self.contexts = _contexts(run)
        self.layout = "NCHW"
        self.input_size = run.input_shape[-1]
        self.loader_workers = run.loader_workers
        self.net = build_densenet121(spec)
        self.net.initialize(ctx=self.contexts)  # a copy of the weights per replica, as specified
        # The zoo's layers infer their input channels, and their parameters take shape and values
        # on a first forward pass: one example's, here, outside any timer.
        self.net(mx.nd.zeros((1,) + tuple(run.input_shape), ctx=self.contexts[0]))
        self.net.hybridize(static_alloc=True, static_shape=True)
        # Per example: the mean over the 14 labels of the sigmoid cross-entropy on logits.
        self.loss_fn = gluon.loss.SigmoidBinaryCrossEntropyLoss(from_sigmoid=False)
        self.mixed = MixedPrecision(run)
        self.trainer = self.mixed.trainer(self.net.collect_params(), "adam",
                                          {"learning_rate": run.learning_rate, "beta1": 0.9, "beta2": 0.999,
                                           "epsilon": 1e-8}, kvstore=_kvstore(run))
        self._last_losses: list[mx.nd.NDArray] = []

    def parameter_count(self) -> int:
        return _parameter_count(self.net)

    def train_step(self, images, labels) -> None:
        # The global batch in equal slices, one per replica; each replica's forward and backward
        # queue on its own context and run concurrently.
        xs = gluon.utils.split_and_load(_host(images, self.contexts[0]), self.contexts)
        ys = gluon.utils.split_and_load(_host(labels, self.contexts[0]), self.contexts)
        with autograd.record():
            losses = [self.loss_fn(_float32(self.net(x)), y) for x, y in zip(xs, ys)]
            self.mixed.backward(losses, self.trainer)
        # The kvstore sums the replicas' gradients; 1/global batch makes them the mean loss's.
        self.trainer.step(images.shape[0])
        self._last_losses = losses

    def loss(self) -> float:
        """The last step's loss, after every replica has finished all queued work."""
        mx.nd.waitall()
        return float(np.mean(np.concatenate([loss.asnumpy() for loss in self._last_losses])))

    def predict(self, images) -> np.ndarray:
        # A last test batch may be smaller than the replicas: as many slices as examples then.
        contexts = self.contexts[:len(images)]
        xs = gluon.utils.split_and_load(_host(images, contexts[0]), contexts, even_split=False)
        return np.concatenate([mx.nd.sigmoid(_float32(self.net(x))).asnumpy() for x in xs])

    def input_pipeline(self, files, stored_size: int, batch_size: int, training: bool, seed: int):
        dataset = XrayImages(files, stored_size, self.input_size, training, seed)
        # Worker processes decode in parallel; on the GPU they batch into page-locked memory,
        # from which the copies to the replicas are fastest.
        loader = gluon.data.DataLoader(dataset, batch_size=batch_size, shuffle=training,
                                       last_batch="discard" if training else "keep",
                                       num_workers=self.loader_workers,
                                       pin_memory=self.contexts[0].device_type == "gpu")
        # gluon's RandomSampler shuffles with numpy's global generator when iteration starts:
        # seeded here, inside this generator, the epoch's order follows from the seed.
        np.random.seed(seed)
        for images, labels in loader:
            # Labels as numpy: the bench's scoring reads them with np.asarray, which an NDArray
            # does not support. The images stay NDArrays in shared memory, ready for the copies.
            yield images, labels.asnumpy()


TASKS = {"cnn_cifar10": CnnCifar10, "resnet50_inference": Resnet50Inference, "gru_imdb": GruImdb,
         "densenet121_xray": Densenet121Xray}
