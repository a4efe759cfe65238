"""Device and dtype policy: where the model runs and in which precision, decided once."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from shared.errors import ModelLoadError

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str) -> torch.device:
    """CLIP_DEVICE resolved: auto means CUDA when there is one."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CLIP_DEVICE=cuda but no CUDA device is visible", code="no_cuda")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def fast_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), as Linux reports it.

    Elsewhere bfloat16 is emulated and slower than float32.
    """
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """CLIP_DTYPE resolved: auto is float16 on CUDA, bfloat16 on CPUs that compute it
    natively (about 3.5x faster here; see BENCHMARKS.md for what it changes), else float32."""
    if requested == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if fast_bfloat16() else torch.float32
    return _DTYPES[requested]


def _has_int8() -> bool:
    """Whether this torch has the eager int8 path (torch.ao dynamic quantization) and an engine
    for it (fbgemm/x86 on x86-64, qnnpack on ARM). torch says the API will move to torchao."""
    quantization = getattr(torch.ao, "quantization", None)
    if quantization is None or not hasattr(quantization, "quantize_dynamic"):
        return False
    return bool(set(torch.backends.quantized.supported_engines) - {"none"})


def int8_text(requested: str, *, dtype: str, device: torch.device) -> bool:
    """CLIP_TEXT_QUANT resolved: auto is int8 on CPUs unless CLIP_DTYPE=float32 asks for exact
    answers, and only where torch can do it; an explicit int8 it cannot do is an error."""
    if requested == "none":
        return False
    if device.type != "cpu":
        if requested == "int8":
            log.warning("CLIP_TEXT_QUANT=int8 applies on CPUs only; %s keeps CLIP_DTYPE", device)
        return False
    if requested == "int8":
        if not _has_int8():
            raise ModelLoadError(
                "CLIP_TEXT_QUANT=int8 but this torch build has no eager int8 path "
                "(torch.ao.quantization with an int8 engine); set CLIP_TEXT_QUANT=none",
                code="no_int8_engine",
            )
        return True
    return dtype != "float32" and _has_int8()
