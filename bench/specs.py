"""Task specifications: the one place that says what every framework must build.

Shared by the bench (inside a framework environment) and the harness (on the host), so it
imports nothing beyond the standard library. Like every module of the bench outside
``frameworks/``, it stays valid Python 3.6: the CNTK 2.7 image has no newer interpreter.
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple


# What a task measures, which decides the protocol (bench/protocol.py):
CLASSIFY = "classify"  # train with softmax cross-entropy; test accuracy
INFER = "infer"  # forward passes only, in inference mode; features out
MULTILABEL = "multilabel"  # train with sigmoid cross-entropy per label; mean ROC-AUC
CEILING = "ceiling"  # no model: the device's achievable dense matrix-multiply rate (bench/ceiling.py)

# ChestX-ray14's findings, in the order of the model's 14 outputs.
CHESTXRAY14_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                      "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema",
                      "Fibrosis", "Pleural_Thickening", "Hernia")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    title: str
    kind: str  # CLASSIFY, INFER or MULTILABEL
    # Trainable parameters of the seed's network; every implementation must match it.
    expected_parameters: int
    batch_size: int  # per device
    epochs: int
    learning_rate: float
    num_classes: int  # outputs of the model (classes, labels, or features for INFER)
    # One example as stored: channel-first (C, H, W) for images, (T,) for token sequences.
    input_shape: Tuple[int, ...]
    train_examples: int
    test_examples: int
    # What one example is called in throughput figures.
    item: str
    dataset: Optional[str]  # "cifar10", "imdb", "chestxray14"; None: random inputs by design
    momentum: float = 0.0  # SGD tasks only
    vocabulary: int = 0  # token tasks: ids are below this
    # Image tasks whose network ends in global pooling may run at another input size (small
    # sizes keep CPU runs short); their parameter count does not depend on it.
    resizable: bool = False
    # Real data is stored this much larger than the input and randomly cropped to it.
    stored_size_ratio: float = 1.0
    # Data-parallel tasks scale the learning rate (and the global batch) with the devices.
    data_parallel: bool = False
    # Batches of the seed's own timing protocol for INFER tasks (after one untimed batch).
    timed_batches: int = 0
    # Defaults for CPU cells, where the seed's sizes would take many minutes per cell; None:
    # the same as on GPUs. Tables show the sizes every result ran at.
    cpu_batch_size: Optional[int] = None
    cpu_image_size: Optional[int] = None

    def default_batch_size(self, device: str) -> int:
        return (self.cpu_batch_size if device == "cpu" else None) or self.batch_size

    def default_image_size(self, device: str) -> Optional[int]:
        return self.cpu_image_size if device == "cpu" else None

    def input_shape_at(self, image_size: Optional[int]) -> Tuple[int, ...]:
        """The example shape with its spatial size replaced by ``image_size``."""
        if image_size is None or image_size == self.input_shape[-1]:
            return self.input_shape
        if not self.resizable:
            raise ValueError(f"{self.name} runs at its fixed input size {self.input_shape}; "
                             f"it has no image size to change")
        return self.input_shape[:-2] + (image_size, image_size)


CNN_CIFAR10 = TaskSpec(
    name="cnn_cifar10",
    title="VGG-style CNN on CIFAR-10, training",
    kind=CLASSIFY,
    expected_parameters=3441592,
    batch_size=64,
    epochs=10,
    learning_rate=0.01,
    momentum=0.9,
    num_classes=10,
    input_shape=(3, 32, 32),
    train_examples=50000,
    test_examples=10000,
    item="images",
    dataset="cifar10",
)

RESNET50_INFERENCE = TaskSpec(
    name="resnet50_inference",
    title="ResNet-50 v1.5 feature extraction, inference",
    kind=INFER,
    # No convolution biases; batch-norm scale and shift counted, running statistics not.
    expected_parameters=23508032,
    batch_size=32,
    epochs=1,
    learning_rate=0.0,
    num_classes=2048,
    input_shape=(3, 224, 224),
    train_examples=0,
    test_examples=0,
    item="images",
    dataset=None,  # the seed timed random images; weights come from a file or are random
    resizable=True,
    timed_batches=40,
    cpu_batch_size=8,
    cpu_image_size=112,
)

GRU_IMDB = TaskSpec(
    name="gru_imdb",
    title="GRU sentiment classifier on IMDB, training",
    kind=CLASSIFY,
    # cuDNN's convention: two bias vectors per gate set.
    expected_parameters=3818302,
    batch_size=64,
    epochs=3,
    learning_rate=0.001,
    num_classes=2,
    input_shape=(150,),
    train_examples=25000,
    test_examples=25000,
    item="reviews",
    dataset="imdb",
    vocabulary=30000,
)

DENSENET121_XRAY = TaskSpec(
    name="densenet121_xray",
    title="DenseNet-121 on chest X-rays, data-parallel training",
    kind=MULTILABEL,
    expected_parameters=6968206,
    batch_size=64,
    epochs=5,
    learning_rate=0.0001,
    num_classes=len(CHESTXRAY14_LABELS),
    input_shape=(3, 224, 224),
    train_examples=86524,  # ChestX-ray14's official train_val / test split
    test_examples=25596,
    item="images",
    dataset="chestxray14",
    resizable=True,
    stored_size_ratio=264 / 224,
    data_parallel=True,
    cpu_batch_size=8,
    cpu_image_size=64,
)

# The calibration each run makes once per device kind and precision: products of square matrices
# of this size and smaller ones (bench/ceiling.py), in the framework's own matrix multiply.
GEMM_CEILING = TaskSpec(
    name="gemm_ceiling",
    title="dense matrix multiply, the device's achievable rate",
    kind=CEILING,
    expected_parameters=0,
    batch_size=1,
    epochs=1,
    learning_rate=0.0,
    num_classes=0,
    input_shape=(8192, 8192),
    train_examples=0,
    test_examples=0,
    item="products",
    dataset=None,
    resizable=True,
    cpu_image_size=2048,
)


# Initialisers, by kind. Fans are those of the layer's kernel as PyTorch shapes it
# (out, in, kh, kw): fan_in = in × kh × kw, fan_out = out × kh × kw.
ZEROS = "zeros"
ONES = "ones"
UNIFORM = "uniform"  # U(-limit, limit)
GLOROT_UNIFORM = "glorot_uniform"  # U(±sqrt(6 / (fan_in + fan_out)))
HE_NORMAL = "he_normal"  # N(0, 2 / fan), not truncated (Keras's own he_normal is)
ORTHOGONAL = "orthogonal"  # a (semi-)orthogonal matrix, gain 1


@dataclass(frozen=True)
class Init:
    """One initialiser, named the same way for every framework, which sets it in its own terms."""

    kind: str
    fan: str = "fan_in"  # HE_NORMAL: "fan_in" or "fan_out"
    limit: float = 0.0  # UNIFORM

    def std(self, fan_in: int, fan_out: int) -> float:
        """The standard deviation of the values it draws for a kernel with these fans."""
        if self.kind in (ZEROS, ONES):
            return 0.0
        if self.kind == UNIFORM:
            return self.limit / math.sqrt(3.0)
        if self.kind == GLOROT_UNIFORM:
            return math.sqrt(2.0 / (fan_in + fan_out))
        if self.kind == HE_NORMAL:
            return math.sqrt(2.0 / (fan_in if self.fan == "fan_in" else fan_out))
        if self.kind == ORTHOGONAL:
            return 1.0 / math.sqrt(max(fan_in, fan_out))
        raise ValueError("unknown initialiser {!r}".format(self.kind))


@dataclass(frozen=True)
class BatchNormSpec:
    """Batch normalisation in PyTorch's convention (the seed's): ``momentum`` is the weight of a
    batch's statistics in the running averages, running = (1 - momentum) running + momentum batch.
    Scales start at one, shifts at zero."""

    momentum: float
    epsilon: float
    scale_init: Init = Init(ONES)
    shift_init: Init = Init(ZEROS)

    @property
    def decay(self) -> float:
        """The weight of the old running average: Keras's, Flax's, Gluon's momentum, Chainer's decay."""
        return 1.0 - self.momentum

    def time_constant(self, batch_size: int) -> float:
        """CNTK's normalization_time_constant (in samples), which weighs a batch of batch_size
        samples by 1 - exp(-batch_size / time constant): that weight is ``momentum``."""
        return -batch_size / math.log(1.0 - self.momentum)


# Every batch norm of every network (ResNet-50, DenseNet-121), in every framework.
BATCH_NORM = BatchNormSpec(momentum=0.1, epsilon=1e-5)


@dataclass(frozen=True)
class CnnArchitecture:
    """cnn_cifar10: pairs of 3×3 convolutions (padding 1) each followed by 2×2 max pooling, ReLU
    and dropout; then a hidden dense layer, dropout and the output layer. Glorot kernels, zero
    biases, as the seed asks."""

    filters: Tuple[Tuple[int, int], ...] = ((50, 50), (100, 100))
    kernel_size: int = 3
    conv_dropout: float = 0.25
    dense_units: int = 512
    dense_dropout: float = 0.5
    kernel_init: Init = Init(GLOROT_UNIFORM)
    bias_init: Init = Init(ZEROS)


@dataclass(frozen=True)
class GruArchitecture:
    """gru_imdb: an embedding, one GRU layer in cuDNN's convention (reset gate applied after the
    recurrent product, a bias on both the input and the recurrent side of every gate), its
    last time step's output, a dense layer of logits. Initialisers are Keras's GRU defaults,
    each over the three gates' matrices stacked: (3 × units, embedding) and (3 × units, units)."""

    embedding: int = 125
    units: int = 100
    gates: int = 3  # reset, update, new
    embedding_init: Init = Init(UNIFORM, limit=0.05)
    input_kernel_init: Init = Init(GLOROT_UNIFORM)
    recurrent_kernel_init: Init = Init(ORTHOGONAL)
    bias_init: Init = Init(ZEROS)  # both bias vectors
    dense_kernel_init: Init = Init(GLOROT_UNIFORM)
    dense_bias_init: Init = Init(ZEROS)


