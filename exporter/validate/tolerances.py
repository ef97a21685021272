"""The one table of numeric tolerances, by dtype. Every numeric check in code and tests reads it.

fp32: the compact model and its ONNX must reproduce the masked+merged PyTorch reference to 1e-4
max abs error (issue 3). Rewritten graphs vs their input graph use the same fp32 bound.
int8: quantized models are judged by statistics, not elementwise bounds: mean token cosine.
bf16 (OpenVINO's bf16 inference precision, a CPU engine candidate): 8 mantissa bits against fp16's 10,
so no elementwise bound; mean token cosine as fp16.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    max_abs: float | None = None
    min_mean_cosine: float | None = None


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-4),
    "fp16": Tolerance(max_abs=2e-2, min_mean_cosine=0.999),
    "bf16": Tolerance(min_mean_cosine=0.999),
    "int8": Tolerance(min_mean_cosine=0.99),
}


def tolerance(dtype: str) -> Tolerance:
    """The tolerance for `dtype` ("fp32", "fp16", "int8")."""
    return TOLERANCES[dtype]
