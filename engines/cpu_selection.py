"""The CPU engine, chosen by measurement: which (runtime, file) candidates apply here, and which one wins.

TensorRT picks its tactics by timing them; on a machine without TensorRT the export picks the CPU
engine the same way. Candidates are (runtime, file, precision) triples over files the export writes:

| candidate          | runtime      | file                       | judged as |
|--------------------|--------------|----------------------------|-----------|
| openvino-int8      | OpenVINO     | model.int8.openvino.onnx   | int8      |
| onnxruntime-int8   | ONNX Runtime | model.int8.cpu.onnx        | int8      |
| onnxruntime-int4   | ONNX Runtime | model.int4.cpu.onnx        | int4      |
| openvino-bf16      | OpenVINO     | model.exported.onnx (bf16) | bf16      |
| onnxruntime-fp32   | ONNX Runtime | model.onnx                 | fp32      |
| openvino-fp32      | OpenVINO     | model.exported.onnx        | fp32      |

A candidate applies when its file was written, its runtime is installed, and (bf16) the CPU computes
bf16 natively (AVX512-BF16 or AMX-BF16; elsewhere OpenVINO would emulate it in fp32 arithmetic).
Where the CPU computes bf16 natively, OpenVINO's INT8 candidate runs the layers its file keeps in float
(softmax, LayerNorm, GELU, the attention's probabilities x values) with the bf16 precision hint
(`int8_engine_precision`), as OpenVINO itself defaults to on such CPUs. Measured on a Sapphire Rapids (AMX)
Xeon (README "CPU engine"): at 8x128 0.99-1.05x (four runs) for NNCF's recipe and 1.12x (one run) for
the Q/DQ recipe (whose weight-only layers are float GEMMs), within noise at 1x128 (0.93-1.04x), the same
token cosine to 4 digits;
the INT8 gate still judges it as OpenVINO computes it, so a model that bf16 hurts fails with the numbers.
Every applicable candidate is measured by the caller (latency at the export's shapes, interleaved;
accuracy on the export's validation inputs as *that* runtime computes it) and `choose` picks the
fastest one that passes its precision's gate. Everything here is pure code over those numbers, so the
rules are unit-tested for every CPU kind by feeding flags. The order of `CANDIDATES` is the default
order: what `choose` takes when nothing was timed (`--no-benchmark`), and the tie-break.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export_errors import InputError, ValidationError

if TYPE_CHECKING:
    from engines.base import Runner

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to run the model on a CPU: runtime, the artifact it runs (first key present), precision."""

    name: str
    engine: str  # "onnxruntime" | "openvino"
    artifacts: tuple[str, ...]  # artifact keys of the export, in preference order
    precision: str  # the gate's dtype: "int8", "int4", "bf16", "fp32"
    note: str
    engine_precision: str | None = None  # OpenVINO's inference precision hint ("f32", "bf16")

    def runner_options(self) -> dict[str, Any]:
        """Keyword arguments for `engines.load_runner` besides the path and threads."""
        return {
            "backend": self.engine,
            **({"precision": self.engine_precision} if self.engine_precision else {}),
        }


CANDIDATES: tuple[Candidate, ...] = (
    Candidate(
        "openvino-int8",
        "openvino",
        ("int8_openvino", "int8"),
        "int8",
        "OpenVINO INT8 kernels on its INT8 file (NNCF's transformer recipe where nncf is installed, "
        "else the Q/DQ file's static s8 activations x per-channel s8 weights)",
        "f32",
    ),
    Candidate(
        "onnxruntime-int8",
        "onnxruntime",
        ("int8_cpu",),
        "int8",
        "ONNX Runtime integer kernels (dynamic u8 activations x s8 weights)",
    ),
    Candidate(
        "onnxruntime-int4", "onnxruntime", ("int4_cpu",), "int4", "ONNX Runtime MatMulNBits (4-bit weights)"
    ),
    Candidate(
        "openvino-bf16", "openvino", ("exported",), "bf16", "OpenVINO bf16 inference precision", "bf16"
    ),
    Candidate("onnxruntime-fp32", "onnxruntime", ("onnx",), "fp32", "ONNX Runtime fp32, the optimized graph"),
    Candidate(
        "openvino-fp32", "openvino", ("exported",), "fp32", "OpenVINO fp32 on the exported graph", "f32"
    ),
)
NAMES: tuple[str, ...] = tuple(c.name for c in CANDIDATES)


def candidate(name: str) -> Candidate:
    """The candidate called `name`; an unknown name is an `InputError` on `--cpu-engine` with the choices."""
    for found in CANDIDATES:
        if found.name == name:
            return found
    raise InputError("--cpu-engine", f"unknown CPU engine {name!r}; choose one of {list(NAMES)}")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()