@dataclass(frozen=True)
class ResnetArchitecture:
    """resnet50_inference: ResNet-50 v1.5 (the stride on each block's 3×3 convolution), no
    convolution biases, cut after global average pooling. Convolutions He-initialised over
    their fan-out, as torchvision's are (the weights file replaces them when one is given)."""

    stem: int = 64  # 7×7 stride-2 convolution, then 3×3 stride-2 max pooling
    # (bottleneck width, blocks) of the four stages; each block widens to expansion × its width.
    stages: Tuple[Tuple[int, int], ...] = ((64, 3), (128, 4), (256, 6), (512, 3))
    expansion: int = 4
    conv_init: Init = Init(HE_NORMAL, fan="fan_out")


@dataclass(frozen=True)
class DensenetArchitecture:
    """densenet121_xray: torchvision's DenseNet-121. A 7×7 stride-2 stem and 3×3 stride-2 max
    pooling; dense blocks whose layers are BN-ReLU-conv 1×1 (bottleneck × growth channels) then
    BN-ReLU-conv 3×3 (growth channels), each seeing every earlier output of its block; between
    blocks a transition (BN-ReLU-conv 1×1 to compression × the channels, 2×2 average pooling);
    a last BN-ReLU, global average pooling, and a dense layer of logits."""

    stem: int = 64
    blocks: Tuple[int, ...] = (6, 12, 24, 16)  # dense layers per block
    growth: int = 32
    bottleneck: int = 4  # the 1×1 convolution's width, in multiples of growth
    compression: float = 0.5
    conv_init: Init = Init(HE_NORMAL, fan="fan_in")
    dense_kernel_init: Init = Init(GLOROT_UNIFORM)
    dense_bias_init: Init = Init(ZEROS)

    @property
    def bottleneck_width(self) -> int:
        return self.bottleneck * self.growth


