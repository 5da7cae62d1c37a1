"""PyTorch: nn.Module models, torch.optim optimisers, an eager training loop; DenseNet-121
data-parallel with DistributedDataParallel, one process per replica, each loading its own shard
of every global batch: with its own DataLoader over its DistributedSampler partition of the
files, or as its rows of array data that every process holds once, in shared memory.

loader_workers means what it means in every other framework, the workers of the one pipeline
that decodes a global batch: a data-parallel run splits them over its processes' loaders (at
least one each), as it splits the threads; scoring, on rank 0 alone, runs them all."""
from __future__ import annotations

import atexit
import contextlib
import os
import queue
import socket
from collections import OrderedDict
from datetime import timedelta
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import precision
from .. import weights as canonical
from ..data import ImageFiles
from ..shards import LoaderStep, RankGroup, Rows, rank_share
from ..specs import (BATCH_NORM, CNN, DENSENET121, FRAMEWORK_SPECS, GLOROT_UNIFORM, GRU, HE_NORMAL, ONES, ORTHOGONAL,
                     RESNET50, UNIFORM, ZEROS, Init, RunOptions, TaskSpec)

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def describe(run: RunOptions) -> dict:
    on_gpu = run.device == "gpu"
    return {
        "framework": "pytorch",
        "framework_version": torch.__version__,
        "threads": torch.get_num_threads(),  # per process: a data-parallel run has one per replica
        "interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.version.cuda if on_gpu else None,
        "cudnn": str(torch.backends.cudnn.version()) if on_gpu else None,
        "math_modes": precision.math_modes(
            run.precision,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32 if on_gpu else None,
            tf32_convolutions=torch.backends.cudnn.allow_tf32 if on_gpu else None,
            loss_scaling="dynamic" if run.precision == "fp16" else None,
            autotuner=torch.backends.cudnn.benchmark if on_gpu else None,
            xla=False,
            compiler=FRAMEWORK_SPECS["pytorch"].compiler if run.compile == "compiled" else None),
        "framework_settings": {
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if on_gpu else None,
            "data_parallel": (f"DistributedDataParallel, {_distributed_backend(run.device)}, "
                              f"{run.devices} processes") if run.devices > 1 else None,
        },
    }


def configure(run: RunOptions) -> None:
    torch.manual_seed(run.seed)
    threads = _threads_per_process(run)
    if threads:
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(threads)
    _set_math_modes(run)


def _set_math_modes(run: RunOptions) -> None:
    """In every process of the cell. PyTorch's defaults let cuDNN convolutions use TF32 on
    Ampere and newer but not matrix products: both follow the precision instead."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = run.precision == "tf32"
    # The cuDNN autotuner picks the fastest convolution algorithm for fixed shapes.
    torch.backends.cudnn.benchmark = run.device == "gpu"


def device_memory_peak(run: RunOptions) -> int | None:
    """The caching allocator's peak on this process's GPU; None on CPU and for data-parallel
    cells, whose replicas are other processes (NVML measures those)."""
    if run.device != "gpu" or run.devices > 1:
        return None
    return torch.cuda.max_memory_allocated()


def gemm(size: int, run: RunOptions) -> Callable[[], None]:
    """A function computing one product of two ``size`` x ``size`` matrices with the framework's
    own matrix multiply, returning once the device has finished (bench/ceiling.py). The two
    matrices are made once, here: seeded standard-normal values on the cell's device, in the
    precision's compute dtype."""
    device = _torch_device(run.device)
    dtype = getattr(torch, precision.COMPUTE_DTYPES[run.precision])
    generator = torch.Generator(device).manual_seed(run.seed)
    a, b = (torch.randn(size, size, generator=generator, device=device, dtype=dtype) for _ in range(2))

    def product() -> None:
        torch.matmul(a, b)
        if device.type == "cuda":  # CPU products return when done; CUDA ones are queued
            torch.cuda.synchronize(device)
    return product


