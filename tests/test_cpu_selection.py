"""The CPU engine's choice as pure code: which candidates apply on each CPU kind, and given timings and
accuracies, which one wins and why every other one lost (engines/cpu_selection.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines import cpu_selection
from engines.cpu_selection import Measurement, applicable, candidate, choose
from export_errors import InputError, ValidationError

INT8_EXPORT = {
    key: Path(f"/out/{name}")
    for key, name in {
        "exported": "model.exported.onnx",
        "onnx": "model.onnx",
        "int8": "model.int8.onnx",
        "int8_cpu": "model.int8.cpu.onnx",
        "int8_openvino": "model.int8.openvino.onnx",
    }.items()
}
BOTH = {"onnxruntime": None, "openvino": None}
# /proc/cpuinfo flags of the machines this project ran on (the parts that matter)
CPUS = {
    "avx2 EPYC (no VNNI)": {"avx2", "fma"},
    "Emerald Rapids under KVM (VNNI, no BF16/AMX)": {"avx2", "avx512f", "avx512_vnni"},
    "Zen 4 (VNNI, AVX512-BF16)": {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"},
    "Sapphire Rapids (AMX)": {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"},
}


def names(found: list[cpu_selection.Applicable]) -> list[str]:
    return [a.candidate.name for a in found]


@pytest.mark.parametrize(
    ("cpu", "bf16"),
    [
        ("avx2 EPYC (no VNNI)", False),
        ("Emerald Rapids under KVM (VNNI, no BF16/AMX)", False),
        ("Zen 4 (VNNI, AVX512-BF16)", True),
        ("Sapphire Rapids (AMX)", True),
    ],
)
def test_bf16_is_a_candidate_only_where_the_cpu_computes_it(cpu: str, bf16: bool) -> None:
    found, skipped = applicable(INT8_EXPORT, unavailable=BOTH, flags=CPUS[cpu])
    expected = ["openvino-int8", "onnxruntime-int8", *(["openvino-bf16"] if bf16 else []), "onnxruntime-fp32"]
    assert names(found) == [*expected, "openvino-fp32"]
    assert skipped["onnxruntime-int4"] == "no int4 file for it in this export"
    if not bf16:
        assert "neither AVX512-BF16 nor AMX-BF16" in skipped["openvino-bf16"]
    # OpenVINO's INT8 candidate runs its float layers in bf16 exactly where the CPU computes bf16
    int8_ov = next(a for a in found if a.candidate.name == "openvino-int8")
    assert int8_ov.candidate.runner_options() == {
        "backend": "openvino",
        "precision": "bf16" if bf16 else "f32",
    }
    assert int8_ov.candidate.engine_precision == cpu_selection.int8_engine_precision(CPUS[cpu])
    # the fp32 candidate stays f32 everywhere (OpenVINO's own default on BF16/AMX CPUs would be bf16)
    assert next(a for a in found if a.candidate.name == "openvino-fp32").candidate.engine_precision == "f32"
    bf16_runs = [a for a in found if a.candidate.name == "openvino-bf16"]
    if bf16_runs:
        assert bf16_runs[0].path.name == "model.exported.onnx"
        assert bf16_runs[0].candidate.runner_options() == {"backend": "openvino", "precision": "bf16"}


def test_files_and_runtimes_decide_what_applies() -> None:
    found, _ = applicable(INT8_EXPORT, unavailable=BOTH, flags=set())
    by_name = {a.candidate.name: a.path.name for a in found}
    assert by_name["openvino-int8"] == "model.int8.openvino.onnx"
    assert by_name["onnxruntime-int8"] == "model.int8.cpu.onnx"
    # without the OpenVINO variant, OpenVINO runs the TensorRT Q/DQ file
    no_ov_file = {k: v for k, v in INT8_EXPORT.items() if k != "int8_openvino"}
    found, _ = applicable(no_ov_file, unavailable=BOTH, flags=set())
    assert {a.candidate.name: a.path.name for a in found}["openvino-int8"] == "model.int8.onnx"
    # no OpenVINO installed: ONNX Runtime's candidates only, the reason kept for each OpenVINO one
    found, skipped = applicable(
        INT8_EXPORT, unavailable={"onnxruntime": None, "openvino": "no module"}, flags=set()
    )
    assert names(found) == ["onnxruntime-int8", "onnxruntime-fp32"]
    assert skipped["openvino-int8"] == "openvino is not available: no module"
    # an fp32 export: fp32 files only; bf16 where the CPU has it for a quantized export, pinned for an fp32 one
    fp32 = {k: v for k, v in INT8_EXPORT.items() if k in ("exported", "onnx")}
    bf16_cpu = CPUS["Zen 4 (VNNI, AVX512-BF16)"]
    found, skipped = applicable(fp32, unavailable=BOTH, flags=bf16_cpu)
    assert names(found) == ["openvino-bf16", "onnxruntime-fp32", "openvino-fp32"]
    assert skipped["onnxruntime-int8"] == "no int8 file for it in this export"
    found, skipped = applicable(fp32, unavailable=BOTH, flags=bf16_cpu, precision="fp32")
    assert names(found) == ["onnxruntime-fp32", "openvino-fp32"]
    assert skipped["openvino-bf16"].startswith("not requested (--precision fp32")
    found, _ = applicable(fp32, unavailable=BOTH, flags=bf16_cpu, precision="fp32", pinned="openvino-bf16")
    assert names(found) == ["openvino-bf16"]
    # an INT4 file (issue 16's CPU file) makes its candidate apply
    found, _ = applicable(
        {**INT8_EXPORT, "int4_cpu": Path("/out/model.int4.cpu.onnx")}, unavailable=BOTH, flags=set()
    )
    assert "onnxruntime-int4" in names(found)


def test_backend_and_pin_restrict_the_candidates() -> None:
    found, skipped = applicable(INT8_EXPORT, unavailable=BOTH, flags=set(), backend="openvino")
    assert names(found) == ["openvino-int8", "openvino-fp32"]
    assert skipped["onnxruntime-int8"] == "not requested (--backend openvino)"
    found, skipped = applicable(INT8_EXPORT, unavailable=BOTH, flags=set(), pinned="onnxruntime-int8")
    assert names(found) == ["onnxruntime-int8"]
    assert skipped["openvino-int8"] == "not requested (--cpu-engine onnxruntime-int8)"
    with pytest.raises(
        InputError, match=r"--cpu-engine: unknown CPU engine 'tvm'; choose one of \['openvino-int8'"
    ):
        applicable(INT8_EXPORT, unavailable=BOTH, flags=set(), pinned="tvm")
    with pytest.raises(InputError, match="openvino-bf16 cannot run here: this CPU has neither AVX512-BF16"):
        applicable(INT8_EXPORT, unavailable=BOTH, flags=CPUS["avx2 EPYC (no VNNI)"], pinned="openvino-bf16")
    with pytest.raises(InputError, match="openvino-int8 cannot run here: openvino is not available: gone"):
        applicable(INT8_EXPORT, unavailable={"openvino": "gone"}, flags=set(), pinned="openvino-int8")


def measured(
    name: str, latency: float | None, cosine: float = 0.995, passed: bool = True, error: str | None = None
) -> Measurement:
    cand = candidate(name)
    return Measurement(
        cand, Path(f"/out/{cand.name}.onnx"), latency, cosine, 0.1, passed, "mean token cosine >= 0.99", error
    )


def test_the_fastest_candidate_that_passes_wins_and_every_other_says_why() -> None:
    choice = choose(
        [
            measured("openvino-int8", 5.0, cosine=0.985, passed=False),  # fastest, but below its gate
            measured("onnxruntime-int8", 6.5),
            measured("onnxruntime-fp32", 10.9, cosine=1.0),
            measured("openvino-fp32", None, error="OpenVINO cannot load it: unsupported op"),
        ]
    )
    assert choice.name == "onnxruntime-int8"
    assert choice.reason.startswith("the fastest of 4 candidates that passes its gate (6.50 ms")
    assert choice.why_not == {
        "openvino-int8": "failed its accuracy gate (mean token cosine 0.98500, max abs err 0.1; gate: mean token cosine >= 0.99)",
        "onnxruntime-fp32": "slower: 10.90 ms vs 6.50 ms for onnxruntime-int8 (1.68x)",
        "openvino-fp32": "could not run: OpenVINO cannot load it: unsupported op",
    }
    rows = {row["name"]: row for row in choice.rows()}
    assert rows["onnxruntime-int8"]["chosen"] and rows["onnxruntime-int8"]["why_not"] is None
    assert not rows["openvino-int8"]["chosen"] and rows["openvino-int8"]["passed_gate"] is False
    assert rows["onnxruntime-int8"]["file"] == "onnxruntime-int8.onnx"


def test_a_candidate_left_unjudged_is_slower_than_the_choice_and_says_so() -> None:
    """A decoder's candidates are timed before they are judged: one slower than a passing candidate is never
    judged (it could not be chosen); it is reported as such, and one that could have been chosen is an error."""
    unjudged = Measurement(
        candidate("openvino-bf16"), Path("/out/x.onnx"), 9.0, None, None, False, "", judged=False
    )
    choice = choose([measured("onnxruntime-int8", 6.0), unjudged])
    assert choice.name == "onnxruntime-int8"
    assert choice.why_not == {
        "openvino-bf16": "slower: 9.00 ms vs 6.00 ms for onnxruntime-int8 (1.50x); accuracy not judged: it "
        "could not be chosen"
    }
    row = next(r for r in choice.rows() if r["name"] == "openvino-bf16")
    assert row["passed_gate"] is None and row["cosine"] is None and not row["chosen"]
    faster = Measurement(
        candidate("openvino-bf16"), Path("/out/x.onnx"), 5.0, None, None, False, "", judged=False
    )
    with pytest.raises(ValueError, match="not judged but could be chosen"):
        choose([measured("onnxruntime-int8", 6.0), faster])


def test_ties_go_to_the_default_order_and_untimed_choices_follow_it() -> None:
    tie = choose([measured("onnxruntime-int8", 5.0), measured("openvino-int8", 5.0)])
    assert tie.name == "openvino-int8"  # CANDIDATES order breaks the tie
    untimed = choose(
        [
            measured("onnxruntime-fp32", None),
            measured("onnxruntime-int8", None),
            measured("openvino-int8", None, passed=False),
        ]
    )
    assert untimed.name == "onnxruntime-int8"
    assert untimed.reason.startswith(
        "not timed (--no-benchmark): the first of 3 candidates in the default order"
    )
    assert untimed.why_not["onnxruntime-fp32"] == "after onnxruntime-int8 in the default order"


def test_a_pinned_candidate_must_pass_and_nothing_passing_is_an_error() -> None:
    pinned = choose([measured("onnxruntime-fp32", 11.0)], pinned="onnxruntime-fp32")
    assert pinned.name == "onnxruntime-fp32" and pinned.reason.startswith(
        "pinned with --cpu-engine onnxruntime-fp32"
    )
    with pytest.raises(
        ValidationError,
        match="CPU engine: no candidate passed its gate: openvino-int8: failed its accuracy gate",
    ):
        choose([measured("openvino-int8", 4.0, cosine=0.9, passed=False)], pinned="openvino-int8")
    with pytest.raises(ValidationError, match="no candidate was measured"):
        choose([])


def test_cpu_flags_and_kind(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    flags = cpu_selection.cpu_flags(info)
    assert flags == {"fpu", "avx2", "avx512f", "avx512_vnni"}
    assert cpu_selection.cpu_kind(flags) == "avx2 avx512f avx512_vnni"
    assert cpu_selection.cpu_flags(tmp_path / "missing") == frozenset()