CNN = CnnArchitecture()
GRU = GruArchitecture()
RESNET50 = ResnetArchitecture()
DENSENET121 = DensenetArchitecture()

TASKS = {spec.name: spec for spec in (CNN_CIFAR10, RESNET50_INFERENCE, GRU_IMDB,
                                      DENSENET121_XRAY)}  # type: Dict[str, TaskSpec]
# What the bench runs beside the tasks: calibrations the harness adds to every run.
CALIBRATIONS = {GEMM_CEILING.name: GEMM_CEILING}  # type: Dict[str, TaskSpec]


def task_spec(name: str) -> TaskSpec:
    """A task's or a calibration's spec."""
    return TASKS[name] if name in TASKS else CALIBRATIONS[name]


@dataclass(frozen=True)
class FrameworkSpec:
    """What one framework can run, as data: the bench refuses the rest (the cell is skipped,
    saying why) and the harness's dry run shows the same skips before anything runs."""

    name: str  # the matrix's name
    # Precisions (bench/precision.py) on "cpu" and on "gpu", fp32 first.
    precisions: Dict[str, Tuple[str, ...]]
    # How it trains one model on several devices; None: it has no way to.
    data_parallel: Optional[str]
    # Why it has no data parallelism, when it has none.
    no_data_parallel: Optional[str] = None
    # Its data parallelism runs one process per device under an MPI launcher (mpiexec).
    data_parallel_under_mpi: bool = False
    # Why it installs only in its own image, not in an environment beside the others; None: anywhere.
    image_only: Optional[str] = None
    # The compile profiles (COMPILE_PROFILES): the framework's own compiler, which the compiled
    # profile turns on; None: it has none, and ``no_compiler`` says why.
    compiler: Optional[str] = None
    no_compiler: Optional[str] = None
    # Its default already runs that compiler: the two profiles are one, run once, as default.
    compiles_by_default: bool = False


