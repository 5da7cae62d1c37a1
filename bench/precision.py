"""The precision axis: what each precision means, the checks every framework shares, and the
record of the math modes a cell ran with.

    fp32    float32 data and arithmetic; TF32 tensor-core math off (what fp32 meant before Ampere)
    tf32    float32 data; convolutions and matrix products in TF32 on tensor cores (Ampere and newer)
    fp16    mixed precision: float32 weights and optimiser, layers computing in float16, the loss
            scaled dynamically (float16's range is too small for small gradients)
    bf16    mixed precision: float32 weights and optimiser, layers computing in bfloat16 (float32's
            range: no loss scaling)

Framework defaults differ: PyTorch lets cuDNN convolutions use TF32 on Ampere and newer but not
matrix products, XLA (JAX) and TensorFlow use it for both. Each framework module therefore sets
its own switches from the cell's precision, and reports what is in force with ``math_modes``.
"""
import os
from typing import Any, Dict, MutableMapping, Optional

from .specs import Unsupported

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
# Mixed precisions: the dtype the layers compute in.
COMPUTE_DTYPES = {"fp32": "float32", "tf32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Tensor-core formats that need compute capability 8.0 (Ampere) or newer.
AMPERE_FORMATS = ("tf32", "bf16")
# Why a precision no framework offers on a CPU is missing there.
NOT_ON_CPU = {"tf32": "TF32 is a tensor-core format of NVIDIA GPUs",
              "fp16": "float16 arithmetic is a GPU format; CPUs take bf16"}


def is_mixed(precision: str) -> bool:
    return COMPUTE_DTYPES[precision] != "float32"


def check_tensor_cores(precision: str, compute_capability: Optional[str]) -> None:
    """Raise Unsupported (the cell is skipped, saying why) when the GPU predates the tensor
    cores the precision needs. What each framework offers is checked before (specs.FRAMEWORK_SPECS)."""
    if precision in AMPERE_FORMATS and compute_capability:
        major, minor = (int(part) for part in compute_capability.split(".")[:2])
        if (major, minor) < (8, 0):
            raise Unsupported("{} needs the tensor cores of compute capability 8.0 (Ampere) or newer; "
                              "this GPU's is {}".format(precision, compute_capability))


def set_tf32_override(precision: str, environ: MutableMapping[str, str] = os.environ) -> None:
    """NVIDIA_TF32_OVERRIDE=0 keeps cuBLAS and cuDNN out of TF32 whatever a framework asks: the
    guarantee behind fp32 (and behind the float32 parts of mixed precision), also for frameworks
    without a switch of their own. The libraries read it when they load, so this runs before the
    framework is imported; a tf32 cell removes it, so that a value inherited from the host cannot
    turn TF32 off unseen."""
    if precision == "tf32":
        environ.pop("NVIDIA_TF32_OVERRIDE", None)
    else:
        environ["NVIDIA_TF32_OVERRIDE"] = "0"


def math_modes(precision: str, tf32_matmul: Optional[bool], tf32_convolutions: Optional[bool],
               loss_scaling: Optional[str], autotuner: Optional[bool], xla: Optional[bool],
               compiler: Optional[str]) -> Dict[str, Any]:
    """The math modes in force, the same keys for every framework (None: no such switch, or
    not on this device): the dtype layers compute in, and the one the optimiser keeps the
    weights in (its master copy); whether matrix products and convolutions may use TF32; the
    loss scaling of fp16 ("dynamic"); whether the cuDNN or XLA autotuner picks algorithms;
    whether the model is compiled by XLA; the compiler the model runs through, if any (the
    cell's compile profile decides it, specs.FrameworkSpec)."""
    return {
        "compute_dtype": COMPUTE_DTYPES[precision],
        "weights_dtype": "float32",
        "tf32_matmul": tf32_matmul,
        "tf32_convolutions": tf32_convolutions,
        "loss_scaling": loss_scaling,
        "autotuner": autotuner,
        "xla": xla,
        "compiler": compiler,
        "nvidia_tf32_override": os.environ.get("NVIDIA_TF32_OVERRIDE"),
    }
