"""Stage 5, quantize: the fp32 ONNX -> INT8 (or INT4) files, one per backend, each gated on held-out accuracy.

Enters: the exported fp32 graph, calibration data (`calibration`, `decoder_calibration`), the config.
Leaves: `model.int8.onnx` (Q/DQ for TensorRT: `ranges`, `smooth`, `sensitivity`, `int8`) and
`model.int8.cpu.onnx` (ONNX Runtime's integer kernels: `cpu_int8`, `outliers`, with the weight range
chosen by `cpu_features`), and the report section (`int8_stage` orders it all).
`--precision int4` (KV-cache decoders): `model.int4.cpu.onnx` (MatMulNBits) and `model.int4.onnx` (blocked
DequantizeLinear for TensorRT) from one plan: `blocks` (per-weight block quantization, bit-exact with ONNX
Runtime), `awq` (activation-aware input scales and clipping), `int4` (sites, folds, the files), `int4_stage`;
the CPU file's decode graph: `int4_packed_gqa`, `int4_skip_norm`, `int4_padding_bias` (their graph lookups and
slices: `subgraph`).
"""