def bf16_unsupported_reason(flags: Collection[str]) -> str | None:
    """None when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), else why bf16 is not a candidate."""
    if any(flag in flags for flag in BF16_FLAGS):
        return None
    return "this CPU has neither AVX512-BF16 nor AMX-BF16: bf16 would be emulated, not faster"


def int8_engine_precision(flags: Collection[str]) -> str:
    """OpenVINO's inference precision for an INT8 file's float layers: bf16 where the CPU computes bf16
    natively (measured faster, same accuracy; see the module docstring), else f32."""
    return "f32" if bf16_unsupported_reason(flags) else "bf16"


def cpu_kind(flags: Collection[str]) -> str:
    """A short name of what matters here: VNNI (INT8 dot products), BF16, AMX."""
    shown = [
        f
        for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
        if f in flags
    ]
    return " ".join(shown) or "no x86 SIMD flags listed"


@dataclasses.dataclass(frozen=True)
class Applicable:
    """A candidate that can run here, on this file."""

    candidate: Candidate
    path: Path


def applicable(
    artifacts: Mapping[str, Path],
    *,
    unavailable: Mapping[str, str | None],
    flags: Collection[str],
    backend: str = "auto",
    pinned: str | None = None,
    precision: str = "int8",
) -> tuple[list[Applicable], dict[str, str]]:
    """The candidates to measure, and for every other one why not.

    `unavailable`: runtime -> None when it runs here, else the reason (e.g. `openvino_unavailable_reason()`).
    `backend`: "auto", or "onnxruntime"/"openvino" to restrict to one runtime. `pinned` (`--cpu-engine`):
    only that candidate; it must apply, else an `InputError` saying why. `precision` (`--precision`): an
    fp32 export asked for fp32 numerics, so bf16 joins it only when pinned; a quantized export measures
    bf16 beside its INT8/INT4 files (bf16 is the more accurate of them)."""
    if pinned is not None:
        candidate(pinned)  # unknown names fail here, with the list
    found: list[Applicable] = []
    skipped: dict[str, str] = {}
    for cand in CANDIDATES:
        reason = _why_not(cand, artifacts, unavailable, flags, backend)
        if reason is None and precision == "fp32" and cand.precision != "fp32" and pinned != cand.name:
            reason = (
                f"not requested (--precision fp32 serves fp32 numerics; --cpu-engine {cand.name} pins it)"
            )
        if pinned is not None and cand.name != pinned:
            reason = reason or f"not requested (--cpu-engine {pinned})"
        elif pinned is not None and reason is not None:
            raise InputError("--cpu-engine", f"{pinned} cannot run here: {reason}")
        if reason is None:
            path = next(artifacts[key] for key in cand.artifacts if key in artifacts)
            if cand.engine == "openvino" and cand.precision == "int8":
                cand = dataclasses.replace(cand, engine_precision=int8_engine_precision(flags))
            found.append(Applicable(cand, path))
        else:
            skipped[cand.name] = reason
    return found, skipped


