"""exporter.load(OUT_DIR): the engine the export chose, the folder's tokenizer, the task's results as
transformers computes them (classifiers, taggers, QA and fill-mask: tests/test_task_heads.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import exporter
from export_errors import InputError
from exporter.api import export_engine
from exporter.config import ExportConfig
from exporter.runtime.engine_choice import serving_engine
from exporter.testing.synthetic import build_base_model, write_model_dir

FP32 = ExportConfig(precision="fp32", benchmark=False, sequence_length=16, validation_samples=2)


def test_embed_gives_the_encoders_hidden_states(tmp_path) -> None:
    from transformers import AutoTokenizer

    model_dir = write_model_dir(tmp_path / "model", "bert", tokenizer=True)
    export_engine(model_dir, tmp_path / "out", FP32)
    texts = ["a cat sat", "the quick brown fox jumps"]
    with exporter.load(tmp_path / "out") as model:
        assert model.path.name == "model.onnx"  # fp32 export: the optimized graph serves
        ours = model.embed(texts)
        with pytest.raises(InputError, match="this export is a feature-extraction model; classify"):
            model.classify(texts)
    reference = build_base_model("bert").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    for text, got in zip(texts, ours):
        encoded = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            want = reference(**encoded).last_hidden_state[0].numpy()
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4


def test_generate_continues_the_prompt_as_transformers_generate(tmp_path) -> None:
    from transformers import AutoTokenizer

    model_dir = write_model_dir(tmp_path / "model", "llama", tokenizer=True)
    export_engine(model_dir, tmp_path / "out", FP32)
    assert (tmp_path / "out" / "generation_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer("abc def", return_tensors="pt")["input_ids"]
    reference = build_base_model("llama").eval()
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    with exporter.load(tmp_path / "out") as model:
        assert model.generate("abc def", max_new_tokens=6) == tokenizer.decode(
            want[0, ids.shape[1] :], skip_special_tokens=True
        )


def write_report(out: Path, engine: dict[str, object], files: tuple[str, ...]) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    for name in files:
        (out / name).write_bytes(b"")
    return {"engine": engine}


def test_serving_engine_is_the_one_the_report_names(tmp_path) -> None:
    files = ("model.onnx", "model.int8.cpu.onnx", "model.int8.openvino.onnx")
    chosen = {
        "file": "model.int8.openvino.onnx",
        "engine": "openvino",
        "engine_precision": "f32",
        "threads": 2,
    }
    serving = serving_engine(tmp_path, write_report(tmp_path, {"cpu": chosen}, files))
    assert (serving.path.name, serving.backend, serving.precision, serving.threads) == (
        "model.int8.openvino.onnx",
        "openvino",
        "f32",
        2,
    )
    ort = {"file": "model.onnx", "engine": "onnxruntime", "engine_precision": "f32"}
    serving = serving_engine(tmp_path, write_report(tmp_path, {"cpu": ort}, files))
    assert (serving.path.name, serving.backend, serving.precision) == ("model.onnx", "onnxruntime", None)
    assert serving_engine(tmp_path, write_report(tmp_path, {}, files)).path.name == "model.int8.cpu.onnx"
    report = write_report(tmp_path, {"cpu": chosen, "tensorrt_build": {"ok": True}}, files)
    assert serving_engine(tmp_path, report).backend == "openvino"  # no model.plan, no TensorRT here
    assert serving_engine(tmp_path, report, file="model.onnx").path.name == "model.onnx"
    with pytest.raises(InputError, match=r"model\.other\.onnx: the file report\.json names"):
        serving_engine(tmp_path, {"engine": {"cpu": {"file": "model.other.onnx", "engine": "onnxruntime"}}})


def test_load_refuses_a_folder_that_is_no_export(tmp_path) -> None:
    with pytest.raises(InputError, match="not an export-engine output folder"):
        exporter.load(tmp_path)


def test_exported_model_is_importable_lazily() -> None:
    from exporter.runtime.task_model import ExportedModel, load

    assert exporter.load is load and exporter.ExportedModel is ExportedModel
    assert json.loads(json.dumps(dataclasses.asdict(FP32), default=str))["eval_data"] is None
