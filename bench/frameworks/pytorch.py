"""PyTorch: nn.Module models, torch.optim optimisers, an eager training loop."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..specs import RunOptions, TaskSpec


def describe(run: RunOptions) -> dict:
    on_gpu = run.device == "gpu"
    return {
        "framework": "pytorch",
        "framework_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.version.cuda if on_gpu else None,
        "cudnn": str(torch.backends.cudnn.version()) if on_gpu else None,
        "framework_settings": {"cudnn_benchmark": torch.backends.cudnn.benchmark},
    }


def configure(run: RunOptions) -> None:
    torch.manual_seed(run.seed)
    if run.threads:
        torch.set_num_threads(run.threads)
        torch.set_num_interop_threads(run.threads)
    # The cuDNN autotuner picks the fastest convolution algorithm for fixed shapes.
    torch.backends.cudnn.benchmark = run.device == "gpu"


def _torch_device(device: str) -> torch.device:
    return torch.device("cuda" if device == "gpu" else "cpu")


def _glorot_uniform(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


class CnnCifar10Net(nn.Module):
    def __init__(self, spec: TaskSpec):
        super().__init__()
        channels = spec.input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, 50, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(50, 50, kernel_size=3, padding=1), nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(0.25),
            nn.Conv2d(50, 100, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(100, 100, kernel_size=3, padding=1), nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(0.25),
        )
        height, width = spec.input_shape[1] // 4, spec.input_shape[2] // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(100 * height * width, 512), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(512, spec.num_classes),  # logits: softmax lives in the loss
        )
        self.apply(_glorot_uniform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CnnCifar10:
    parameter_note = None

    def __init__(self, spec: TaskSpec, run: RunOptions):
        torch.manual_seed(run.seed)
        device = run.device
        self.device = _torch_device(device)
        # NCHW for cuDNN; channels-last is PyTorch's fastest CPU layout (oneDNN).
        self.memory_format = torch.contiguous_format if device == "gpu" else torch.channels_last
        self.layout = "NCHW" if device == "gpu" else "NHWC"
        self.model = CnnCifar10Net(spec).to(self.device, memory_format=self.memory_format)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=spec.learning_rate, momentum=spec.momentum)
        self._last_loss: torch.Tensor | None = None

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def _to_device(self, images: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(images)
        if self.layout == "NHWC":
            tensor = tensor.permute(0, 3, 1, 2)  # a channels-last view of NCHW: no copy
        return tensor.to(self.device, memory_format=self.memory_format)

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.model.train()
        x = self._to_device(images)
        y = torch.from_numpy(labels).long().to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.criterion(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self._last_loss = loss.detach()

    def loss(self) -> float:
        """The last step's loss, after the device has finished all queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return float(self._last_loss)

    def predict(self, images: np.ndarray) -> np.ndarray:
        self.model.eval()  # dropout off
        with torch.inference_mode():
            return self.model(self._to_device(images)).cpu().numpy()


TASKS = {"cnn_cifar10": CnnCifar10}
