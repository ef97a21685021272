"""The CPU engine chosen by measurement, end to end on a tiny encoder: candidates measured as stage-table
rows, each judged by its gate, the choice in report.json / report.md, `--cpu-engine` and `--backend
openvino`, and the recorded choice opened again (engines.cpu_selection.chosen_runner). Also the files
it rests on: INT8 embedding tables and the OpenVINO variant of the Q/DQ file. OpenVINO cases skip with
the reason where it is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines import load_runner
from engines.cpu_selection import bf16_unsupported_reason, chosen_runner, cpu_flags
from engines.openvino_runner import openvino_unavailable_reason
from export_errors import InputError
from exporter.api import export_engine
from exporter.config import ExportConfig
from exporter.quantize.embeddings import quantize_embeddings, quantize_rows
from exporter.quantize.openvino_int8 import weight_only_int8

OV_SKIP = openvino_unavailable_reason()
needs_openvino = pytest.mark.skipif(OV_SKIP is not None, reason=f"OpenVINO: {OV_SKIP}")
SMALL = {"sequence_length": 32, "validation_samples": 4, "calibration_samples": 8, "benchmark_iterations": 5}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter.testing.synthetic import write_model_dir

    return write_model_dir(tmp_path_factory.mktemp("bert_dir"), "bert", tokenizer=True)


@pytest.fixture(scope="module")
def default_export(bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return export_engine(bert_dir, tmp_path_factory.mktemp("cpu_engine") / "out", ExportConfig(**SMALL))


def test_the_export_measures_every_candidate_and_records_the_fastest_passing(default_export) -> None:  # type: ignore[no-untyped-def]
    report = json.loads((default_export.output_dir / "report.json").read_text())
    cpu = report["engine"]["cpu"]
    rows = {row["name"]: row for row in cpu["candidates"]}
    openvino = {"openvino-int8", "openvino-fp32"} | (
        {"openvino-bf16"} if bf16_unsupported_reason(cpu_flags()) is None else set()
    )
    expected = {"onnxruntime-int8", "onnxruntime-fp32"} | (openvino if OV_SKIP is None else set())
    assert set(rows) == expected
    passing = [row for row in rows.values() if row["passed_gate"]]
    fastest = min(passing, key=lambda row: row["latency_ms"])
    assert cpu["candidate"] == fastest["name"] and rows[cpu["candidate"]]["chosen"]
    assert (cpu["engine"], cpu["file"]) == (fastest["engine"], fastest["file"])
    assert (default_export.output_dir / cpu["file"]).is_file()
    for row in rows.values():
        assert row["latency_ms"] > 0 and 0.99 <= row["cosine"] <= 1.0 + 1e-9
        assert row["chosen"] or row["why_not"].startswith("slower: ")
    assert rows["onnxruntime-int8"]["gate"].startswith("mean token cosine >= 0.99")
    assert rows["onnxruntime-fp32"]["gate"].startswith("max abs err <= 0.0001")
    # the same numbers as the stage table's rows: one measurement
    stages = {s["name"]: s for s in report["stages"]["stages"]}
    assert rows["onnxruntime-int8"]["latency_ms"] == stages["int8 CPU"]["latency_median_ms"]
    assert rows["onnxruntime-fp32"]["latency_ms"] == stages["onnx fp32 optimized"]["latency_median_ms"]
    if OV_SKIP is None:
        assert rows["openvino-int8"]["file"] == "model.int8.openvino.onnx"
        assert rows["openvino-int8"]["latency_ms"] == stages["openvino-int8"]["latency_median_ms"]
        assert "cpu:openvino-int8" in report["validation"]
    else:
        assert "openvino is not available" in cpu["skipped"]["openvino-int8"]
    chosen_stage = next(s for s in report["stages"]["stages"] if "**the CPU engine**" in s["note"])
    assert chosen_stage["latency_median_ms"] == rows[cpu["candidate"]]["latency_ms"]
    md = (default_export.output_dir / "report.md").read_text()
    assert "## CPU engine" in md and f"**{cpu['candidate']}**" in md
    assert "| candidate | engine | file | latency ms | cosine | max abs err | gate | chosen | why not |" in md


def test_the_recorded_choice_opens_and_computes_the_model(default_export) -> None:  # type: ignore[no-untyped-def]
    out = default_export.output_dir
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, size=(2, 16))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    reference = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    want = reference.run(["last_hidden_state"], feeds)[0]
    with chosen_runner(out, threads=1) as runner:
        got = runner.infer(feeds)["last_hidden_state"]
    cos = np.sum(got * want, -1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.mean() > 0.99
    with pytest.raises(InputError, match="no CPU engine recorded"):
        chosen_runner(out / "compact_model")


def test_no_benchmark_takes_the_default_order(bert_dir: Path, tmp_path: Path) -> None:
    result = export_engine(bert_dir, tmp_path / "out", ExportConfig(**SMALL, benchmark=False))
    cpu = result.report["engine"]["cpu"]
    assert cpu["reason"].startswith("not timed (--no-benchmark)")
    assert all(row["latency_ms"] is None for row in cpu["candidates"])
    assert cpu["candidate"] == ("openvino-int8" if OV_SKIP is None else "onnxruntime-int8")


def test_cpu_engine_pins_the_choice(bert_dir: Path, tmp_path: Path) -> None:
    config = ExportConfig(**SMALL, precision="fp32", benchmark=False, cpu_engine="onnxruntime-fp32")
    cpu = export_engine(bert_dir, tmp_path / "out", config).report["engine"]["cpu"]
    assert cpu["candidate"] == "onnxruntime-fp32" and [r["name"] for r in cpu["candidates"]] == [
        "onnxruntime-fp32"
    ]
    assert cpu["reason"].startswith("pinned with --cpu-engine onnxruntime-fp32")
    with pytest.raises(InputError, match="--cpu-engine: onnxruntime-int8 cannot run here: no int8 file"):
        export_engine(
            bert_dir,
            tmp_path / "refused",
            ExportConfig(**SMALL, precision="fp32", cpu_engine="onnxruntime-int8"),
        )
    assert not (tmp_path / "refused").exists()  # refused before any work


@needs_openvino
def test_backend_openvino_measures_openvino_only(bert_dir: Path, tmp_path: Path) -> None:
    config = ExportConfig(**SMALL, precision="fp32", backend="openvino")
    result = export_engine(bert_dir, tmp_path / "out", config)
    cpu = result.report["engine"]["cpu"]
    assert cpu["engine"] == "openvino"
    assert [r["name"] for r in cpu["candidates"]] == ["openvino-fp32"]  # --precision fp32: no bf16
    assert cpu["skipped"]["onnxruntime-fp32"] == "not requested (--backend openvino)"
    assert result.report["backend"]["name"] == "openvino"


def _table_model(vocab: int = 300, hidden: int = 256, tied: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    table = (rng.normal(size=(vocab, hidden)) * rng.uniform(0.01, 3.0, size=(vocab, 1))).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather")]
    outputs = [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", "s", hidden])]
    if tied:  # an LM head reading the same table
        nodes.append(helper.make_node("Gemm", ["emb2d", "table"], ["logits"], name="head", transB=1))
        nodes.insert(1, helper.make_node("Reshape", ["emb", "shape"], ["emb2d"], name="flatten"))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", vocab]))
    graph = helper.make_graph(
        nodes,
        "table",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        outputs,
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([-1, hidden]), "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_embedding_tables_are_int8_per_row(tmp_path: Path) -> None:
    original = _table_model()
    table = numpy_helper.to_array(original.graph.initializer[0])
    model, done = quantize_embeddings(onnx.load_from_string(original.SerializeToString()))
    assert [t.name for t in done] == ["table"] and done[0].bytes_after < done[0].bytes_before / 3.9
    q, scale = quantize_rows(table)
    # per-row scales: every row's error within half its own step (a per-table scale would crush small rows)
    assert np.all(np.abs(q * scale - table) <= scale / 2 + 1e-7)
    onnx.checker.check_model(model)
    ids = np.array([[0, 5, 299, 17]], dtype=np.int64)
    path = tmp_path / "q.onnx"
    onnx.save(model, path)
    runtimes = ["onnxruntime"] + (["openvino"] if OV_SKIP is None else [])
    for backend in runtimes:
        with load_runner(path, backend=backend, threads=1) as runner:
            got = runner.infer({"ids": ids})["emb"]
        np.testing.assert_allclose(got, (q * scale)[ids], rtol=1e-6, atol=1e-7, err_msg=backend)
    # a table another node reads (a tied head) stays fp32
    tied, done = quantize_embeddings(_table_model(tied=True))
    assert done == [] and "table" in {t.name for t in tied.graph.initializer}


def test_weight_only_int8_keeps_activations_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        [numpy_helper.from_array(weight, "w")],
    )
    model, changed = weight_only_int8(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert changed == ["mm"] and [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul"]
    path = tmp_path / "w8.onnx"
    onnx.save(model, path)
    x = rng.normal(size=(4, 64)).astype(np.float32)
    scale = np.abs(weight).max(axis=0) / 127
    for backend in ["onnxruntime"] + (["openvino"] if OV_SKIP is None else []):
        with load_runner(path, backend=backend, threads=1) as runner:
            got = runner.infer({"x": x})["y"]
        # the error is the weights' rounding only: at most half a step per weight
        assert np.all(
            np.abs(got - x @ weight) <= np.abs(x) @ np.broadcast_to(scale / 2, weight.shape) + 1e-4
        ), backend


def test_task_agreement_joins_the_cosine_gate() -> None:
    from exporter.cpu_engine_stage import agreement_gate

    words = "mean token cosine >= 0.99 (int8, --accuracy-target)"
    assert agreement_gate(True, words, None, None) == (True, words)  # not a task model: cosine alone
    assert agreement_gate(True, words, 0.96, 0.95) == (
        True,
        f"{words}; held-out task agreement 0.9600 >= 0.95 (--agreement-target)",
    )
    assert agreement_gate(True, words, 0.90, 0.95)[0] is False  # cosine passed, labels changed: fails
    assert agreement_gate(False, words, 1.0, 0.95)[0] is False


@needs_openvino
@pytest.mark.parametrize(("agreement", "passes"), [(1.0, True), (0.5, False)])
def test_openvino_int8_candidate_is_judged_by_the_task_agreement_it_computes(
    tmp_path: Path, agreement: float, passes: bool
) -> None:
    import contextlib

    from engines.cpu_selection import applicable
    from exporter.cpu_engine_stage import CpuEngineStage, TaskAgreement, open_and_judge

    rng = np.random.default_rng(3)
    weight = rng.normal(size=(16, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    path = tmp_path / "model.int8.openvino.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    found, skipped = applicable(
        {"int8_openvino": path}, unavailable={"onnxruntime": None, "openvino": None}, flags=set()
    )
    stage = CpuEngineStage(found, skipped, frozenset(), None)
    x = rng.normal(size=(3, 16)).astype(np.float32)
    seen: list[str] = []

    def measure(runner: object) -> float:
        seen.append(type(runner).__name__)
        return agreement

    validation: dict = {}
    with contextlib.ExitStack() as stack:
        open_and_judge(
            stage,
            stack,
            1,
            {"y": x @ weight},
            lambda runner: runner.infer({"x": x}),
            None,
            validation,
            0.99,
            TaskAgreement(measure, 0.95),
        )
    _, passed, words = stage.accuracy["openvino-int8"]
    assert seen == ["OpenVinoRunner"] and passed is passes
    assert f"held-out task agreement {agreement:.4f} >= 0.95" in words


def _matmul_file(path: Path, weight: np.ndarray) -> Path:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("early", [False, True])
def test_candidates_opened_early_are_judged_as_those_opened_by_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, early: bool
) -> None:
    """`open_early` (on the background thread) opens the runners `open_and_judge` would, with the same
    options: the stage opens nothing more, and the numbers, passes and errors are the same."""
    import contextlib

    from engines.cpu_selection import applicable
    from exporter import cpu_engine_stage
    from exporter.validate import sessions

    rng = np.random.default_rng(5)
    weight = rng.normal(size=(16, 4)).astype(np.float32)
    artifacts = {
        "int8_cpu": _matmul_file(tmp_path / "model.int8.cpu.onnx", weight),
        "onnx": tmp_path / "model.onnx",
    }
    (tmp_path / "model.onnx").write_bytes(b"not onnx")  # opening it fails: recorded as the candidate's error
    found, skipped = applicable(
        artifacts, unavailable={"onnxruntime": None, "openvino": "not here"}, flags=frozenset()
    )
    stage = cpu_engine_stage.CpuEngineStage(found, skipped, frozenset(), None)
    x = rng.normal(size=(3, 16)).astype(np.float32)
    validation: dict = {}
    with contextlib.ExitStack() as stack, sessions.background():
        if early:
            cpu_engine_stage.open_early(stage, stack, 1, checked=set(), timed=False)
            opened = dict(stage.early)
            monkeypatch.setattr(cpu_engine_stage, "load_runner", lambda *a, **k: pytest.fail("opened again"))
        cpu_engine_stage.open_and_judge(
            stage, stack, 1, {"y": x @ weight}, lambda runner: runner.infer({"x": x}), None, validation, 0.99
        )
        if early:
            assert stage.runners["onnxruntime-int8"] is opened["onnxruntime-int8"][0]
            assert stage.early == {}
    assert set(stage.accuracy) == {"onnxruntime-int8"} and stage.accuracy["onnxruntime-int8"][1]
    assert validation["cpu:onnxruntime-int8"][0]["max_abs"] < 1e-4
    assert set(stage.errors) == {"onnxruntime-fp32"} and "cannot load" in stage.errors["onnxruntime-fp32"]


def test_deferred_candidates_are_judged_from_the_fastest_until_one_passes() -> None:
    """`judge_deferred`: after the decoder timing, the unjudged candidates are judged in order of speed until
    a candidate passes (judged before or then); the slower ones stay unjudged."""
    from exporter import cpu_engine_stage

    stage = cpu_engine_stage.CpuEngineStage([], {}, frozenset(), None)
    stage.accuracy["onnxruntime-int8"] = ([], True, "gate")  # the export's own check
    stage.unjudged = {"openvino-int8", "openvino-bf16", "openvino-fp32"}
    verdicts = {"openvino-int8": False, "openvino-bf16": True, "openvino-fp32": True}
    judged: list[str] = []

    def judge_one(name: str) -> None:
        judged.append(name)
        stage.unjudged.discard(name)
        stage.accuracy[name] = ([], verdicts[name], "gate")

    stage.judge_one = judge_one
    latencies = {
        "openvino-int8": 100.0,
        "openvino-bf16": 150.0,
        "onnxruntime-int8": 200.0,
        "openvino-fp32": 90.0,
    }
    cpu_engine_stage.judge_deferred(stage, latencies)
    assert judged == ["openvino-fp32"]  # the fastest passes: nothing slower is judged
    verdicts["openvino-fp32"] = False
    stage.accuracy.pop("openvino-fp32")
    stage.unjudged = {"openvino-int8", "openvino-bf16", "openvino-fp32"}
    judged.clear()
    cpu_engine_stage.judge_deferred(stage, latencies)
    assert judged == ["openvino-fp32", "openvino-int8", "openvino-bf16"]  # two fail, the third passes
    stage.accuracy = {"onnxruntime-int8": ([], True, "gate")}
    stage.unjudged = {"openvino-int8"}
    judged.clear()
    cpu_engine_stage.judge_deferred(stage, {"onnxruntime-int8": 50.0, "openvino-int8": 100.0})
    assert judged == [] and stage.unjudged == {"openvino-int8"}  # slower than a passing one: left


def test_a_timed_decoder_export_judges_every_candidate_that_could_be_chosen(
    model_dir_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """End to end on a tiny Llama (INT8, the decoder timing): every candidate at least as fast as the chosen
    one was judged (and failed, or is the chosen one); those left unjudged are slower, and report.md says so."""
    config = ExportConfig(precision="int8", calibration="random", sequence_length=32, validation_samples=4)
    result = export_engine(model_dir_factory("llama"), tmp_path / "out", config)
    cpu = result.report["engine"]["cpu"]
    rows = cpu["candidates"]
    chosen = next(row for row in rows if row["chosen"])
    assert chosen["passed_gate"] is True and chosen["cosine"] is not None
    for row in rows:
        if row["error"] or row["chosen"]:
            continue
        assert row["latency_ms"] is not None, row
        if row["passed_gate"] is None:  # not judged: slower than the chosen one
            assert row["cosine"] is None and row["latency_ms"] >= chosen["latency_ms"], row
            assert row["why_not"].endswith("accuracy not judged: it could not be chosen"), row
            assert f"cpu:{row['name']}" not in result.report["validation"]
        else:
            assert row["cosine"] is not None and (
                row["latency_ms"] >= chosen["latency_ms"] or not row["passed_gate"]
            )
    if OV_SKIP is None:  # OpenVINO's three candidates: each judged only where it could have been chosen
        assert {"openvino-int8", "openvino-bf16", "openvino-fp32"} & {row["name"] for row in rows}
    assert "not judged (slower than the chosen engine)" in (
        tmp_path / "out" / "report.md"
    ).read_text() or all(row["passed_gate"] is not None for row in rows if not row["error"])


def test_a_deferred_candidate_that_cannot_run_loses_with_its_reason_before_the_timing(tmp_path: Path) -> None:
    """Not judged before the decoder timing, a candidate whose runtime fails on the timing feeds is recorded as
    an error (as its judging would have been) and left out of the timing; the others are timed."""
    from exporter import cpu_engine_stage

    weight = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    path = _matmul_file(tmp_path / "model.int8.cpu.onnx", weight)

    class Broken:
        backend = "openvino"

        def infer(self, feeds):  # type: ignore[no-untyped-def]
            raise RuntimeError("unsupported op at run time")

    stage = cpu_engine_stage.CpuEngineStage([], {}, frozenset(), None)
    with load_runner(path, threads=1) as good:
        stage.runners = {"onnxruntime-int8": good, "openvino-bf16": Broken()}  # type: ignore[dict-item]
        stage.accuracy["onnxruntime-int8"] = ([], True, "gate")
        stage.unjudged = {"openvino-bf16"}
        x = {"x": np.ones((1, 16), np.float32)}
        latencies = cpu_engine_stage.time_decoder_candidates(stage, None, 1, lambda runner: (x, x))  # type: ignore[arg-type]
    assert set(latencies) == {"onnxruntime-int8"}
    assert stage.errors == {"openvino-bf16": "unsupported op at run time"} and not stage.unjudged
    assert "openvino-bf16" not in stage.runners


def test_deferred_judging_of_opened_candidates_records_what_open_and_judge_would(tmp_path: Path) -> None:
    """`open_and_judge(defer=True)` opens and judges nothing; `judge_deferred` then judges real runners from the
    fastest: the same comparisons, gates and validation entries as judging them at once, the slower ones left."""
    import contextlib

    from engines.cpu_selection import applicable
    from exporter import cpu_engine_stage

    rng = np.random.default_rng(7)
    weight = rng.normal(size=(16, 4)).astype(np.float32)
    artifacts = {
        "int8_cpu": _matmul_file(tmp_path / "model.int8.cpu.onnx", weight),
        "onnx": _matmul_file(tmp_path / "model.onnx", weight * 1.01),  # outside the fp32 tolerance
    }
    x = rng.normal(size=(3, 16)).astype(np.float32)
    reference = {"y": x @ weight}
    results = {}
    for defer in (False, True):
        found, skipped = applicable(
            artifacts, unavailable={"onnxruntime": None, "openvino": "not here"}, flags=frozenset()
        )
        stage = cpu_engine_stage.CpuEngineStage(found, skipped, frozenset(), None)
        validation: dict = {}
        with contextlib.ExitStack() as stack:
            cpu_engine_stage.open_and_judge(
                stage, stack, 1, reference, lambda r: r.infer({"x": x}), None, validation, 0.99, defer=defer
            )
            if defer:
                assert stage.accuracy == {} and stage.unjudged == {"onnxruntime-int8", "onnxruntime-fp32"}
                cpu_engine_stage.judge_deferred(stage, {"onnxruntime-fp32": 1.0, "onnxruntime-int8": 2.0})
        results[defer] = (validation, {n: (a[1], a[2]) for n, a in stage.accuracy.items()}, stage.unjudged)
    assert results[True][0] == results[False][0] and results[True][1] == results[False][1]
    assert (
        results[True][1]
        == {
            "onnxruntime-fp32": (False, "max abs err <= 0.0001 (fp32 tolerance)"),
            "onnxruntime-int8": (True, "mean token cosine >= 0.99 (int8, --accuracy-target)"),
        }
        and not results[True][2]
    )
