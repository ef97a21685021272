"""Rewrite rules tried only at nodes of their root op type (graph_passes/_rules.py `dispatch_on_root`):
the same graph and the same report (counts, failure reasons per rule and layer) as onnxscript trying every
rule at every node, on the exported test models (encoder, decoders with and without a KV cache) and the
hand-built decomposed graphs; and far fewer match attempts."""

from __future__ import annotations

import json

import graph_models as gm
import onnx
import pytest
from onnxscript.rewriter import _matcher
from test_decoder_export import build_pruned_model

from exporter.export.decoder_with_past import export_decoder_with_past
from graph_passes import _rules
from graph_passes.pipeline import optimize


def _kv_cache_llama(tmp_path) -> onnx.ModelProto:
    path = tmp_path / "decoder.onnx"
    export_decoder_with_past(build_pruned_model("llama", seed=1), path)
    return onnx.load(str(path))


MODELS = {
    "bert": (lambda _: gm.bert_onnx(), "bert"),
    "llama": (lambda _: gm.llama_onnx(), "llama"),
    "qwen2": (lambda _: gm.qwen2_onnx(), "qwen2"),
    "llama-kv-cache": (_kv_cache_llama, "llama"),
    "decomposed-layernorm": (lambda _: gm.decomposed_layernorm_graph(), None),
    "decomposed-gelu-erf": (lambda _: gm.decomposed_gelu_graph("erf"), None),
    "decomposed-gelu-tanh": (lambda _: gm.decomposed_gelu_graph("tanh"), None),
    "decomposed-rmsnorm": (lambda _: gm.decomposed_rmsnorm_graph(), None),
}


def _without_seconds(report: dict) -> str:
    report = dict(report, seconds=0)
    report["passes"] = [dict(p, seconds=0) for p in report["passes"]]
    return json.dumps(report, sort_keys=True)


def _run(model: onnx.ModelProto, family: str | None, target: str, monkeypatch, dispatch: bool):
    counter = {"attempts": 0}
    match = _matcher.SimplePatternMatcher.match

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        counter["attempts"] += 1
        return match(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(_matcher.SimplePatternMatcher, "match", counted)
        if not dispatch:
            patch.setattr(_rules, "dispatch_on_root", lambda rule: rule)
        out, report = optimize(model, target, family=family)
    return out.SerializeToString(), _without_seconds(report.to_json()), counter["attempts"]


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
@pytest.mark.parametrize("name", list(MODELS))
def test_dispatch_on_root_changes_neither_graph_nor_report(name, target, monkeypatch, tmp_path):
    build, family = MODELS[name]
    model = build(tmp_path)
    every_node = _run(model, family, target, monkeypatch, dispatch=False)
    at_root = _run(model, family, target, monkeypatch, dispatch=True)
    assert at_root[0] == every_node[0]  # byte-identical graph
    assert at_root[1] == every_node[1]  # same counts, fusions and failure reasons
    # the point: attempts at nodes of another op type are never made (most of them on a whole model)
    assert at_root[2] < every_node[2] / (3 if family else 1)


def test_failure_reasons_survive_the_dispatch(monkeypatch, tmp_path):
    """A rule whose root matches but whose pattern fails deeper still reports why (the GELU rules at
    the Llama's SiLU: 'not a constant, expecting 0.5'), as without the dispatch."""
    model = MODELS["llama"][0](tmp_path)
    _, report, _ = _run(model, "llama", "onnxruntime", monkeypatch, dispatch=True)
    gelu = next(p for p in json.loads(report)["passes"] if p["name"] == "fuse-gelu")
    assert gelu["details"] and all(d["status"] != "SUCCESS" for d in gelu["details"])
