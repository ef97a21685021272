"""The INT4 export's prefill/decode pair end to end: `--precision int4` writes model.int8.cpu.onnx beside
model.int4.cpu.onnx, gates it and records the pair (report.json deployment.decoder_pair); `exporter.load`
serves the pair (the prompt on the INT8 file, every step on the INT4 one, each call exactly that file's own
computation); `engine-bench OUT_DIR` times the pair's generation; a folder without the pair loads as before."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from test_export_api import family_masks

import exporter
from export_errors import InputError
from exporter.api import export_engine
from exporter.config import ExportConfig
from exporter.runtime.engine_choice import serving_engine
from exporter.runtime.generation import CachedDecoder, generate
from exporter.testing.synthetic import write_model_dir

INT4 = ExportConfig(
    precision="int4",
    calibration="random",
    benchmark=False,
    sequence_length=32,
    validation_samples=4,
    int4_prefill="int8",
)


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    masks, _ = family_masks("llama")  # pruned, as tests/test_export_api.py's INT4 export
    model_dir = write_model_dir(root / "model", "llama", masks=masks, tokenizer=True)
    result = export_engine(model_dir, root / "out", INT4)
    return root / "out", result.report


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_writes_gates_and_records_the_pair(paired) -> None:
    out, report = paired
    assert report["deployment"]["decoder_pair"]["prefill"] == "model.int8.cpu.onnx"
    assert report["deployment"]["decoder_pair"]["decode"] == "model.int4.cpu.onnx"
    pair = report["int4"]["pair"]
    assert pair["kept"] and pair["why_not"] == []
    assert pair["prefill_gate"]["passed"] and pair["pair_gate"]["passed"]
    assert pair["pair_gate"]["greedy_agreement"] >= pair["pair_gate"]["min_greedy_agreement"]
    assert "int4_prefill" in report["validation"]
    assert (out / "model.int8.cpu.onnx").is_file() and report["engine"]["cpu"][
        "file"
    ] == "model.int4.cpu.onnx"


def test_load_serves_the_pair_each_call_on_its_own_file(paired) -> None:
    out, _ = paired
    ids = np.array([[5, 17, 33, 2, 9, 40, 11]], dtype=np.int64)
    int8, int4 = _session(out / "model.int8.cpu.onnx"), _session(out / "model.int4.cpu.onnx")
    with exporter.load(out) as model:
        assert model.path.name == "model.int4.cpu.onnx"
        assert model.serving.prefill is not None and model.serving.prefill.name == "model.int8.cpu.onnx"
        decoder = model.decoder()
        decoder.reset(1)
        alone = CachedDecoder(int8)
        alone.reset(1)
        np.testing.assert_array_equal(decoder.forward(ids), alone.forward(ids))  # the prompt: the INT8 file's
        steps = CachedDecoder(int4)
        steps.reset(1)
        for token in (3, 8, 21):
            steps._past, steps.attention_mask = (
                dict(decoder._past),
                decoder.attention_mask,
            )  # the pair's cache
            step = np.array([[token]], dtype=np.int64)
            np.testing.assert_array_equal(decoder.forward(step), steps.forward(step))  # the INT4 file's
        text = model.generate("abc def", max_new_tokens=4)
        prompt = np.asarray(model.tokenizer("abc def", return_tensors="np")["input_ids"], dtype=np.int64)
    want = generate(int4, prompt, max_new_tokens=4, prefill=int8)
    assert text == model.tokenizer.decode(want[0, prompt.shape[1] :], skip_special_tokens=True)


def test_a_folder_without_the_pair_loads_as_before(paired, tmp_path) -> None:
    out, _ = paired
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    report = json.loads((plain / "report.json").read_text())
    del report["deployment"]["decoder_pair"]
    (plain / "report.json").write_text(json.dumps(report))
    (plain / "model.int8.cpu.onnx").unlink()
    with exporter.load(plain) as model:
        assert model.path.name == "model.int4.cpu.onnx" and model.serving.prefill is None
        assert model.prefill_runner is None
        text = model.generate("abc def", max_new_tokens=3)
        prompt = np.asarray(model.tokenizer("abc def", return_tensors="np")["input_ids"], dtype=np.int64)
    want = generate(_session(plain / "model.int4.cpu.onnx"), prompt, max_new_tokens=3)
    assert text == model.tokenizer.decode(want[0, prompt.shape[1] :], skip_special_tokens=True)
    with exporter.load(out, file="model.int4.cpu.onnx") as model:  # file= serves that one file alone
        assert model.serving.prefill is None


def test_the_pair_serves_only_beside_its_decode_file(tmp_path) -> None:
    for name in ("model.onnx", "model.int4.cpu.onnx"):
        (tmp_path / name).write_bytes(b"")
    pair = {"prefill": "model.int8.cpu.onnx", "decode": "model.int4.cpu.onnx"}
    fp32 = {
        "engine": {"cpu": {"file": "model.onnx", "engine": "onnxruntime"}},
        "deployment": {"decoder_pair": pair},
    }
    assert serving_engine(tmp_path, fp32).prefill is None  # the CPU engine chose another file
    int4 = {"file": "model.int4.cpu.onnx", "engine": "onnxruntime"}
    with pytest.raises(InputError, match=r"the prefill file report\.json pairs is missing"):
        serving_engine(tmp_path, {"engine": {"cpu": int4}, "deployment": {"decoder_pair": pair}})


def test_engine_bench_times_the_pairs_generation(paired) -> None:
    from engines.bench_cli import BenchOptions, benchmark_models, model_targets
    from engines.benchmark import BenchConfig

    out, _ = paired
    targets = [t for t in model_targets([out]) if t.generation_steps]
    assert [t.prefill.name if t.prefill else None for t in targets] == ["model.int8.cpu.onnx", None]
    assert all(t.path.name == "model.int4.cpu.onnx" for t in targets)
    config = BenchConfig(warmup_ms=0.0, iterations=2, duration_s=0.0, avg_runs=1, percentiles=(90.0,))
    results = benchmark_models(targets, BenchOptions(config=config, shapes={"input_ids": (1, 8)}, threads=1))
    assert len(results) == 2 and all(len(r.iterations) >= 2 for r in results)


def test_pair_off_writes_no_int8_file(tmp_path) -> None:
    model_dir = write_model_dir(tmp_path / "model", "llama", masks=family_masks("llama")[0])
    result = export_engine(model_dir, tmp_path / "out", dataclasses.replace(INT4, int4_prefill="off"))
    assert "decoder_pair" not in result.report["deployment"] and "pair" not in result.report["int4"]
    assert not (tmp_path / "out" / "model.int8.cpu.onnx").exists()
