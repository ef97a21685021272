"""Determinism: exporting the same MODEL_DIR twice gives byte-identical artifacts and the same report
apart from timings and the output path.

The second export runs in a fresh interpreter with a different PYTHONHASHSEED and into a differently
named OUT_DIR (the staging folder's random name differs too), so set/dict iteration order, temporary
paths and per-process state that leaked into an artifact would all show up here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest

from exporter.api import export_engine
from exporter.config import ExportConfig
from exporter.testing.synthetic import (
    LoraSpec,
    gqa_group_masks,
    head_row_mask,
    layer_param,
    row_mask,
    tiny_config,
)

FP32 = {"precision": "fp32", "benchmark": False, "sequence_length": 32, "validation_samples": 4}
# The product's default path (int8 once it lands), kept small.
DEFAULT = {"benchmark": False, "sequence_length": 32, "validation_samples": 4, "calibration_samples": 8}

REPORTS = ("report.json", "report.md")
LOGS = ("export.log",)  # timestamped lines: a log of the run, not an artifact (its presence is compared)
TIME_LIKE = re.compile(r"(^|_)(time|times|timings?|seconds|secs?|elapsed|duration|latency|ms|s)($|_)")
MEMORY_LIKE = re.compile(r"(^|_)(rss|memory)($|_)")  # the kernel's high-water marks vary run to run
PATH_KEYS = {"model_dir", "output_dir", "out_dir", "onnx_path"}

_CHILD = """
import json, sys
from exporter.api import export_engine
from exporter.config import ExportConfig
export_engine(sys.argv[1], sys.argv[2], ExportConfig(**json.loads(sys.argv[3])))
"""


def masks_for(family: str) -> dict[str, Any]:
    config = tiny_config(family)
    h = config.hidden_size
    if family == "bert":
        return {
            layer_param(family, 0, "up"): row_mask((128, h), range(0, 128, 3)),
            layer_param(family, 1, "v"): head_row_mask((h, h), [2], 16),
        }
    found = dict(gqa_group_masks(config, family, 0, 1))
    found[layer_param(family, 1, "gate")] = row_mask((96, h), range(20))
    return found


LORA = {
    "bert": LoraSpec(target_modules=("query", "value")),
    "llama": LoraSpec(target_modules=("q_proj", "v_proj", "down_proj")),
}


def export_in_fresh_process(model_dir: Path, out: Path, config: dict[str, Any], hash_seed: str) -> None:
    env = {**_env(), "PYTHONHASHSEED": hash_seed}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(model_dir), str(out), json.dumps(config)],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def strip_volatile(value: Any) -> Any:
    """The report without timings (keys that name a time or duration), memory readings and output/model
    paths."""
    if isinstance(value, dict):
        return {
            k: strip_volatile(v)
            for k, v in value.items()
            if not TIME_LIKE.search(str(k).lower())
            and not MEMORY_LIKE.search(str(k).lower())
            and k not in PATH_KEYS
        }
    if isinstance(value, list):
        return [strip_volatile(v) for v in value]
    return value


def artifact_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def first_difference(a: bytes, b: bytes) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"sizes {len(a)} vs {len(b)}, first differing byte at {at}: {a[at : at + 40]!r} vs {b[at : at + 40]!r}"


def onnx_difference(a: Path, b: Path) -> str:
    """Where two ONNX files differ, in ONNX terms (first differing node / initializer / field)."""
    ma, mb = onnx.load(str(a), load_external_data=False), onnx.load(str(b), load_external_data=False)
    for field in ("ir_version", "producer_name", "producer_version", "doc_string", "metadata_props"):
        if getattr(ma, field) != getattr(mb, field):
            return f"model.{field}: {getattr(ma, field)!r} vs {getattr(mb, field)!r}"
    for kind in ("node", "initializer", "input", "output", "value_info"):
        for i, (x, y) in enumerate(zip(getattr(ma.graph, kind), getattr(mb.graph, kind))):
            if x != y:
                return f"graph.{kind}[{i}] ({getattr(x, 'name', '')!r}): {str(x)[:300]!r} vs {str(y)[:300]!r}"
    return "no field-level difference found"


@pytest.mark.parametrize(
    ("family", "config"),
    [("bert", FP32), ("llama", FP32), ("bert", DEFAULT)],
    ids=["bert-fp32", "llama-fp32", "bert-default"],
)
def test_two_exports_are_byte_identical(family, config, model_dir_factory, tmp_path) -> None:
    model_dir = model_dir_factory(family, masks=masks_for(family), lora=LORA[family], tokenizer=True)
    first, second = tmp_path / "first", tmp_path / "second_run"
    export_engine(model_dir, first, ExportConfig(**config))
    export_in_fresh_process(model_dir, second, config, hash_seed="12345")

    a, b = artifact_files(first), artifact_files(second)
    assert sorted(a) == sorted(b)
    assert any(name.endswith(".onnx") for name in a)
    for name in a:
        if Path(name).name in REPORTS + LOGS:
            continue
        if a[name] != b[name]:
            detail = onnx_difference(first / name, second / name) if name.endswith(".onnx") else ""
            pytest.fail(f"{name} differs between two exports: {first_difference(a[name], b[name])} {detail}")

    report_a = strip_volatile(json.loads(a["report.json"]))
    report_b = strip_volatile(json.loads(b["report.json"]))
    assert report_a == report_b, _dict_difference(report_a, report_b)


def test_onnx_holds_no_paths(model_dir_factory, tmp_path) -> None:
    """Neither the staging folder nor MODEL_DIR's path may end up inside an artifact."""
    model_dir = model_dir_factory("llama", masks=masks_for("llama"))
    out = tmp_path / "out"
    export_engine(model_dir, out, ExportConfig(**FP32))
    for name, data in artifact_files(out).items():
        if Path(name).name in REPORTS:
            continue
        for needle in (str(tmp_path), str(model_dir), ".partial-", "/tmp/"):
            assert needle.encode() not in data, f"{name} contains {needle!r}"


def test_strip_volatile_removes_only_timings_memory_and_paths() -> None:
    report = {
        "timings_s": {"load": 1.0},
        "peak_rss_gib": {"load": 0.5},
        "model_dir": "/x",
        "passes": [{"name": "fold", "seconds": 0.2, "counts": {"Add": 1}}],
        "latency_ms": {"p50": 3},
        "validation": {"max_abs": 1e-7},
        "sequence_length": 32,
    }
    assert strip_volatile(report) == {
        "passes": [{"name": "fold", "counts": {"Add": 1}}],
        "validation": {"max_abs": 1e-7},
        "sequence_length": 32,
    }


def _dict_difference(a: Any, b: Any, where: str = "report") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _dict_difference(a.get(key), b.get(key), f"{where}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _dict_difference(x, y, f"{where}[{i}]")
    return f"{where}: {a!r} vs {b!r}"
