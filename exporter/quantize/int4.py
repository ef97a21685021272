"""INT4 weight-only for KV-cache decoders: which weights, their input scales, and the two files.

1. Sites (`find_sites`): every MatMul with a constant 2-D weight [K, N] (q/k/v/o, gate/up/down, lm_head), its
   input tensor x, and where an AWQ input scale 1/s can be folded exactly:
   - x = RMSNorm(...)·gain (SimplifiedLayerNormalization, or the Mul by the gain in the unfused graph), read
     only by MatMuls: 1/s goes into the gain, shared by every weight reading x (q/k/v; gate/up; lm_head);
   - x = act(gate) ⊙ up (the gated MLP's product), read only by down: 1/s goes into up's output columns;
   - otherwise (o_proj after attention): no input scale, clipping only (AWQ does the same for GQA).
2. Rows of every x from the calibration set (`collect_rows`, on the fp32 graph as ONNX Runtime runs it).
3. The plan (`build_plan`): per group the AWQ scale search, folds, then every weight's clip search and block
   quantization (exporter/quantize/awq.py, exporter/quantize/blocks.py), 4-bit or 8-bit per node.
4. Files: MatMulNBits for ONNX Runtime CPU (`cpu_model`; embedding through GatherBlockQuantized), blocked
   DequantizeLinear at opset 21 for TensorRT (`tensorrt_model`). Both take the plan by node name, so the two
   backends run the same dequantized weights.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from exporter import progress
from exporter.quantize.awq import MAX_ROWS, Method, WeightReport, quantize_weight, search_input_scale
from exporter.quantize.blocks import BlockQuantized, dequantize_blocks, quantize_blocks, tensorrt_blocks
from exporter.quantize.calibration import CalibrationData
from exporter.quantize.int4_packed_gqa import fuse_packed_gqa
from exporter.quantize.int4_padding_bias import simplify_attention_bias
from exporter.quantize.int4_prelude import compact_lengths
from exporter.quantize.int4_qkv_bias import fold_split_biases
from exporter.quantize.int4_skip_norm import fuse_skip_norms
from exporter.quantize.ranges import _feeds_for, _session_with_outputs
from exporter.quantize.subgraph import GraphIndex
from graph_passes.dequantize_blockwise import MIN_OPSET, DequantizedWeight, MatMulToBlockwiseDequantize
from graph_passes.matmul_nbits import MS_DOMAIN, MatMulToNBits
from graph_passes.pack_matmuls import pack_matmuls
from graph_passes.remove_dead_nodes import RemoveDeadNodes

logger = logging.getLogger(__name__)

NORM_OPS = ("SimplifiedLayerNormalization", "LayerNormalization")
SHAPE_OPS = ("Shape", "Size")
EMBEDDING = "<embedding>"  # the token embedding's key in a bits map


@dataclasses.dataclass(frozen=True)
class Site:
    """One quantizable MatMul: weight initializer, input tensor, and the fold of an input scale, if any:
    ("gain", initializer) or ("columns", the up-projection MatMul's node name)."""

    node: str
    weight: str
    x: str
    fold: tuple[str, str] | None


@dataclasses.dataclass
class Plan:
    """The quantized decoder, independent of the file format."""

    weights: dict[str, BlockQuantized]  # MatMul node -> quantized weight (stored s·W when scaled)
    gains: dict[str, np.ndarray]  # initializer (norm gain) -> new value, 1/s folded in
    reports: dict[str, WeightReport]
    embedding: tuple[str, BlockQuantized] | None = None  # Gather table initializer -> quantized (as W = E^T)

    def bits(self) -> dict[str, int]:
        return {node: q.bits for node, q in self.weights.items()}


def find_sites(model: onnx.ModelProto) -> list[Site]:
    """Every MatMul with a constant 2-D weight, in graph order, with its foldable input-scale target."""
    graph = model.graph
    index = GraphIndex.of(graph)
    inits, producer, consumers, outputs = index.inits, index.producer, index.consumers, index.outputs

    def constant_matmul(node: onnx.NodeProto) -> bool:
        return (
            node.op_type == "MatMul"
            and node.domain in ("", "ai.onnx")
            and node.input[1] in inits
            and len(inits[node.input[1]].dims) == 2
        )

    def only_matmuls(tensor: str) -> bool:
        readers = [c for c in consumers[tensor] if c.op_type not in SHAPE_OPS]  # shape reads see no values
        return tensor not in outputs and all(constant_matmul(c) and c.input[0] == tensor for c in readers)

    def fold_of(x: str) -> tuple[str, str] | None:
        node = producer.get(x)
        if node is None or not only_matmuls(x):
            return None
        if node.op_type in NORM_OPS and len(node.input) > 1 and node.input[1] in inits:
            return ("gain", node.input[1])
        if node.op_type == "Mul":
            gains = [i for i in node.input if i in inits and len(inits[i].dims) == 1]
            if len(gains) == 1 and len(consumers[gains[0]]) == 1:  # x = normalized * gain (unfused RMSNorm)
                return ("gain", gains[0])
            for operand in node.input:
                up = producer.get(operand)
                if (
                    up is not None
                    and constant_matmul(up)
                    and len(consumers[operand]) == 1
                    and operand not in outputs
                ):
                    return ("columns", up.name)
        return None

    sites = []
    for node in graph.node:
        if constant_matmul(node):
            if not node.name:
                raise ValueError(
                    f"unnamed MatMul reading {node.input[1]}: INT4 weights are keyed by node name"
                )
            sites.append(Site(node.name, node.input[1], node.input[0], fold_of(node.input[0])))
    return sites


def collect_rows(
    model: onnx.ModelProto | Path, tensors: Iterable[str], data: CalibrationData, rows: int = MAX_ROWS
) -> dict[str, np.ndarray]:
    """Up to `rows` rows [M, K] of each tensor over the calibration batches, real tokens only, evenly spread."""
    names = list(dict.fromkeys(tensors))
    batches = data.num_batches("calibration")
    per_batch = -(-rows // max(batches, 1))
    collected: dict[str, list[np.ndarray]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        session = _session_with_outputs(model, names, Path(tmp))
        for feeds in progress.bar(data.batches("calibration"), total=batches, desc="int4: activations"):
            mask = feeds.get("attention_mask")
            for name, value in zip(names, session.run(names, _feeds_for(session, feeds)), strict=True):
                if mask is not None and value.ndim == 3 and value.shape[:2] == mask.shape:
                    flat = value[mask.astype(bool)]
                else:
                    flat = value.reshape(-1, value.shape[-1])
                if len(flat) > per_batch:
                    flat = flat[np.linspace(0, len(flat) - 1, per_batch).astype(np.int64)]
                collected[name].append(flat.astype(np.float32))
    return {name: np.concatenate(parts)[:rows] for name, parts in collected.items()}


@dataclasses.dataclass
class Prepared:
    """Weights after the AWQ input-scale search and folds, ready to be block-quantized at any bit width.
    Quantized weights are cached per (node, bits), so mixed-precision candidates cost no new searches."""

    sites: list[Site]
    weights: dict[str, np.ndarray]  # node -> fp32 W [K, N] after folds (columns of up divided by down's s)
    scales: dict[str, tuple[np.ndarray, float]]  # node -> (s, alpha) of its group
    gains: dict[str, np.ndarray]
    rows: Mapping[str, np.ndarray] | None
    method: Method
    block_size: int
    embedding: tuple[str, np.ndarray] | None = None
    activation_block: int | None = None  # errors measured with x rounded as MatMulNBits accuracy_level 4 does
    # node -> its own block size where it is not `block_size` (the lm_head: int4_stage.LM_HEAD_BLOCK_SIZE)
    block_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    _cache: dict[tuple[str, int], tuple[BlockQuantized, WeightReport]] = dataclasses.field(
        default_factory=dict
    )

    def block_of(self, node: str) -> int:
        """The block size of `node`'s weight (MatMulNBits' activation blocks at accuracy_level 4 follow it)."""
        return self.block_sizes.get(node, self.block_size)

    def quantized(self, node: str, bits: int) -> tuple[BlockQuantized, WeightReport]:
        if (node, bits) not in self._cache:
            site = next(s for s in self.sites if s.node == node)
            s, alpha = self.scales.get(node, (None, None))
            self._cache[(node, bits)] = quantize_weight(
                self.weights[node],
                bits=bits,
                block_size=self.block_of(node),
                method=self.method,
                activations=None if self.rows is None else self.rows[site.x],
                scale=s,
                alpha=alpha,
                activation_block=None if self.activation_block is None else self.block_of(node),
            )
        return self._cache[(node, bits)]

    def stored(self, node: str) -> np.ndarray:
        """The fp32 weight the file stores before rounding: s·W when the node has an input scale."""
        s = self.scales.get(node)
        return self.weights[node] if s is None else self.weights[node] * s[0][:, None]

    def plan(self, bits: Mapping[str, int] | None = None) -> Plan:
        """Every site (and the embedding, key `EMBEDDING`) at 4 bits unless `bits` says 8, or 0 (fp32)."""
        bits = bits or {}
        plan = Plan({}, dict(self.gains), {})
        for site in self.sites:
            width = bits.get(site.node, 4)
            if width not in (0, 4, 8):
                raise ValueError(f"{site.node}: bits must be 0, 4 or 8, got {width}")
            if width:
                plan.weights[site.node], plan.reports[site.node] = self.quantized(site.node, width)
            elif site.node in self.scales:
                raise ValueError(f"{site.node} has a folded input scale: it cannot stay fp32 unscaled")
        embedding_bits = bits.get(EMBEDDING, 4)
        if self.embedding is not None and embedding_bits:
            key = ("<embedding>", embedding_bits)
            if key not in self._cache:
                self._cache[key] = (
                    quantize_blocks(self.embedding[1].T, embedding_bits, self.block_size),
                    WeightReport("rtn", embedding_bits, self.block_size),
                )
            plan.embedding = (self.embedding[0], self._cache[key][0])
        return plan


def prepare(
    model: onnx.ModelProto,
    sites: list[Site],
    rows: Mapping[str, np.ndarray] | None,
    *,
    method: Method = "awq",
    block_size: int = 32,
    accuracy_level: int = 4,
    block_sizes: Mapping[str, int] | None = None,
) -> Prepared:
    """AWQ: input scales searched per group of weights sharing x (on their 4-bit error) and folded: down's
    into up's columns first (it changes up's weight before up's own search), then each norm gain's group.
    `accuracy_level` 4: the searches measure errors with x rounded as MatMulNBits' int8 path rounds it.
    `block_sizes`: nodes whose weight takes another block size than `block_size` (searched at it too)."""
    block_sizes = dict(block_sizes or {})
    act = block_size if accuracy_level == 4 else None

    def block(node: str) -> int:
        return block_sizes.get(node, block_size)

    def act_of(node: str) -> int | None:
        return None if act is None else block(node)

    inits = {i.name: i for i in model.graph.initializer}
    weights = {s.node: numpy_helper.to_array(inits[s.weight]).astype(np.float32) for s in sites}
    gains: dict[str, np.ndarray] = {}
    scales: dict[str, tuple[np.ndarray, float]] = {}
    if method == "awq" and rows is not None:
        for site in sites:
            if site.fold and site.fold[0] == "columns" and site.fold[1] in weights:
                s, alpha, _ = search_input_scale(
                    [weights[site.node]], rows[site.x], 4, block(site.node), act_of(site.node)
                )
                scales[site.node] = (s, alpha)
                weights[site.fold[1]] = weights[site.fold[1]] / s[None, :]
        groups: dict[str, list[Site]] = defaultdict(list)
        for site in sites:
            if site.fold and site.fold[0] == "gain":
                groups[site.fold[1]].append(site)
        for gain, members in groups.items():
            first = members[
                0
            ].node  # a group reads one x: its members share a block size (the lm_head is alone)
            s, alpha, _ = search_input_scale(
                [weights[m.node] for m in members], rows[members[0].x], 4, block(first), act_of(first)
            )
            gains[gain] = (numpy_helper.to_array(inits[gain]).astype(np.float32) / s).astype(np.float32)
            scales.update({m.node: (s, alpha) for m in members})
    table = embedding_table(model)
    embedding = None
    if table is not None and inits[table].dims[1] % block_size == 0:
        embedding = (table, numpy_helper.to_array(inits[table]).astype(np.float32))
    return Prepared(sites, weights, scales, gains, rows, method, block_size, embedding, act, block_sizes)


def embedding_table(model: onnx.ModelProto) -> str | None:
    """The token embedding: the Gather (axis 0) of a 2-D initializer by `input_ids`."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (
            node.op_type == "Gather"
            and node.input[0] in inits
            and len(inits[node.input[0]].dims) == 2
            and axis == 0
        ) and node.input[1] == "input_ids":
            return node.input[0]
    return None


def cpu_model(
    model: onnx.ModelProto,
    plan: Plan,
    accuracy_level: int = 4,
    pack: Sequence[str] = (),
    *,
    decode_fusions: bool = False,
    max_positions: int = 4096,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """MatMulNBits for every planned MatMul, gains folded, the embedding through GatherBlockQuantized.
    `pack`: projections (e.g. q/k/v, gate/up) sharing an input become one MatMulNBits + Split
    (graph_passes/pack_matmuls.py) where their bit widths agree: their quantized weights are concatenated
    along N, which is exact (every output column has its own blocks).
    `decode_fusions`: fewer nodes per decode step (int4_qkv_bias.py: biases after a packed projection's
    Split (Qwen2's q/k/v) fold into its MatMulNBits; int4_packed_gqa.py: the packed q/k/v feeds
    GroupQueryAttention with its own rotary, cos/sin tables of `max_positions` rows; int4_skip_norm.py:
    residual Add + RMSNorm -> SkipSimplifiedLayerNormalization; int4_padding_bias.py: the exported
    causal-and-padding mask -> a padding-only bias where the kernel's causality makes them equal;
    int4_prelude.py: the attention's length inputs from 3 shape reads), then dead nodes removed."""
    proto = _with_gains(model, plan.gains)
    if plan.embedding is not None:
        _quantize_gather(proto, *plan.embedding)
    weights = dict(plan.weights)
    if pack:
        unplanned = {n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in weights}
        groups = pack_matmuls(proto, pack, keep_separate=unplanned | _mixed_groups(proto, weights, pack))
        for packed, members in groups.items():
            weights[packed] = concatenated([weights.pop(m) for m in members])
    ir_model = ir.from_proto(proto)
    result = MatMulToNBits(weights, accuracy_level)(ir_model)
    report: dict[str, Any] = result.report.to_json()  # type: ignore[attr-defined]
    if not decode_fusions:
        return ir.to_proto(ir_model), report
    fused = ir.to_proto(ir_model)
    report["counts"]["MatMulNBits_bias_folded"] = fold_split_biases(fused)
    report["counts"]["GroupQueryAttention_packed_rotary"] = fuse_packed_gqa(fused, max_positions)
    report["counts"]["SkipSimplifiedLayerNormalization"] = fuse_skip_norms(fused)
    report["counts"]["GroupQueryAttention_padding_bias"] = simplify_attention_bias(fused, max_positions)
    report["counts"]["GroupQueryAttention_compact_lengths"] = compact_lengths(fused)
    ir_model = ir.from_proto(fused)
    RemoveDeadNodes()(ir_model)
    return ir.to_proto(ir_model), report


def widen_mixed_groups(
    model: onnx.ModelProto, bits: Mapping[str, int], roles: Sequence[str]
) -> dict[str, int]:
    """`bits` with every would-be packed group (MatMuls of `roles` sharing an input) that mixes 4 and 8 bits
    widened to 8 bits as a whole: the group then stays one packed MatMulNBits (and its attention keeps the
    packed, rotary-fused form) for a few more weight bytes, and accuracy can only gain."""
    groups: dict[str, list[str]] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type == "MatMul" and any(r in node.name for r in roles):
            groups[node.input[0]].append(node.name)
    widened = dict(bits)
    for names in groups.values():
        if len(names) > 1 and any(widened.get(n, 4) == 8 for n in names):
            widened.update({n: 8 for n in names if widened.get(n, 4) == 4})
    return widened


def concatenated(members: Sequence[BlockQuantized]) -> BlockQuantized:
    """Weights reading one input, packed along N: block quantization is per output column, so exact."""
    first = members[0]
    if any((q.bits, q.block_size, q.k) != (first.bits, first.block_size, first.k) for q in members):
        raise ValueError("packed weights must share bits, block size and K")
    return BlockQuantized(
        np.concatenate([q.packed for q in members]),
        np.concatenate([q.scales for q in members]),
        first.k,
        first.bits,
        first.block_size,
    )


def _mixed_groups(
    model: onnx.ModelProto, weights: Mapping[str, BlockQuantized], roles: Sequence[str]
) -> set[str]:
    """MatMuls of a would-be packed group whose bit widths differ: kept separate."""
    groups: dict[str, list[str]] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name in weights and any(r in node.name for r in roles):
            groups[node.input[0]].append(node.name)
    return {n for names in groups.values() if len({weights[m].bits for m in names}) > 1 for n in names}


def tensorrt_model(model: onnx.ModelProto, plan: Plan) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Opset 21, gains folded, each planned MatMul reading DequantizeLinear(int4 W, scales, block_size) rounded
    from the same pre-rounding weight as the CPU file, on TensorRT's positive-scale grid (blocks.tensorrt_blocks);
    8-bit nodes per output channel. K not a multiple of the block: zero weight rows and a Pad of x (0 · 0)."""
    proto = _with_gains(model, plan.gains)
    proto = with_opset(proto, MIN_OPSET)
    weights: dict[str, DequantizedWeight] = {}
    pads = {}
    for node, q in plan.weights.items():
        source = q.rounded_from if q.rounded_from is not None else dequantize_blocks(q)
        if q.bits == 8:  # TensorRT's block quantization is INT4 only: INT8 weight-only per output channel
            values, scales = tensorrt_blocks(source, 8, None)
            weights[node] = DequantizedWeight(values, scales[0], 0)
            continue
        values, scales = tensorrt_blocks(source, 4, q.block_size)
        if values.shape[0] > q.k:
            pads[node] = values.shape[0] - q.k
        weights[node] = DequantizedWeight(values, scales, q.block_size)
    _pad_inputs(proto, pads)
    ir_model = ir.from_proto(proto)
    result = MatMulToBlockwiseDequantize(weights)(ir_model)
    return ir.to_proto(ir_model), result.report.to_json()  # type: ignore[attr-defined]


def _with_gains(model: onnx.ModelProto, gains: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    found = set()
    for init in proto.graph.initializer:
        if init.name in gains:
            init.CopyFrom(numpy_helper.from_array(gains[init.name], init.name))
            found.add(init.name)
    missing = set(gains) - found
    if missing:
        raise ValueError(f"norm gains {sorted(missing)} not in the graph: the plan was made on another graph")
    return proto


def with_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """`model` at ONNX opset `version` at least (the version converter where it is older)."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= version:
        return model
    from onnx import version_converter

    return version_converter.convert_version(model, version)


def _pad_inputs(model: onnx.ModelProto, pads: Mapping[str, int]) -> None:
    """x -> Pad(x, zeros on the last axis) before the named MatMuls (their weights get zero rows)."""
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for node in nodes:
        if node.name in pads:
            pads_name, axes_name, out = (
                f"{node.name}_kpad",
                f"{node.name}_kpad_axes",
                f"{node.input[0]}_{node.name}_padded",
            )
            model.graph.initializer.extend(
                [
                    numpy_helper.from_array(np.array([0, pads[node.name]], np.int64), pads_name),
                    numpy_helper.from_array(np.array([-1], np.int64), axes_name),
                ]
            )
            model.graph.node.append(
                helper.make_node(
                    "Pad", [node.input[0], pads_name, "", axes_name], [out], name=f"{node.name}_kpad"
                )
            )
            node.input[0] = out
        model.graph.node.append(node)


def _quantize_gather(model: onnx.ModelProto, table: str, q: BlockQuantized) -> None:
    """Gather(E, ids) -> GatherBlockQuantized(E as uint8 [V, H/2] + scales [V, H/block]): the same packed
    layout MatMulNBits reads for E^T (so a tied lm_head could share it), zero point 2^(bits-1) by default."""
    graph = model.graph
    vocab = q.n
    data = numpy_helper.from_array(q.packed.reshape(vocab, -1), f"{table}_Q{q.bits}")
    scales = numpy_helper.from_array(q.scales, f"{table}_Q{q.bits}_scales")
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] == table:
            node.op_type, node.domain = "GatherBlockQuantized", MS_DOMAIN
            node.input[:] = [data.name, node.input[1], scales.name]
            del node.attribute[:]
            node.attribute.extend(
                [
                    helper.make_attribute("gather_axis", 0),
                    helper.make_attribute("quantize_axis", 1),
                    helper.make_attribute("block_size", q.block_size),
                    helper.make_attribute("bits", q.bits),
                ]
            )
    if any(n.input and n.input[0] == table for n in graph.node):
        raise ValueError(f"embedding {table} is read by more than its Gather")
    kept = [i for i in graph.initializer if i.name != table]
    del graph.initializer[:]
    graph.initializer.extend([*kept, data, scales])
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


SWITCH_INPUT = "int4_layer_switch"


def switchable_models(
    cpu_fp32: onnx.ModelProto,
    trt_fp32: onnx.ModelProto,
    prepared: Prepared,
    fixed: Mapping[str, int],
    candidates: list[str],
    accuracy_level: int = 4,
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The CPU and TensorRT files with every candidate computed both ways (4-bit and 8-bit) and picked by a
    bool graph input `SWITCH_INPUT` [len(candidates)] (True: 8 bits): one session per file serves the whole
    mixed-precision search, as exporter/quantize/sensitivity.py's switchable graph does for INT8."""
    plan4 = prepared.plan({**fixed, **dict.fromkeys(candidates, 4)})
    plan8 = prepared.plan({**fixed, **dict.fromkeys(candidates, 8)})
    cpu, _ = cpu_model(cpu_fp32, plan4, accuracy_level)
    cpu8, _ = cpu_model(cpu_fp32, plan8, accuracy_level)
    trt, _ = tensorrt_model(trt_fp32, plan4)
    trt8, _ = tensorrt_model(trt_fp32, plan8)
    index = {name: i for i, name in enumerate(candidates)}
    embedding = plan4.embedding[0] if plan4.embedding else None

    def cpu_twin(node: onnx.NodeProto) -> str | None:
        if node.op_type == "MatMulNBits":
            return node.name.removesuffix("_Q4") if node.name.endswith("_Q4") else None
        if node.op_type == "GatherBlockQuantized" and embedding:
            return EMBEDDING
        return None

    def trt_twin(node: onnx.NodeProto) -> str | None:
        return node.name if node.op_type == "MatMul" and node.name in index else None

    return (
        _switched(
            cpu,
            cpu8,
            index,
            cpu_twin,
            lambda n: n.name.removesuffix("_Q4") + "_Q8" if n.op_type == "MatMulNBits" else n.name,
        ),
        _switched(trt, trt8, index, trt_twin, lambda n: n.name),
    )


def _switched(low: onnx.ModelProto, high: onnx.ModelProto, index, key_of, twin_name) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    """`low` with each switchable node (key_of(node) in index) also computed as in `high` (the node named
    twin_name(node) there, plus the nodes feeding it that `low` lacks), then Where(switch[i], high, low)."""
    model = onnx.ModelProto()
    model.CopyFrom(low)
    graph = model.graph
    high_nodes = {n.name: n for n in high.graph.node}
    high_producer = {o: n for n in high.graph.node for o in n.output}
    high_inits = {i.name: i for i in high.graph.initializer}
    have_inits = {i.name for i in graph.initializer}
    low_values = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | have_inits
    graph.input.append(helper.make_tensor_value_info(SWITCH_INPUT, onnx.TensorProto.BOOL, [len(index)]))
    nodes = []
    for node in graph.node:
        key = key_of(node)
        if key is None or key not in index or twin_name(node) not in high_nodes:
            nodes.append(node)
            continue
        twin = onnx.NodeProto()
        twin.CopyFrom(high_nodes[twin_name(node)])
        feeders = []
        for position, value in enumerate(twin.input):  # DequantizeLinear of the 8-bit weight (TensorRT file)
            producer = high_producer.get(value)
            if value and value not in low_values and producer is not None:
                feeder = onnx.NodeProto()
                feeder.CopyFrom(producer)
                feeder.name += "_switch8"
                feeder.output[0] += "_switch8"
                twin.input[position] = feeder.output[0]
                feeders.append(feeder)
        for extra in [*twin.input, *(i for f in feeders for i in f.input)]:
            if extra in high_inits and extra not in have_inits:
                graph.initializer.append(high_inits[extra])
                have_inits.add(extra)
        out = node.output[0]
        twin.name = f"{node.name}_switch8"
        twin.output[0] = f"{out}_switch8"
        node.output[0] = f"{out}_switch4"
        i = index[key]
        select = f"{SWITCH_INPUT}_{i}"
        graph.initializer.append(numpy_helper.from_array(np.array(i, np.int64), f"{select}_index"))
        nodes.extend([*feeders, twin, node])
        nodes.append(
            helper.make_node("Gather", [SWITCH_INPUT, f"{select}_index"], [select], name=f"{select}_gather")
        )
        nodes.append(
            helper.make_node("Where", [select, twin.output[0], node.output[0]], [out], name=f"{select}_where")
        )
    del graph.node[:]
    graph.node.extend(nodes)
    return model