def _why_not(
    cand: Candidate,
    artifacts: Mapping[str, Path],
    unavailable: Mapping[str, str | None],
    flags: Collection[str],
    backend: str,
) -> str | None:
    if backend not in ("auto", cand.engine):
        return f"not requested (--backend {backend})"
    if not any(key in artifacts for key in cand.artifacts):
        return f"no {cand.precision} file for it in this export"
    runtime_reason = unavailable.get(cand.engine)
    if runtime_reason:
        return f"{cand.engine} is not available: {runtime_reason}"
    if cand.precision == "bf16":
        return bf16_unsupported_reason(flags)
    return None


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What the caller measured for one applicable candidate. `latency_ms` None: not timed.
    `error`: it could not load or run (the text says why); then nothing else is known. `judged` False: timed
    only, its accuracy not measured because a faster candidate passes its gate (it could not be chosen)."""

    candidate: Candidate
    path: Path
    latency_ms: float | None
    cosine: float | None
    max_abs: float | None
    passed: bool
    gate: str  # the gate in words, e.g. "mean token cosine >= 0.99 (int8)"
    error: str | None = None
    judged: bool = True

    def to_json(self, chosen: bool, why_not: str | None) -> dict[str, Any]:
        return {
            "name": self.candidate.name,
            "engine": self.candidate.engine,
            "file": self.path.name,
            "precision": self.candidate.precision,
            "engine_precision": self.candidate.engine_precision,
            "latency_ms": self.latency_ms,
            "cosine": self.cosine,
            "max_abs_err": self.max_abs,
            "gate": self.gate,
            "passed_gate": self.passed if self.judged else None,
            "chosen": chosen,
            "why_not": why_not,
            "error": self.error,
            "note": self.candidate.note,
        }


@dataclasses.dataclass(frozen=True)
class Choice:
    """The chosen candidate, the reason, and per measured candidate why it lost (None for the winner)."""

    chosen: Measurement
    reason: str
    why_not: dict[str, str]
    measurements: tuple[Measurement, ...]

    @property
    def name(self) -> str:
        return self.chosen.candidate.name

    def rows(self) -> list[dict[str, Any]]:
        return [m.to_json(m is self.chosen, self.why_not.get(m.candidate.name)) for m in self.measurements]


def choose(measurements: Sequence[Measurement], pinned: str | None = None) -> Choice:
    """The fastest candidate that passes its gate (ties: the earlier in `CANDIDATES`). Untimed candidates
    (latency None) are ranked by `CANDIDATES` order. A pinned candidate is taken if it passes its gate.
    Nothing passing is a `ValidationError` with every candidate's numbers."""
    if not measurements:
        raise ValidationError("CPU engine: no candidate was measured")
    order = {name: index for index, name in enumerate(NAMES)}
    why_not: dict[str, str] = {}
    passing = []
    for m in measurements:
        if m.error is not None:
            why_not[m.candidate.name] = f"could not run: {m.error}"
        elif not m.judged:
            continue  # slower than the one chosen: said below
        elif not m.passed:
            why_not[m.candidate.name] = f"failed its accuracy gate ({_accuracy(m)}; gate: {m.gate})"
        else:
            passing.append(m)
    if not passing:
        detail = "; ".join(f"{name}: {why}" for name, why in why_not.items())
        raise ValidationError(f"CPU engine: no candidate passed its gate: {detail}")
    timed = all(m.latency_ms is not None for m in passing)
    ranked = sorted(
        passing,
        key=lambda m: ((m.latency_ms if timed else 0.0), order[m.candidate.name]),
    )
    if pinned is not None:
        ranked.sort(key=lambda m: m.candidate.name != pinned)
    best = ranked[0]
    for m in measurements:
        if not m.judged and m.error is None:
            if not timed or m.latency_ms is None or best.latency_ms is None or m.latency_ms < best.latency_ms:
                raise ValueError(f"{m.candidate.name} was not judged but could be chosen")
            why_not[m.candidate.name] = f"{_slower(m, best)}; accuracy not judged: it could not be chosen"
    for m in ranked[1:]:
        why_not[m.candidate.name] = (
            _slower(m, best)
            if timed and pinned is None
            else (
                f"not requested (--cpu-engine {pinned})"
                if pinned
                else f"after {best.candidate.name} in the default order"
            )
        )
    return Choice(best, _reason(best, timed, pinned, len(measurements)), why_not, tuple(measurements))


def _accuracy(m: Measurement) -> str:
    parts = []
    if m.cosine is not None:
        parts.append(f"mean token cosine {m.cosine:.5f}")
    if m.max_abs is not None:
        parts.append(f"max abs err {m.max_abs:.3g}")
    return ", ".join(parts) or "no accuracy measured"


def _slower(m: Measurement, best: Measurement) -> str:
    assert m.latency_ms is not None and best.latency_ms is not None
    return (
        f"slower: {m.latency_ms:.2f} ms vs {best.latency_ms:.2f} ms for {best.candidate.name} "
        f"({m.latency_ms / best.latency_ms:.2f}x)"
    )


def _reason(best: Measurement, timed: bool, pinned: str | None, count: int) -> str:
    if pinned is not None:
        return f"pinned with --cpu-engine {pinned}; it passes its gate ({best.gate})"
    if not timed:
        return (
            f"not timed (--no-benchmark): the first of {count} candidates in the default order that passes "
            f"its gate ({best.gate})"
        )
    return f"the fastest of {count} candidates that passes its gate ({best.latency_ms:.2f} ms; {best.gate})"


# ---------------------------------------------------------------- the choice, read back from an export


def recorded_choice(out_dir: str | Path) -> dict[str, Any] | None:
    """`report.json`'s `engine.cpu` of an export folder (the CPU engine chosen), None if it has none."""
    report = Path(out_dir) / "report.json"
    if not report.is_file():
        return None
    try:
        section = json.loads(report.read_text()).get("engine", {}).get("cpu")
    except (OSError, ValueError) as exc:
        raise InputError(report, f"cannot read the export's report: {exc}") from None
    return section if isinstance(section, dict) and section.get("file") else None


def chosen_runner(out_dir: str | Path, threads: int | None = None) -> Runner:
    """A runner (not yet entered) for the CPU engine the export chose: its runtime, file and precision,
    as the export measured it. This is what the runtime API and `engine-bench OUT_DIR` open."""
    from engines import load_runner

    section = recorded_choice(out_dir)
    if section is None:
        raise InputError(
            Path(out_dir) / "report.json", "no CPU engine recorded (engine.cpu): export with a CPU backend"
        )
    precision = section.get("engine_precision") if section.get("engine") == "openvino" else None
    return load_runner(
        Path(out_dir) / section["file"],
        backend=section["engine"],
        threads=threads if threads is not None else section.get("threads"),
        precision=precision,
    )
