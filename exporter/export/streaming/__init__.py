"""Streaming export of KV-cache decoders larger than memory: one decoder layer at a time.

Why: the whole-model path (exporter/api.py) loads, merges, masks and traces the model in fp32 at once
and peaks at ~2.65x the fp32 weight bytes, so an 8B model needs ~85 GiB. Here the checkpoint is read
one tensor at a time (`exporter.model_dir.lazy_weights`) and the model is exported in pieces:
`pieces` (the wrappers traced: the prefix = embeddings, rotary cos/sin and the causal masks as the
HF model computes them; one wrapper per decoder layer at its own compact widths; the suffix = final
norm and LM head), `layer_source` (one layer read, LoRA-merged by PEFT under its own module names,
masked, planned and compacted), `stitch` (each piece's ONNX appended to one graph, its weights to
one external-data file, then dropped), `stream` (the driver: per layer, the PyTorch reference on real
hidden states, the compact layer checked against it, its ONNX checked against the compact layer on
ONNX Runtime, then freed), `reuse` (one trace per layer signature, its graph reused with each layer's
weights), `piecewise` (cut a piece out of a lazily loaded graph and splice its rewrite back: what
exporter/quantize/per_piece.py quantizes the INT8/INT4 CPU files of a model too large to load with). `choose` decides when
the API takes this path.

The stitched graph has the whole-model export's I/O names, KV-cache contract and node names
(`/model/model/layers.{i}/...`, what the fusions' layer numbering reads), so the graph passes run on it.
"""
