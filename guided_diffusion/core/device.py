"""Devices and matmul precision: ``--device`` resolved, fast-bf16 probing and the autocast context.

The denoiser's matrix multiplications run in bf16 (``--precision``), and by default with it the count
decoder's output layer (``--decoder_precision``, :func:`VAE.VAE_model.output_layer_logits`); the diffusion
updates, the softmax, the count draws and everything written to disk stay float32.
"""
import torch

from guided_diffusion.core.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16")
OUT_OF_MEMORY_ERRORS = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))


def has_fast_bf16(device):
    """True where bfloat16 matmuls run natively: CUDA devices that support them, CPUs with AMX or
    AVX512-BF16 (elsewhere bf16 is emulated and slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def resolve_precision(precision, device):
    """``auto`` -> ``bf16`` where the device has fast bf16 matmuls, else ``fp32``."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if has_fast_bf16(device) else "fp32"
    return precision


def matmul_precision(precision, device):
    """A context in which matrix multiplications run in ``precision`` (bf16: torch.autocast; the
    elementwise math, LayerNorm, softmax and the diffusion updates stay float32)."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                          enabled=resolve_precision(precision, device) == "bf16")


def resolve_device(name):
    """Turn ``auto|cpu|cuda`` (or ``cuda:N``) into a torch.device, refusing CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no CUDA device is available; use --device cpu")
    return torch.device(name)


