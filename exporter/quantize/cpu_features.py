"""Does this CPU's integer GEMM saturate u8 x s8 products? It decides the CPU INT8 file's weight range.

ONNX Runtime's u8 (activation) x s8 (weight) GEMM on x86 CPUs with AVX2 or AVX-512 but without VNNI
multiplies with VPMADDUBSW, which adds two adjacent u8·s8 products into a *saturating* int16: with
full-range weights, 2 · 255 · 127 = 64 770 > 32 767, so large activations meeting large weights are
clipped. VNNI (AVX512-VNNI, AVX-VNNI) and AMX accumulate in int32 and do not saturate; ARM's dot-product
kernels neither. ONNX Runtime's quantization guide gives the remedy: `reduce_range`, i.e. 7-bit weights
(2 · 255 · 64 = 32 640 fits). Measured on an AVX2-only AMD EPYC (this project's CI machine on
2026-11-27): a tiny pruned Llama's CPU INT8 held-out cosine 0.987 with 8-bit weights (the export's gate
refused it), 0.9988 with 7-bit; 7-bit costs no speed (demo model: 8-bit 1.01-1.02x the 7-bit latency),
while u8 weights (ONNX Runtime's U8U8 kernels, also saturation-free) measured 1.11-1.12x slower.

The file is built, and its accuracy gated, on the build machine; a file deployed to another CPU may
meet the other kernel. `auto` follows the build machine; `reduced` is the portable choice.
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Literal

WeightRange = Literal["auto", "full", "reduced"]
WEIGHT_RANGES: tuple[WeightRange, ...] = ("auto", "full", "reduced")
NON_SATURATING_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclasses.dataclass(frozen=True)
class IntegerGemm:
    """What was found about this CPU's u8 x s8 dot product."""

    isa: str  # e.g. "x86_64 avx512_vnni", "x86_64 avx2 (no VNNI)", "aarch64"
    saturates: bool | None  # None: could not tell


def detect(cpuinfo: Path = Path("/proc/cpuinfo"), machine: str | None = None) -> IntegerGemm:
    """Read the CPU's flags (Linux) and say whether ONNX Runtime's u8 x s8 kernel saturates here."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return IntegerGemm(machine, saturates=False)
    if machine not in ("x86_64", "amd64"):
        return IntegerGemm(machine or "unknown", saturates=None)
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return IntegerGemm(f"{machine} (flags unreadable)", saturates=None)
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    found = [flag for flag in NON_SATURATING_FLAGS if flag in flags]
    if found:
        return IntegerGemm(f"{machine} {' '.join(found)}", saturates=False)
    if not flags:
        return IntegerGemm(f"{machine} (no flags listed)", saturates=None)
    simd = "avx512bw" if "avx512bw" in flags else "avx2" if "avx2" in flags else "sse"
    return IntegerGemm(f"{machine} {simd} (no VNNI)", saturates=True)


def reduce_weight_range(choice: WeightRange, gemm: IntegerGemm | None = None) -> tuple[bool, str]:
    """(7-bit weights?, why) for the CPU INT8 file."""
    if choice == "full":
        return False, "8-bit weights as asked (--cpu-int8-weights full)"
    if choice == "reduced":
        return True, "7-bit weights as asked (--cpu-int8-weights reduced)"
    gemm = gemm or detect()
    if gemm.saturates is False:
        return False, f"8-bit weights: this CPU ({gemm.isa}) accumulates u8 x s8 in int32 (no saturation)"
    if gemm.saturates:
        return True, (
            f"7-bit weights: this CPU ({gemm.isa}) adds u8 x s8 pairs in saturating int16 (VPMADDUBSW); "
            "full-range weights would clip"
        )
    return (
        True,
        f"7-bit weights: could not tell whether this CPU ({gemm.isa}) saturates u8 x s8, so the safe range",
    )
