"""Golden test models for the graph passes, written as seeded code (no binary files).

Two kinds:
- exported HF models (`bert_onnx`, `llama_onnx`, `qwen2_onnx`): tiny configs, seeded random weights,
  then *head- and FFN-pruned per layer* by slicing the Linear layers, so that layer 0 and layer 1
  have different head counts and FFN widths, exactly like a structurally pruned model. Exported with
  exporter.export.torch_to_onnx.export_to_onnx (TorchScript exporter, opset 17, eager attention).
- small hand-built graphs (`decomposed_layernorm_graph`, ...) with one decomposed pattern each, for the
  positive / negative tests of single passes.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HEAD_DIM = 16  # ONNX Runtime GroupQueryAttention needs head_size % 16 == 0
BERT_HEADS = (4, 3)  # heads kept per layer
BERT_FFN = (48, 40)
LLAMA_HEADS = ((4, 2), (2, 1))  # (q heads, kv heads) kept per layer
LLAMA_FFN = (40, 24)


# ----------------------------------------------------------------------------- slicing helpers
def _slice_linear(linear, rows=None, cols=None):  # type: ignore[no-untyped-def]
    """A new nn.Linear keeping output `rows` and input `cols` of `linear` (bias follows rows)."""
    import torch

    weight = linear.weight.data
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    has_bias = linear.bias is not None
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    new.weight.data = weight.clone()
    if has_bias:
        bias = linear.bias.data
        new.bias.data = (bias[rows] if rows is not None else bias).clone()
    return new


def _head_rows(heads: int) -> list[int]:
    return list(range(heads * HEAD_DIM))


def _perturb(model, seed: int):  # type: ignore[no-untyped-def]
    """Add seeded noise to every parameter: HF initialises biases to 0 and norm weights to 1, which
    would let a fusion that drops a bias or a norm weight pass the numeric tests."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model


