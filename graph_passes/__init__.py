"""Graph passes: an ONNX graph in, a rewritten ONNX graph and a report of what changed out.

One pass per module, named for its effect (cleanup: `fold_constants`, `remove_*`, CSE; fusions: `fuse_*`;
`tag_sparsity_2to4`; `insert_qdq`; `convert_fp16`), each an onnx-ir pass or a set of onnxscript rewrite
rules. `pipeline.optimize(model, target)` runs the per-target pipeline (data, `PIPELINES`) and says per
layer which fusions were expected and which fired. This floor imports only `export_errors`: no engine,
no exporter stage.
"""