# PyTorch's autocast, TensorFlow's and Keras's mixed_bfloat16 policy, and Flax's mixed precision
# run bfloat16 on CPUs (oneDNN, Eigen, XLA) and both 16-bit types on GPUs; float16 is a GPU format.
_EVERY_PRECISION = {"cpu": ("fp32", "bf16"), "gpu": ("fp32", "tf32", "fp16", "bf16")}

# Matrix names, in the tables' order. Keras 3 runs on three backends; each is its own
# framework environment.
FRAMEWORK_SPECS = {spec.name: spec for spec in (
    FrameworkSpec("pytorch", _EVERY_PRECISION, "DistributedDataParallel, one process per device",
                  compiler="torch.compile (TorchInductor)"),
    FrameworkSpec("tensorflow", _EVERY_PRECISION, "tf.distribute.MirroredStrategy",
                  compiler="XLA (tf.function(jit_compile=True))"),
    # Keras's compile(jit_compile="auto") picks XLA on TensorFlow only where every layer allows it.
    FrameworkSpec("keras-tensorflow", _EVERY_PRECISION, "tf.distribute.MirroredStrategy",
                  compiler="XLA (compile(jit_compile=True))"),
    FrameworkSpec("keras-jax", _EVERY_PRECISION, "keras.distribution.DataParallel",
                  compiler="XLA (jax.jit, which Keras's JAX backend always applies)", compiles_by_default=True),
    # Keras's PyTorch multi-GPU guide drives torch's DistributedDataParallel from a hand-written
    # torch loop, outside compile() and Keras's training loop: PyTorch's mechanism, not Keras's.
    FrameworkSpec("keras-torch", _EVERY_PRECISION, None, no_data_parallel=(
        "Keras 3 has no data-parallel mechanism for the torch backend (its distribution API is JAX-only)"),
        compiler="torch.compile (compile(jit_compile=True))"),
    FrameworkSpec("jax", _EVERY_PRECISION, "jax.shard_map over a one-axis device mesh, a replica per device",
                  compiler="XLA (jax.jit)", compiles_by_default=True),
    # MXNet's AMP computes in float16 on NVIDIA GPUs; its bfloat16 is oneDNN's, for CPUs with
    # AVX-512 only (elsewhere it cannot create its convolutions): CPUs run fp32 alone.
    FrameworkSpec("mxnet", {"cpu": ("fp32",), "gpu": ("fp32", "tf32", "fp16")},
                  "an NCCL kvstore over the GPUs, a local one over CPU devices (gluon.utils.split_and_load)",
                  compiler="hybridize(static_alloc=True, static_shape=True)", compiles_by_default=True),
    # Chainer's fp16 is mixed16, in float16 kernels of cuDNN and cuBLAS; numpy has no fast float16
    # (no BLAS for it) and neither numpy nor CuPy a bfloat16 type.
    FrameworkSpec("chainer", {"cpu": ("fp32",), "gpu": ("fp32", "tf32", "fp16")},
                  "one process per device, gradients averaged (NCCL all-reduce on GPUs, shared memory on CPUs), "
                  "as MultiprocessParallelUpdater and ChainerMN do",
                  no_compiler="Chainer is define-by-run only: it has no graph compiler"),
    # CNTK 2.7 is built for CUDA 10.0 and cuDNN 7, which predate TF32 and bfloat16, and its float16
    # builds whole networks, weights included, in float16: not the mixed precision of fp16 cells.
    FrameworkSpec("cntk", {"cpu": ("fp32",), "gpu": ("fp32",)},
                  "the data-parallel distributed learner, one MPI process per device",
                  data_parallel_under_mpi=True,
                  image_only="CNTK 2.7 installs only on Python 3.5/3.6 and links OpenMPI 1.10: it runs in its "
                             "own image (Python 3.6, CUDA 10.0, cuDNN 7)",
                  no_compiler="CNTK always runs the static graph it builds and has no further compiler to turn on"),
)}  # type: Dict[str, FrameworkSpec]
FRAMEWORKS = tuple(FRAMEWORK_SPECS)
# default: each framework as its users run it out of the box; compiled: through its own compiler
# (FrameworkSpec.compiler).
COMPILE_PROFILES = ("default", "compiled")
# Names that stand for several frameworks in matrix.yml.
FRAMEWORK_GROUPS = {"keras": ("keras-tensorflow", "keras-jax", "keras-torch")}


class Unsupported(Exception):
    """Raised by an implementation for a combination its framework cannot run (say,
    data-parallel training on a backend without a mechanism for it); the cell is recorded as
    skipped with this message, which must say why."""


@dataclass(frozen=True)
class RunOptions:
    """What one cell asks of a framework's implementation, resolved by the bench."""

    device: str  # "cpu" or "gpu"
    devices: int  # data-parallel replicas: GPUs, or CPU devices/processes
    seed: int
    threads: Optional[int]  # intra/inter-op threads; None = the framework's default
    batch_size: int  # per device
    input_shape: Tuple[int, ...]  # one example as the model takes it (channel-first images)
    learning_rate: float  # the task's, times the devices for data-parallel tasks
    weights: Optional[str] = None  # a weights file in the canonical format, or None: random
    precision: str = "fp32"  # bench/precision.py: fp32, tf32, fp16 or bf16
    loader_workers: int = 1  # workers of the input pipeline over image files, in every framework
    compile: str = "default"  # COMPILE_PROFILES: "compiled" turns on the framework's own compiler

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.devices