# ----------------------------------------------------------------------------- BERT
def build_bert(heads: Sequence[int] = BERT_HEADS, ffn: Sequence[int] = BERT_FFN, seed: int = 0):  # type: ignore[no-untyped-def]
    """A 2-layer BertModel (hidden 64, 4 heads of 16) pruned to `heads`/`ffn` per layer."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=len(heads),
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    for layer, n_heads, width in zip(model.encoder.layer, heads, ffn, strict=True):
        att = layer.attention
        rows = _head_rows(n_heads)
        att.self.query = _slice_linear(att.self.query, rows=rows)
        att.self.key = _slice_linear(att.self.key, rows=rows)
        att.self.value = _slice_linear(att.self.value, rows=rows)
        att.self.num_attention_heads = n_heads
        att.self.all_head_size = n_heads * HEAD_DIM
        att.output.dense = _slice_linear(att.output.dense, cols=rows)
        keep = list(range(width))
        layer.intermediate.dense = _slice_linear(layer.intermediate.dense, rows=keep)
        layer.output.dense = _slice_linear(layer.output.dense, cols=keep)
    return _perturb(model, seed)


def bert_example(batch: int = 2, seq: int = 7, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[0, seq - 2 :] = 0  # padding in the first row: the mask path matters
    return {
        "input_ids": rng.integers(0, 100, (batch, seq), dtype=np.int64),
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }


# ----------------------------------------------------------------------------- Llama / Qwen2
def build_decoder(family: str, heads=LLAMA_HEADS, ffn=LLAMA_FFN, seed: int = 0):  # type: ignore[no-untyped-def]
    """A 2-layer Llama or Qwen2 causal LM (hidden 64, 4 q / 2 kv heads of 16) pruned per layer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cls_config, cls_model = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    config = cls_config(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=len(heads),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        intermediate_size=48,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = cls_model(config).eval()
    for layer, (n_q, n_kv), width in zip(model.model.layers, heads, ffn, strict=True):
        att = layer.self_attn
        att.q_proj = _slice_linear(att.q_proj, rows=_head_rows(n_q))
        att.k_proj = _slice_linear(att.k_proj, rows=_head_rows(n_kv))
        att.v_proj = _slice_linear(att.v_proj, rows=_head_rows(n_kv))
        att.o_proj = _slice_linear(att.o_proj, cols=_head_rows(n_q))
        att.num_key_value_groups = n_q // n_kv
        keep = list(range(width))
        layer.mlp.gate_proj = _slice_linear(layer.mlp.gate_proj, rows=keep)
        layer.mlp.up_proj = _slice_linear(layer.mlp.up_proj, rows=keep)
        layer.mlp.down_proj = _slice_linear(layer.mlp.down_proj, cols=keep)
    return _perturb(model, seed)


def decoder_example(batch: int = 2, seq: int = 7, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[0, :2] = 0  # left padding in the first row
    return {"input_ids": rng.integers(0, 100, (batch, seq), dtype=np.int64), "attention_mask": mask}


# ----------------------------------------------------------------------------- export (cached)
def _export(wrapper, example: dict[str, np.ndarray]) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    import torch

    from exporter.export.torch_to_onnx import export_to_onnx

    tensors = {k: torch.from_numpy(v) for k, v in example.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_to_onnx(wrapper, tensors, Path(tmp) / "model.onnx")
        return onnx.load(str(path))


@functools.cache
def _bert_bytes() -> bytes:
    from exporter.export.torch_to_onnx import EncoderForExport

    wrapper = EncoderForExport(build_bert(), uses_token_type_ids=True, pooling=None)
    return _export(wrapper, bert_example()).SerializeToString()


@functools.cache
def _decoder_bytes(family: str) -> bytes:
    from exporter.export.torch_to_onnx import CausalLMForExport

    return _export(CausalLMForExport(build_decoder(family)), decoder_example()).SerializeToString()


def bert_onnx() -> onnx.ModelProto:
    """The exported pruned BERT (layer heads 4, 3; FFN 48, 40). A fresh copy on every call."""
    return onnx.load_from_string(_bert_bytes())


def llama_onnx() -> onnx.ModelProto:
    """The exported pruned Llama (layer heads q/kv 4/2, 2/1; FFN 40, 24). A fresh copy on every call."""
    return onnx.load_from_string(_decoder_bytes("llama"))


def qwen2_onnx() -> onnx.ModelProto:
    """The exported pruned Qwen2 (q/k/v with bias; same shapes as llama_onnx)."""
    return onnx.load_from_string(_decoder_bytes("qwen2"))


# ----------------------------------------------------------------------------- hand-built graphs
def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "golden", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _f32(name: str, shape) -> onnx.ValueInfoProto:  # type: ignore[no-untyped-def]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def decomposed_layernorm_graph(hidden: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x -> ReduceMean/Sub/Pow/ReduceMean/Add eps/Sqrt/Div/Mul gamma/Add beta (LayerNorm as older exporters write it)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["norm"]),
        helper.make_node("Mul", ["norm", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    inits = [
        _init("two", np.float32(2.0)),
        _init("eps", np.float32(1e-5)),
        _init("gamma", rng.standard_normal(hidden).astype(np.float32)),
        _init("beta", rng.standard_normal(hidden).astype(np.float32)),
    ]
    return _model(nodes, [_f32("x", ["b", "s", hidden])], [_f32("y", ["b", "s", hidden])], inits)


def decomposed_gelu_graph(form: str = "erf", hidden: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x @ W + b -> GELU written out (erf form, or the tanh approximation)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["h"])]
    inits = [
        _init("w", rng.standard_normal((hidden, hidden)).astype(np.float32)),
        _init("b", rng.standard_normal(hidden).astype(np.float32)),
        _init("half", np.float32(0.5)),
        _init("one", np.float32(1.0)),
    ]
    if form == "erf":
        inits.append(_init("sqrt2", np.float32(np.sqrt(2.0))))
        nodes += [
            helper.make_node("Div", ["h", "sqrt2"], ["hs"]),
            helper.make_node("Erf", ["hs"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["e1"]),
            helper.make_node("Mul", ["h", "e1"], ["he"]),
            helper.make_node("Mul", ["he", "half"], ["y"]),
        ]
    else:
        inits += [
            _init("c", np.float32(0.044715)),
            _init("three", np.float32(3.0)),
            _init("k", np.float32(np.sqrt(2.0 / np.pi))),
        ]
        nodes += [
            helper.make_node("Pow", ["h", "three"], ["h3"]),
            helper.make_node("Mul", ["h3", "c"], ["ch3"]),
            helper.make_node("Add", ["h", "ch3"], ["inner"]),
            helper.make_node("Mul", ["inner", "k"], ["ki"]),
            helper.make_node("Tanh", ["ki"], ["t"]),
            helper.make_node("Add", ["t", "one"], ["t1"]),
            helper.make_node("Mul", ["h", "half"], ["hh"]),
            helper.make_node("Mul", ["hh", "t1"], ["y"]),
        ]
    return _model(nodes, [_f32("x", ["b", "s", hidden])], [_f32("y", ["b", "s", hidden])], inits)


def decomposed_rmsnorm_graph(hidden: int = 16, seed: int = 0) -> onnx.ModelProto:
    """Llama's RMSNorm: Pow 2 / ReduceMean / Add eps / Sqrt / Div 1 / Mul / Mul weight."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["x2"]),
        helper.make_node("ReduceMean", ["x2"], ["ms"], axes=[-1]),
        helper.make_node("Add", ["ms", "eps"], ["ms_eps"]),
        helper.make_node("Sqrt", ["ms_eps"], ["rms"]),
        helper.make_node("Div", ["one", "rms"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["norm"]),
        helper.make_node("Mul", ["gamma", "norm"], ["y"]),
    ]
    inits = [
        _init("two", np.float32(2.0)),
        _init("one", np.float32(1.0)),
        _init("eps", np.float32(1e-6)),
        _init("gamma", rng.standard_normal(hidden).astype(np.float32)),
    ]
    return _model(nodes, [_f32("x", ["b", "s", hidden])], [_f32("y", ["b", "s", hidden])], inits)


def cleanup_graph(hidden: int = 16, seed: int = 0) -> onnx.ModelProto:
    """Identity, a Cast to the same type, a dead branch, a foldable constant chain and a duplicated
    subexpression: everything the cleanup stage removes, once each."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Identity", ["x"], ["x_id"]),
        helper.make_node("Cast", ["x_id"], ["x_cast"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["c1", "c2"], ["c12"]),  # constant: folded
        helper.make_node("Add", ["x_cast", "c12"], ["a"]),
        helper.make_node("Relu", ["a"], ["r1"]),
        helper.make_node("Relu", ["a"], ["r2"]),  # duplicate of r1: CSE
        helper.make_node("Add", ["r1", "r2"], ["y"]),
        helper.make_node("Neg", ["x"], ["dead"]),  # unused: removed
    ]
    inits = [
        _init("c1", rng.standard_normal(hidden).astype(np.float32)),
        _init("c2", rng.standard_normal(hidden).astype(np.float32)),
    ]
    return _model(nodes, [_f32("x", ["b", hidden])], [_f32("y", ["b", hidden])], inits)


def matmul_weights_graph(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x -> MatMul(w_i) chained, one per entry; used by the 2:4 sparsity tests."""
    nodes, inits, prev = [], [], "x"
    first = next(iter(weights.values()))
    for i, (name, w) in enumerate(weights.items()):
        out = "y" if i == len(weights) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, name], [out], name=f"matmul_{name}"))
        inits.append(_init(name, w.astype(np.float32)))
        prev = out
    last = list(weights.values())[-1]
    return _model(nodes, [_f32("x", ["b", first.shape[0]])], [_f32("y", ["b", last.shape[1]])], inits)


# ----------------------------------------------------------------------------- numeric checks
def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run on ONNX Runtime CPU with its graph optimizations OFF, so ORT cannot hide a rewrite bug."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_outputs(
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    valid: np.ndarray | None = None,
) -> float:
    """Every output of `rewritten` equals `original`'s within the fp32 tolerance (exporter/validate/tolerances.py).
    `valid` ([B, S] bool) restricts the comparison to real (non-padding) token positions."""
    from exporter.validate.tolerances import tolerance

    bound = tolerance("fp32").max_abs
    worst = 0.0
    for index, (want, got) in enumerate(
        zip(run_ort(original, feeds), run_ort(rewritten, feeds), strict=True)
    ):
        assert want.shape == got.shape, f"output {index}: shape {got.shape} != {want.shape}"
        diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
        if valid is not None and diff.ndim >= 2 and diff.shape[:2] == valid.shape:
            diff = diff * valid.reshape(valid.shape + (1,) * (diff.ndim - 2))
        where = np.unravel_index(int(diff.argmax()), diff.shape) if diff.size else ()
        assert diff.max(initial=0.0) <= bound, (
            f"output {index}: max |diff| {diff.max():.3e} > {bound:.0e} at {where} "
            f"(original {want[where]!r}, rewritten {got[where]!r})"
        )
        worst = max(worst, float(diff.max(initial=0.0)))
    return worst


def random_feeds(
    model: onnx.ModelProto, batch: int = 2, seq: int = 5, seed: int = 0
) -> dict[str, np.ndarray]:
    """Float feeds for a hand-built graph: symbolic dims become batch / seq."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        symbolic = iter([batch, seq])
        shape = [d if d is not None else next(symbolic) for d in dims]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(node.op_type for node in model.graph.node))


def apply_pass(graph_pass, model: onnx.ModelProto):  # type: ignore[no-untyped-def]
    """Run one of our passes on a proto copy; returns (new proto, PassReport)."""
    import onnx_ir as ir

    ir_model = ir.serde.deserialize_model(model)
    result = graph_pass(ir_model)
    ops = {n.domain for n in ir_model.graph if n.domain}
    for domain in ops:
        ir_model.opset_imports.setdefault(domain, 1)
    return ir.serde.serialize_model(ir_model), result.report


def with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference (fusion checks read ranks), as the pipeline's infer-shapes pass does."""
    return onnx.shape_inference.infer_shapes(model)


def skip_layernorm_graph(hidden: int = 16, seed: int = 0, simplified: bool = False) -> onnx.ModelProto:
    """h = x @ W + b; y = LayerNorm(h + residual) (or a decomposed RMSNorm of it)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["b", "xw"], ["h"]),  # bias first, as the TorchScript exporter writes it
        helper.make_node("Add", ["h", "residual"], ["s"]),
    ]
    inits = [
        _init("w", rng.standard_normal((hidden, hidden)).astype(np.float32)),
        _init("b", rng.standard_normal(hidden).astype(np.float32)),
        _init("gamma", rng.standard_normal(hidden).astype(np.float32)),
        _init("beta", rng.standard_normal(hidden).astype(np.float32)),
    ]
    if simplified:  # decomposed RMSNorm (fuse_rmsnorm turns it into SimplifiedLayerNormalization)
        inits += [
            _init("two", np.float32(2.0)),
            _init("one", np.float32(1.0)),
            _init("eps", np.float32(1e-6)),
        ]
        nodes += [
            helper.make_node("Pow", ["s", "two"], ["s2"]),
            helper.make_node("ReduceMean", ["s2"], ["ms"], axes=[-1]),
            helper.make_node("Add", ["ms", "eps"], ["ms_eps"]),
            helper.make_node("Sqrt", ["ms_eps"], ["rms"]),
            helper.make_node("Div", ["one", "rms"], ["inv"]),
            helper.make_node("Mul", ["s", "inv"], ["norm"]),
            helper.make_node("Mul", ["gamma", "norm"], ["y"]),
        ]
    else:
        nodes.append(
            helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)
        )
    inputs = [_f32("x", ["b", "s", hidden]), _f32("residual", ["b", "s", hidden])]
    return _model(nodes, inputs, [_f32("y", ["b", "s", hidden])], inits)


def insert_weight_and_input_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """A stand-in for the INT8 helper's pass, for the Q/DQ-preservation tests: symmetric per-tensor
    Q/DQ (zero point 0) on every MatMul's activation input and constant weight."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            weight = numpy_helper.to_array(inits[node.input[1]])
            scale = float(np.abs(weight).max() / 127.0) or 1.0
            q = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
            qname = node.input[1] + "_int8"
            model.graph.initializer.append(numpy_helper.from_array(q, qname))
            model.graph.initializer.append(numpy_helper.from_array(np.float32(scale), qname + "_scale"))
            model.graph.initializer.append(numpy_helper.from_array(np.int8(0), qname + "_zp"))
            model.graph.initializer.append(numpy_helper.from_array(np.float32(0.05), qname + "_act_scale"))
            wdq, xq, xdq = qname + "_dq", qname + "_xq", qname + "_xdq"
            new_nodes += [
                helper.make_node("DequantizeLinear", [qname, qname + "_scale", qname + "_zp"], [wdq]),
                helper.make_node(
                    "QuantizeLinear", [node.input[0], qname + "_act_scale", qname + "_zp"], [xq]
                ),
                helper.make_node("DequantizeLinear", [xq, qname + "_act_scale", qname + "_zp"], [xdq]),
            ]
            node.input[0], node.input[1] = xdq, wdq
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return model
