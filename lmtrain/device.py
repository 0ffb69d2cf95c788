"""Device and precision: which device to run on, in which dtype, and what it can do.

One home for everything that depends on the hardware, shared by training, sampling, evaluation
and the benchmarks:

    resolve_device("auto")         cuda (this process's GPU under torchrun), else mps, else cpu
    resolve_precision("auto", d)   bf16 on GPUs that have it, fp16 on older ones, fp32 on CPU
    autocast(d, dtype)             the autocast context for a precision (none for fp32)
    inference_amp_dtype(p, d)      sampling/eval: the training precision on a GPU, fp32 on CPU
    peak_tflops(d), memory_mb(d), synchronize(d)   for MFU, memory curves and timing

Errors name the option the user typed (``option``): ``lmtrain sample --device cuda`` on a
machine without CUDA speaks of ``--device``, ``lmtrain train`` of ``train.device``.
"""

from __future__ import annotations

import contextlib
import resource

import torch

from lmtrain.errors import ConfigError

# Autocast dtype of each precision setting; fp32 means no autocast.
AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}

# Dense bf16 peak TFLOP/s of common GPUs, for MFU (train.peak_tflops overrides).
PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0,
    "A100": 312.0, "A800": 312.0, "A6000": 155.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "A10G": 70.0, "A10": 125.0, "4090": 165.0, "3090": 71.0, "V100": 125.0, "T4": 65.0,
}


def resolve_device(setting: str, option: str = "train.device", local_rank: int = 0) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``mps`` -> a device that exists here (``ConfigError`` if not)."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if setting == "cuda" or setting.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{option}: {setting} was asked for, but torch sees no CUDA device")
        return torch.device(setting) if ":" in setting else torch.device("cuda", local_rank)
    if setting == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option}: mps was asked for, but it is not available")
    if setting not in ("cpu", "mps"):
        raise ConfigError(f"{option}: must be auto, cpu, cuda, cuda:N or mps; got {setting!r}")
    return torch.device(setting)


def resolve_precision(setting: str, device: torch.device, option: str = "train.precision") -> str:
    """``auto``, ``bf16``, ``fp16`` or ``fp32`` -> the precision training runs in on ``device``."""
    if setting == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if setting == "fp16" and device.type == "cpu":
        raise ConfigError(f"{option}: fp16 needs a GPU; use bf16 or fp32 on CPU")
    return setting


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Autocast to ``amp_dtype`` on ``device``; no autocast (full precision) when it is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def inference_amp_dtype(training_precision: str, device: torch.device) -> torch.dtype | None:
    """Sampling and evaluation run in the training precision on a GPU and in fp32 on a CPU, where
    reduced-precision matmuls are slower, not faster."""
    return AMP_DTYPES.get(training_precision) if device.type == "cuda" else None


def enable_fast_matmul(device: torch.device) -> None:
    """TF32 for fp32 matmuls on CUDA: what every trainer of this size does, for a large speedup."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak for MFU: ``override``, else the table, else unknown (None)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated on the GPU, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU): needed before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