def _threads_per_process(run: RunOptions) -> int | None:
    """run.threads; a data-parallel run has one process per replica, which share the threads
    asked for (or the cores) equally."""
    if run.devices == 1:
        return run.threads
    return max(1, (run.threads or torch.get_num_threads()) // run.devices)


def _torch_device(device: str, index: int = 0) -> torch.device:
    return torch.device("cuda", index) if device == "gpu" else torch.device("cpu")


def _image_format(device: str) -> tuple[str, torch.memory_format]:
    """The layout numpy batches come in and the memory format of the model: NCHW for cuDNN;
    channels-last is PyTorch's fastest CPU layout (oneDNN)."""
    if device == "gpu":
        return "NCHW", torch.contiguous_format
    return "NHWC", torch.channels_last


def _as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Numpy arrays (synthetic data) and tensors (the input pipeline) alike, without a copy."""
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))


def _nchw(images: np.ndarray | torch.Tensor, layout: str) -> torch.Tensor:
    """Images as an NCHW-shaped tensor. Numpy batches come in the model's layout: an NHWC one
    becomes a channels-last view of NCHW, no copy. Tensors come from the input pipeline, NCHW."""
    if isinstance(images, torch.Tensor):
        return images
    tensor = torch.from_numpy(images)
    return tensor.permute(0, 3, 1, 2) if layout == "NHWC" else tensor


def _host_to_device(tensor: torch.Tensor, device: torch.device, **options) -> torch.Tensor:
    """Copy a batch to the device without waiting for it: to a GPU from pinned memory (pinned
    here unless the input pipeline pinned it), since a copy from pageable memory first waits
    for the work queued on the GPU, every step."""
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True, **options)


def _to_device(images: np.ndarray | torch.Tensor, layout: str, device: torch.device,
               memory_format: torch.memory_format) -> torch.Tensor:
    return _host_to_device(_nchw(images, layout), device, memory_format=memory_format)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BATCH_NORM.epsilon, momentum=BATCH_NORM.momentum)


def _compiled(module: nn.Module, run: RunOptions) -> nn.Module:
    """The module through torch.compile (TorchInductor) in the compiled profile: it compiles
    what the module runs (forward, and backward in training) on the first call, and again for
    a mode it has not seen (train or eval, inference or not). By default the module as it is, eager."""
    return torch.compile(module) if run.compile == "compiled" else module


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _read_loss(loss: torch.Tensor, device: torch.device) -> float:
    """A loss as a number, after the device has finished all queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return float(loss)


class MixedPrecision:
    """Autocast around the forward pass and the loss (float32 weights; layers compute in the
    cell's 16-bit type, the loss in float32), and fp16's dynamic loss scaling (GradScaler).
    With fp32 and tf32 both are off: a plain backward pass and optimiser step."""

    def __init__(self, run: RunOptions, device: torch.device):
        self.device_type = device.type
        self.dtype = AUTOCAST_DTYPES.get(run.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=run.precision == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()


def _initializer(init: Init) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch.nn.init function that draws a tensor's initial values as ``init`` says."""
    if init.kind == ZEROS:
        return nn.init.zeros_
    if init.kind == ONES:
        return nn.init.ones_
    if init.kind == UNIFORM:
        return lambda tensor: nn.init.uniform_(tensor, -init.limit, init.limit)
    if init.kind == GLOROT_UNIFORM:
        return nn.init.xavier_uniform_
    if init.kind == HE_NORMAL:  # gain sqrt(2): N(0, 2 / fan)
        return lambda tensor: nn.init.kaiming_normal_(tensor, mode=init.fan, nonlinearity="relu")
    if init.kind == ORTHOGONAL:
        return nn.init.orthogonal_
    raise ValueError(f"unknown initialiser {init.kind!r}")


def _initialise(model: nn.Module, conv: Init, dense: Init | None = None, bias: Init | None = None) -> None:
    """Every convolution, dense layer and batch norm of ``model`` from the specs' initialisers,
    in place of PyTorch's defaults (Kaiming uniform with a = sqrt 5)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            _initializer(conv if isinstance(module, nn.Conv2d) else dense)(module.weight)
            if module.bias is not None:
                _initializer(bias)(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            _initializer(BATCH_NORM.scale_init)(module.weight)
            _initializer(BATCH_NORM.shift_init)(module.bias)


class CnnCifar10Net(nn.Module):
    def __init__(self, spec: TaskSpec):
        super().__init__()
        channels, size = spec.input_shape[0], spec.input_shape[1]
        layers = []
        for pair in CNN.filters:  # conv + ReLU, conv, max-pool, ReLU, dropout
            for index, filters in enumerate(pair):
                layers.append(nn.Conv2d(channels, filters, CNN.kernel_size, padding=CNN.kernel_size // 2))
                if index < len(pair) - 1:
                    layers.append(nn.ReLU())
                channels = filters
            layers += [nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(CNN.conv_dropout)]
            size //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * size * size, CNN.dense_units), nn.ReLU(), nn.Dropout(CNN.dense_dropout),
            nn.Linear(CNN.dense_units, spec.num_classes),  # logits: softmax lives in the loss
        )
        _initialise(self, conv=CNN.kernel_init, dense=CNN.kernel_init, bias=CNN.bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _SoftmaxClassifier:
    """The CNN and the GRU: one module trained batch by batch with cross-entropy on logits,
    eagerly. Each task sets device, layout and memory format, and turns a numpy batch into the
    model's input on the device (_inputs)."""
    parameter_note = None

    def __init__(self, model: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], run: RunOptions):
        self.model = _compiled(model.to(self.device, memory_format=self.memory_format), run)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = optimizer(self.model.parameters())
        self.mixed = MixedPrecision(run, self.device)
        self._last_loss: torch.Tensor | None = None

    def parameter_count(self) -> int:
        return _parameter_count(self.model)

    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        self.model.train()
        # The numpy batch is copied to the device here, inside the timed step.
        # int64 on the device: converting on the host would add a copy there.
        x, y = self._inputs(inputs), _host_to_device(_as_tensor(labels), self.device).long()
        self.optimizer.zero_grad(set_to_none=True)
        with self.mixed.autocast():
            loss = self.criterion(self.model(x), y)
        self.mixed.backward_and_step(loss, self.optimizer)
        self._last_loss = loss.detach()

    def loss(self) -> float:
        return _read_loss(self._last_loss, self.device)

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        self.model.eval()  # dropout off
        with torch.inference_mode(), self.mixed.autocast():
            return self.model(self._inputs(inputs)).float().cpu().numpy()


class CnnCifar10(_SoftmaxClassifier):
    def __init__(self, spec: TaskSpec, run: RunOptions):
        torch.manual_seed(run.seed)
        self.device = _torch_device(run.device)
        self.layout, self.memory_format = _image_format(run.device)
        super().__init__(CnnCifar10Net(spec),
                         lambda parameters: torch.optim.SGD(parameters, lr=run.learning_rate, momentum=spec.momentum),
                         run)

    def _inputs(self, images: np.ndarray) -> torch.Tensor:
        return _to_device(images, self.layout, self.device, self.memory_format)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3×3 convolution; no convolution biases."""

    def __init__(self, channels: int, width: int, stride: int):
        super().__init__()
        out = width * RESNET50.expansion
        self.conv1, self.bn1 = nn.Conv2d(channels, width, 1, bias=False), _batch_norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _batch_norm(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), _batch_norm(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(channels, out, 1, stride=stride, bias=False),
                                            _batch_norm(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.relu(self.bn3(self.conv3(x)) + shortcut)


class Resnet50(nn.Module):
    """ResNet-50 v1.5 up to global average pooling; parameter names follow torchvision's,
    which are the canonical weights file's."""

    def __init__(self, spec: TaskSpec):
        super().__init__()
        channels = RESNET50.stem
        self.conv1 = nn.Conv2d(spec.input_shape[0], channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = _batch_norm(channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        for stage, (width, blocks) in enumerate(RESNET50.stages, start=1):
            stride = 1 if stage == 1 else 2
            layers = []
            for block in range(blocks):
                layers.append(Bottleneck(channels, width, stride if block == 0 else 1))
                channels = width * RESNET50.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        _initialise(self, conv=RESNET50.conv_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.pool(x), 1)


class Resnet50Inference:
    parameter_note = None

    def __init__(self, spec: TaskSpec, run: RunOptions):
        torch.manual_seed(run.seed)
        self.device = _torch_device(run.device)
        self.layout, self.memory_format = _image_format(run.device)
        self.model = Resnet50(spec)
        if run.weights:
            arrays = canonical.load(run.weights, canonical.resnet50_shapes())
            missing, _ = self.model.load_state_dict(
                {name: torch.from_numpy(value) for name, value in arrays.items()}, strict=False)
            # Only batch-norm's step counters (unused in inference) are not in the file.
            missing = [name for name in missing if not name.endswith("num_batches_tracked")]
            if missing:
                raise ValueError(f"{run.weights}: no weights for {', '.join(missing)}")
        self.model = _compiled(self.model.to(self.device, memory_format=self.memory_format).eval(), run)
        self.mixed = MixedPrecision(run, self.device)

    def parameter_count(self) -> int:
        return _parameter_count(self.model)

    def predict(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), self.mixed.autocast():
            x = _to_device(images, self.layout, self.device, self.memory_format)
            return self.model(x).float().cpu().numpy()  # the copy back waits for the device


class GruImdbNet(nn.Module):
    def __init__(self, spec: TaskSpec):
        super().__init__()
        self.embedding = nn.Embedding(spec.vocabulary, GRU.embedding)
        # Time-major (batch_first=False) is cuDNN's own layout; cuDNN's GRU convention: two bias vectors.
        self.gru = nn.GRU(GRU.embedding, GRU.units)
        self.dense = nn.Linear(GRU.units, spec.num_classes)  # logits: softmax lives in the loss
        _initializer(GRU.embedding_init)(self.embedding.weight)
        # Each initialiser draws over the three gates' matrices stacked, as PyTorch holds them.
        _initializer(GRU.input_kernel_init)(self.gru.weight_ih_l0)
        _initializer(GRU.recurrent_kernel_init)(self.gru.weight_hh_l0)
        _initializer(GRU.bias_init)(self.gru.bias_ih_l0)
        _initializer(GRU.bias_init)(self.gru.bias_hh_l0)
        _initializer(GRU.dense_kernel_init)(self.dense.weight)
        _initializer(GRU.dense_bias_init)(self.dense.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.gru(self.embedding(tokens.t()))  # ids (N, T) -> (T, N): time-major
        return self.dense(outputs[-1])  # the last time step's output


class GruImdb(_SoftmaxClassifier):
    layout = "TNC"
    memory_format = torch.contiguous_format

    def __init__(self, spec: TaskSpec, run: RunOptions):
        torch.manual_seed(run.seed)
        self.device = _torch_device(run.device)
        super().__init__(GruImdbNet(spec),
                         lambda parameters: torch.optim.Adam(parameters, lr=run.learning_rate, betas=(0.9, 0.999),
                                                             eps=1e-8),
                         run)

    def _inputs(self, tokens: np.ndarray) -> torch.Tensor:
        return _host_to_device(_as_tensor(tokens), self.device).long()


class DenseLayer(nn.Module):
    """BN-ReLU-conv1×1 (the bottleneck's width) then BN-ReLU-conv3×3 (growth new channels)."""

    def __init__(self, channels: int, growth: int, width: int):
        super().__init__()
        self.norm1, self.relu1 = _batch_norm(channels), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(channels, width, 1, bias=False)
        self.norm2, self.relu2 = _batch_norm(width), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, growth, 3, padding=1, bias=False)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    """Each layer sees the concatenation of the block's input and every earlier layer's output."""

    def __init__(self, layers: int, channels: int, growth: int, width: int):
        super().__init__({f"denselayer{i + 1}": DenseLayer(channels + i * growth, growth, width)
                          for i in range(layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, channels: int, out: int):
        super().__init__(OrderedDict(norm=_batch_norm(channels), relu=nn.ReLU(inplace=True),
                                     conv=nn.Conv2d(channels, out, 1, bias=False),
                                     pool=nn.AvgPool2d(2, stride=2)))


class DenseNet121(nn.Module):
    """torchvision's densenet121 (same structure and names) with the task's head."""

    def __init__(self, spec: TaskSpec):
        super().__init__()
        channels = DENSENET121.stem
        self.features = nn.Sequential(OrderedDict(
            conv0=nn.Conv2d(spec.input_shape[0], channels, 7, stride=2, padding=3, bias=False),
            norm0=_batch_norm(channels), relu0=nn.ReLU(inplace=True), pool0=nn.MaxPool2d(3, stride=2, padding=1)))
        for index, layers in enumerate(DENSENET121.blocks, start=1):
            self.features.add_module(f"denseblock{index}", DenseBlock(layers, channels, DENSENET121.growth,
                                                                      DENSENET121.bottleneck_width))
            channels += layers * DENSENET121.growth
            if index < len(DENSENET121.blocks):
                out = int(channels * DENSENET121.compression)
                self.features.add_module(f"transition{index}", Transition(channels, out))
                channels = out
        self.features.add_module("norm5", _batch_norm(channels))
        self.classifier = nn.Linear(channels, spec.num_classes)  # logits: the sigmoid lives in the loss
        _initialise(self, conv=DENSENET121.conv_init, dense=DENSENET121.dense_kernel_init,
                    bias=DENSENET121.dense_bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.features(x))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ChestXrayImages(torch.utils.data.Dataset):
    """PNG files decoded with Pillow: RGB, resized to stored_size, cropped to crop_size (random
    crop and horizontal flip when training, centre crop otherwise), float32 [0, 1] CHW."""

    def __init__(self, files: ImageFiles, stored_size: int, crop_size: int, training: bool, seed: int):
        self.paths, self.labels = files.paths, files.labels
        self.stored_size, self.crop_size = stored_size, crop_size
        self.training, self.seed = training, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[index]) as image:
            image = image.convert("RGB")  # grayscale, RGB or RGBA files
        if image.size != (self.stored_size, self.stored_size):
            image = image.resize((self.stored_size, self.stored_size), Image.Resampling.BILINEAR)
        margin = self.stored_size - self.crop_size
        if self.training:
            # Seeded by (epoch seed, example): the same augmentation whichever loader worker runs it.
            rng = np.random.default_rng((self.seed, index))
            left, top = rng.integers(0, margin + 1, size=2)
            flip = rng.random() < 0.5
        else:
            left = top = int(round(margin / 2))
            flip = False
        image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        return torch.from_numpy(pixels).permute(2, 0, 1), torch.from_numpy(self.labels[index])


# The DenseNet instance whose worker processes and process group are alive: one at a time.
_live_densenet: Densenet121Xray | None = None
# How long a rank waits for the others at start-up and in a collective before failing.
_COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def _distributed_backend(device: str) -> str:
    return "nccl" if device == "gpu" else "gloo"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DensenetReplica:
    """One rank of the data-parallel model: rank 0 runs in the bench's process, ranks 1..N-1 each
    in a worker process. With several ranks the module is wrapped in DistributedDataParallel,
    which all-reduces (averages) the gradients during backward, so every rank's Adam step keeps
    the replicas identical. Each rank loads its own shard of every global batch: from its own
    DataLoader over its partition of the files, or as rows of the array data it holds."""

    def __init__(self, spec: TaskSpec, run: RunOptions, rank: int):
        self.rank, self.ranks = rank, run.devices
        self.device = _torch_device(run.device, rank)  # GPU: rank r uses the r-th visible GPU
        self.layout, self.memory_format = _image_format(run.device)
        self.crop_size = run.input_shape[-1]
        # The run's loader workers decode a global batch: each rank's loader has its share.
        self.loader_workers = max(1, run.loader_workers // run.devices)
        torch.manual_seed(run.seed)  # the same initial weights on every rank
        model = DenseNet121(spec).to(self.device, memory_format=self.memory_format)
        self.model = _compiled(model, run)  # scoring (rank 0), and training on one device
        self.replica: nn.Module = self.model
        if run.devices > 1:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(_distributed_backend(run.device), rank=rank, world_size=run.devices,
                                    timeout=_COLLECTIVE_TIMEOUT)
            # Compiled once wrapped, as PyTorch's DDP notes ask: TorchDynamo then splits the graph
            # at DDP's gradient buckets (DDPOptimizer), so their all-reduces still overlap backward.
            self.replica = _compiled(DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None), run)
        self.criterion = nn.BCEWithLogitsLoss()  # mean over labels and examples
        self.optimizer = torch.optim.Adam(self.replica.parameters(), lr=run.learning_rate)
        self.mixed = MixedPrecision(run, self.device)  # a scaler per rank, all seeing the same reduced gradients
        self.last_loss = torch.zeros((), device=self.device)
        self.shards: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None  # this epoch's, from the loader
        self.next_step: LoaderStep | None = None
        self.arrays: tuple[np.ndarray, np.ndarray] | None = None  # inputs and labels the batches are rows of

    def start_epoch(self, files: ImageFiles, stored_size: int, batch_size: int, seed: int) -> int:
        """Start this rank's loader over its partition of the epoch's shuffled files: the
        partitions of DistributedSampler, whose shards of step k make up global batch k of the
        order the seed draws. Returns the steps of the epoch, the same on every rank."""
        images = ChestXrayImages(files, stored_size, self.crop_size, True, seed)
        sampler = torch.utils.data.DistributedSampler(images, num_replicas=self.ranks, rank=self.rank,
                                                      shuffle=True, seed=seed, drop_last=True)
        loader = torch.utils.data.DataLoader(
            images, batch_size=batch_size // self.ranks, sampler=sampler, drop_last=True,
            num_workers=self.loader_workers, pin_memory=self.device.type == "cuda")  # pinned: asynchronous copies
        self.shards, self.next_step = iter(loader), LoaderStep(seed, 0)
        return len(loader)

    def train_on_next_shard(self, step: LoaderStep) -> None:
        if step != self.next_step:
            raise RuntimeError(f"rank {self.rank} is at {self.next_step} of its loader, asked for {step}")
        self.next_step = LoaderStep(step.seed, step.step + 1)
        self.train_step(*next(self.shards))

    def hold_arrays(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.arrays = inputs.numpy(), labels.numpy()

    def train_on_rows(self, batch: Rows) -> None:
        """This rank's share of a global batch of the arrays held."""
        share = rank_share(batch, self.rank, self.ranks)
        inputs, labels = self.arrays
        self.train_step(inputs[share], labels[share])

    def train_step(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> None:
        self.replica.train()
        x = _to_device(images, self.layout, self.device, self.memory_format)
        y = _host_to_device(_as_tensor(labels), self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with self.mixed.autocast():
            loss = self.criterion(self.replica(x), y)
        # DDP: the gradients' all-reduce overlaps with backward.
        self.mixed.backward_and_step(loss, self.optimizer)
        self.last_loss = loss.detach()

    def mean_loss(self) -> torch.Tensor:
        """The last step's loss averaged over the ranks (a collective: every rank calls it)."""
        if self.ranks == 1:
            return self.last_loss
        loss = self.last_loss.clone()
        dist.all_reduce(loss)
        return loss / self.ranks


def _replica_worker(rank: int, spec: TaskSpec, run: RunOptions, threads: int, interop_threads: int,
                    commands: mp.Queue) -> None:
    """Rank ``rank``'s process: runs the methods rank 0 names, (method, arguments), until told
    to stop (None), or until rank 0's process has gone."""
    # Spawning made "spawn" this process's default: its loaders' workers start the platform's
    # way instead (fork on Linux), as on rank 0, not as fresh interpreters every epoch.
    mp.set_start_method(mp.get_all_start_methods()[0], force=True)
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(interop_threads)
    _set_math_modes(run)
    replica = DensenetReplica(spec, run, rank)
    parent = mp.parent_process()
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
        getattr(replica, method)(*arguments)
    dist.destroy_process_group()


class Densenet121Xray(RankGroup):
    parameter_note = None

    def __init__(self, spec: TaskSpec, run: RunOptions):
        global _live_densenet
        if _live_densenet is not None:  # full mode builds a fresh model per repeat
            _live_densenet.close()
        self.devices = run.devices
        self.crop_size = run.input_shape[-1]
        self.loader_workers = run.loader_workers
        self.layout, _ = _image_format(run.device)
        self.workers: list[mp.Process] = []
        self.commands: list[mp.Queue] = []
        if run.devices > 1:
            self._start_workers(spec, run)
            _live_densenet = self
        self.rank0 = DensenetReplica(spec, run, rank=0)
        self.device = self.rank0.device
        self.held: tuple[np.ndarray, np.ndarray] | None = None  # the arrays every rank holds

    def _start_workers(self, spec: TaskSpec, run: RunOptions) -> None:
        """One process per further replica (spawned: a clean interpreter, safe with CUDA), each
        with this process's share of the threads (configure). Not daemons: their loaders start
        worker processes of their own."""
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
        context = mp.get_context("spawn")
        for rank in range(1, run.devices):
            commands = context.Queue()
            worker = context.Process(target=_replica_worker, name=f"densenet-rank{rank}",
                                     args=(rank, spec, run, torch.get_num_threads(),
                                           torch.get_num_interop_threads(), commands))
            worker.start()
            self.workers.append(worker)
            self.commands.append(commands)

    def close(self) -> None:
        """Stop the worker processes and leave the process group (a no-op with one device)."""
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
        if dist.is_initialized():
            dist.destroy_process_group()
        if _live_densenet is self:
            _live_densenet = None

    def parameter_count(self) -> int:
        return _parameter_count(self.rank0.model)

    def shared(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).share_memory_()  # the ranks map one copy

    def loss(self) -> float:
        """The last step's loss, averaged over the replicas once every rank has finished it."""
        return _read_loss(self._on_every_rank("mean_loss"), self.device)

    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Label probabilities, on rank 0's replica (all replicas hold the same weights)."""
        model = self.rank0.model.eval()  # batch norm: running statistics
        with torch.inference_mode(), self.rank0.mixed.autocast():
            x = _to_device(images, self.layout, self.device, self.rank0.memory_format)
            return torch.sigmoid(model(x).float()).cpu().numpy()

    def input_pipeline(self, files: ImageFiles, stored_size: int, batch_size: int, training: bool,
                       seed: int) -> Iterable[tuple[LoaderStep, None] | tuple[torch.Tensor, torch.Tensor]]:
        """Training: a LoaderStep per global batch, every rank decoding its own shard. Otherwise
        (scoring, on rank 0 alone, with all the loader workers): the files in order, decoded."""
        if training:
            return self._loader_steps(files, stored_size, batch_size, seed)
        images = ChestXrayImages(files, stored_size, self.crop_size, False, seed)
        return torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=self.loader_workers,
                                           pin_memory=self.device.type == "cuda")

    def _loader_steps(self, files: ImageFiles, stored_size: int, batch_size: int,
                      seed: int) -> Iterator[tuple[LoaderStep, None]]:
        steps = self._on_every_rank("start_epoch", files, stored_size, batch_size, seed)
        for step in range(steps):
            yield LoaderStep(seed, step), None


@atexit.register
def _close_live_densenet() -> None:
    """Stop the workers cleanly when the bench exits."""
    if _live_densenet is not None:
        _live_densenet.close()


TASKS = {"cnn_cifar10": CnnCifar10, "resnet50_inference": Resnet50Inference, "gru_imdb": GruImdb,
         "densenet121_xray": Densenet121Xray}
