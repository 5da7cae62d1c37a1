"""The canonical weights file: one ``.npz`` with torchvision's parameter names and shapes
(convolution kernels O×I×kH×kW, dense kernels out×in), float32. Every framework maps these
names onto its own layers, so the same file gives the same network everywhere — which is
also how the tests prove that the frameworks build the same architecture.

Only ResNet-50 v1.5 has a canonical file: the seed's feature extractor used pretrained
weights, and timing does not depend on their values.
"""
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from .specs import RESNET50

Shapes = Dict[str, Tuple[int, ...]]



def _batch_norm(shapes: Shapes, name: str, channels: int) -> None:
    for field in ("weight", "bias", "running_mean", "running_var"):
        shapes["{}.{}".format(name, field)] = (channels,)


def resnet50_shapes() -> Shapes:
    """Every tensor of ResNet-50 v1.5 up to global average pooling, in torchvision's order
    (stage ``layerN``, block ``M``; the first block of each stage has a ``downsample``
    projection; v1.5 strides the 3×3 ``conv2``)."""
    shapes = OrderedDict()  # type: Shapes
    shapes["conv1.weight"] = (RESNET50.stem, 3, 7, 7)
    _batch_norm(shapes, "bn1", RESNET50.stem)
    channels = RESNET50.stem
    for stage, (width, blocks) in enumerate(RESNET50.stages, start=1):
        for block in range(blocks):
            prefix = "layer{}.{}".format(stage, block)
            shapes[prefix + ".conv1.weight"] = (width, channels, 1, 1)
            _batch_norm(shapes, prefix + ".bn1", width)
            shapes[prefix + ".conv2.weight"] = (width, width, 3, 3)
            _batch_norm(shapes, prefix + ".bn2", width)
            shapes[prefix + ".conv3.weight"] = (width * RESNET50.expansion, width, 1, 1)
            _batch_norm(shapes, prefix + ".bn3", width * RESNET50.expansion)
            if block == 0:
                shapes[prefix + ".downsample.0.weight"] = (width * RESNET50.expansion, channels, 1, 1)
                _batch_norm(shapes, prefix + ".downsample.1", width * RESNET50.expansion)
            channels = width * RESNET50.expansion
    return shapes


def load(path: str, shapes: Shapes) -> Dict[str, np.ndarray]:
    """Read a canonical weights file, checking that it holds exactly ``shapes``."""
    path = Path(path)
    try:
        with np.load(str(path), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise ValueError("{}: not a readable .npz weights file ({})".format(path, error)) from None
    missing = [name for name in shapes if name not in arrays]
    if missing:
        raise ValueError("{}: {} tensors are missing, {} the first; the file must use torchvision's "
                         "names".format(path, len(missing), missing[0]))
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            raise ValueError("{}: {} has shape {}, expected {}".format(path, name, arrays[name].shape, shape))
    return OrderedDict((name, arrays[name].astype(np.float32)) for name in shapes)


def random_weights(shapes: Shapes, seed: int) -> Dict[str, np.ndarray]:
    """He-initialised kernels, batch-norm statistics near (0, 1): a stand-in for pretrained
    weights that keeps activations finite through all 50 layers."""
    rng = np.random.default_rng(seed)
    weights = OrderedDict()
    for name, shape in shapes.items():
        if name.endswith("running_var"):
            weights[name] = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("running_mean") or name.endswith(".bias"):
            weights[name] = rng.normal(0.0, 0.1, shape)
        elif len(shape) == 1:  # batch-norm scale
            weights[name] = rng.uniform(0.5, 1.0, shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            weights[name] = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    return OrderedDict((name, value.astype(np.float32)) for name, value in weights.items())
