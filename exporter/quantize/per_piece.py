"""The CPU INT8 / INT4 files of a streamed decoder, quantized one piece at a time (no fp32 graph in memory).

Same code as the whole-model stages, per piece (exporter/export/streaming/piecewise.py): cleanup, then our
onnxruntime fusions (RMSNorm, GroupQueryAttention) on the graph loaded lazily by onnx-ir; then
- `nbits_cpu_file` (what the export writes, both precisions): each decoder layer's MatMuls block-quantized
  (exporter/quantize/int4.py `prepare` + `cpu_model`, round to nearest, q/k/v and gate/up packed as there)
  at the widths `PieceBits` gives per piece, the LM head and the embedding (GatherBlockQuantized) in column
  chunks (exact: every column has its own blocks); each piece's quantized weights go straight to the final
  data file (exporter/export/streaming/spill.py). INT8 = every piece 8-bit (`INT8_PIECE_BITS`); INT4 = the
  early layers and the embedding 8-bit, the rest 4-bit (`int4_piece_bits`). Both widths were chosen by
  end-to-end measurement (README "Streaming export of large decoders").
- `int8_cpu_file`: ONNX Runtime's `quantize_dynamic` per piece (exporter/quantize/cpu_int8.build, per-tensor
  u8 activations) and exporter/quantize/embeddings.py, equal to the whole-model INT8 stage's CPU file;
  kept and tested, no longer the streamed export's INT8 file (it missed the int8 gate at 8B: cosine 0.961).

What the whole-model stages do that this does not (each needs the whole model in memory or many runs of it):
the held-out sensitivity search, the outlier-channel split, SmoothQuant and the static-range Q/DQ file for
TensorRT (INT8); AWQ input scales, the searched 4/8-bit mix, the decode fusions (packed GQA with rotary,
skip norms) and the TensorRT file (INT4). The API gates the file end to end instead (exporter/api.py:
prefill and cached decode steps vs the streamed PyTorch reference).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from exporter.export.streaming import piecewise
from exporter.progress import bar as progress_bar
from exporter.quantize import cpu_int8
from exporter.quantize.embeddings import MIN_ELEMENTS, quantize_embeddings
from graph_passes.pipeline import optimize_ir

INT4_LM_HEAD_CHUNK = 8192  # LM head / embedding columns block-quantized at a time
# A MatMul weight above this many bytes (the LM head: 2 GiB in fp32 at 8B) goes through quantize_dynamic a
# chunk of columns at a time: ONNX Runtime's quantizer holds ~5 copies of the model it is given (measured:
# 5.3 GiB peak for the 1 GiB LM head of the 1B shape).
INT8_CHUNK_BYTES = 256 * 2**20


def _int8_table_in_row_chunks(gather: ir.Node, scratch: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """quantize_embeddings of the Gather's table, its rows quantized a chunk at a time (`quantize_rows` is
    per row, so the concatenation is the whole table's): the rewrite is made on a piece holding the first
    chunk, then its int8 table and row scales are replaced by the whole ones."""
    from onnx import helper, numpy_helper

    from exporter.quantize.embeddings import SUFFIXES, quantize_rows

    table, ids = gather.inputs[0], gather.inputs[1]
    assert table is not None and ids is not None and table.const_value is not None
    array = table.const_value.numpy()
    rows, width = array.shape
    step = max(-(-MIN_ELEMENTS // width), INT8_CHUNK_BYTES // (4 * width))
    first = np.ascontiguousarray(array[:step], dtype=np.float32)
    graph = helper.make_graph(
        [ir.serde.serialize_node(gather)],
        "table",
        [helper.make_tensor_value_info(str(ids.name), onnx.TensorProto.INT64, None)],
        [helper.make_tensor_value_info(str(gather.outputs[0].name), onnx.TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(first, str(table.name))],
    )
    piece = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rewritten, done = quantize_embeddings(piece)
    if len(done) != 1:
        raise ValueError(f"embedding table {table.name}: not quantized by quantize_embeddings")
    parts = [quantize_rows(np.asarray(array[r : r + step], dtype=np.float32)) for r in range(0, rows, step)]
    q = np.concatenate([p[0] for p in parts])
    scale = np.concatenate([p[1] for p in parts])
    error = max(
        float(np.max(np.abs(p[0].astype(np.float32) * p[1] - array[r : r + step])))
        for p, r in zip(parts, range(0, rows, step))
    )
    del parts, array, first
    if isinstance(table.const_value, ir.ExternalTensor):
        table.const_value.release()
    q_name, s_name = (str(table.name) + suffix for suffix in SUFFIXES)
    for tensor in rewritten.graph.initializer:
        if tensor.name in (q_name, s_name):
            tensor.CopyFrom(numpy_helper.from_array(q if tensor.name == q_name else scale, tensor.name))
    report = {
        **done[0].to_json(),
        "shape": [rows, width],
        "bytes_before": rows * width * 4,
        "bytes_after": q.nbytes + scale.nbytes,
        "max_abs_err": error,
    }
    return rewritten, report


def _nbytes(value: ir.Value) -> int:
    const = value.const_value
    return 0 if const is None else int(np.prod(const.shape.numpy()) * const.dtype.itemsize)


def _int8_in_column_chunks(node: ir.Node, scratch: Path, reduce_range: bool) -> onnx.ModelProto:
    """quantize_dynamic of one MatMul with a large weight W [K, N], run on column chunks of W and the chunks'
    quantized weights, scales and zero points concatenated along N into the first chunk's model: per-channel
    quantization treats every column alone, so this is the model quantize_dynamic writes for the whole W."""
    from onnx import helper, numpy_helper

    x, weight = node.inputs[0], node.inputs[1]
    assert x is not None and weight is not None and weight.const_value is not None
    array = weight.const_value.numpy()
    k, n = array.shape
    step = max(1, INT8_CHUNK_BYTES // (4 * k))
    chunks: list[dict[str, np.ndarray]] = []
    first: onnx.ModelProto | None = None
    x_info = ir.serde.serialize_value(x) if x.type is not None else None
    for c in range(0, n, step):
        part = np.ascontiguousarray(array[:, c : c + step], dtype=np.float32)
        graph = helper.make_graph(
            [ir.serde.serialize_node(node)],
            "chunk",
            [x_info or helper.make_tensor_value_info(str(x.name), onnx.TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info(str(node.outputs[0].name), onnx.TensorProto.FLOAT, None)],
            initializer=[numpy_helper.from_array(part, str(weight.name))],
        )
        del part
        mini = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        mini.ir_version = 8
        onnx.save_model(mini, str(scratch / "chunk.onnx"))
        del mini, graph
        result = onnx.load(
            str(
                cpu_int8.build(scratch / "chunk.onnx", scratch / "chunk.int8.onnx", frozenset(), reduce_range)
            )
        )
        sized = {
            t.name: numpy_helper.to_array(t)
            for t in result.graph.initializer
            if t.dims and t.dims[-1] == min(step, n - c)
        }
        chunks.append(sized)
        if first is None:
            first = result
    del array
    if isinstance(weight.const_value, ir.ExternalTensor):
        weight.const_value.release()
    assert first is not None
    if len(chunks) > 1:
        for tensor in first.graph.initializer:
            if tensor.name in chunks[0]:
                whole = np.concatenate([c[tensor.name] for c in chunks], axis=-1)
                tensor.CopyFrom(numpy_helper.from_array(whole, tensor.name))
    return first


def _fused(exported: Path, family: str, fuse: bool = True) -> tuple[ir.Model, dict[str, Any]]:
    """The exported graph (weights lazily on disk) after cleanup and (`fuse`) our onnxruntime fusions: what
    int8_stage's `_our_fusions` and int4_stage's CPU file start from; without `fuse`, the cleaned graph
    (the INT8 stage's fallback when it rejects the fused one)."""
    model = ir.load(str(exported))
    model, cleanup = optimize_ir(model, "tensorrt", stages=("cleanup",), family=family)
    section: dict[str, Any] = {"cleanup": cleanup.to_json(), "fused": fuse}
    if fuse:
        model, fusion = optimize_ir(model, "onnxruntime", family=family, sparsity="off")
        section["fused_ops"] = {op: n for op, n in fusion.op_counts_after.items() if n}
    return model, section


def _constant_matmuls(graph: ir.Graph) -> list[ir.Node]:
    return [
        n
        for n in graph
        if n.op_type == "MatMul"
        and n.domain in ("", "ai.onnx")
        and n.inputs[1] is not None
        and n.inputs[1].is_initializer()
        and n.inputs[1].const_value is not None
        and len(n.inputs[1].shape or ()) == 2
    ]


def _embedding_gathers(graph: ir.Graph, min_elements: int = MIN_ELEMENTS) -> list[ir.Node]:
    """The token embedding's Gather (axis 0 of a 2-D fp32 initializer read by it alone)."""
    found = []
    for node in graph:
        table = node.inputs[0] if node.op_type == "Gather" and node.inputs else None
        axis = node.attributes.get("axis")
        if (
            table is not None
            and table.is_initializer()
            and table.const_value is not None
            and len(table.shape or ()) == 2
            and table.dtype == ir.DataType.FLOAT
            and len(table.uses()) == 1
            and (axis is None or axis.as_int() == 0)
            and node.inputs[1] is not None
            and node.inputs[1].name == "input_ids"
            and np.prod(table.shape.numpy()) >= min_elements
        ):
            found.append(node)
    return found


def int8_cpu_file(
    exported: Path, out: Path, family: str, reduce_range: bool, fuse: bool = True
) -> dict[str, Any]:
    """`model.int8.cpu.onnx` at `out` from the streamed fp32 `exported` file, one piece at a time.
    `fuse`: from our fused graph (GroupQueryAttention etc., int8_stage.DECODER_CPU_FUSION), else the plain one."""
    start = time.perf_counter()
    model, section = _fused(exported, family, fuse)
    steps = {"load_and_fuse": time.perf_counter() - start}
    graph = model.graph
    scratch = out.parent / f".{out.name}.pieces"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    quantized: list[str] = []
    try:
        tables = []  # the largest tables first, while few quantized weights are held
        for gather in _embedding_gathers(graph):
            rewritten, table = _int8_table_in_row_chunks(gather, scratch)
            piecewise.splice(model, [gather], rewritten)
            tables.append(table)
            _clear(scratch)
        steps["embedding"] = time.perf_counter() - start - sum(steps.values())
        groups = piecewise.by_layer(_constant_matmuls(graph))
        for k, group in enumerate(progress_bar(groups, desc="int8 per piece", unit="piece")):
            quantized += [n.name for n in group]
            weight = group[0].inputs[1]
            if len(group) == 1 and weight is not None and _nbytes(weight) > INT8_CHUNK_BYTES:
                rewritten = _int8_in_column_chunks(group[0], scratch, reduce_range)  # the LM head
            else:
                piece = piecewise.extract(graph, group, scratch, f"piece{k}.onnx")
                rewritten = onnx.load(
                    str(cpu_int8.build(piece, scratch / f"int8_{k}.onnx", frozenset(), reduce_range))
                )
            piecewise.splice(model, group, rewritten)
            del rewritten
            _clear(scratch)
        steps["pieces"] = time.perf_counter() - start - sum(steps.values())
        graph.sort()
        piecewise.save(model, out)
        steps["save"] = time.perf_counter() - start - sum(steps.values())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        **section,
        "file": out.name,
        "scheme": "dynamic per-tensor u8 activations x per-channel s8 weights (ONNX Runtime quantize_dynamic), "
        "per piece",
        "weight_bits": 7 if reduce_range else 8,
        "quantized": quantized,
        "embeddings": tables,
        "seconds": round(time.perf_counter() - start, 3),
        "seconds_by_step": {k: round(v, 3) for k, v in steps.items()},
    }


@dataclasses.dataclass(frozen=True)
class PieceBits:
    """The bit width of each block-quantized piece: a decoder layer's MatMul takes the bits of the first
    projection role its name holds (`roles`, e.g. {"q_proj": 8}) else `default`; the LM head `lm_head`, the
    token embedding `embedding`. Members of a packed group (q/k/v, gate/up) should agree: a mixed group is
    kept as separate MatMulNBits (int4.cpu_model)."""

    default: int = 4
    roles: tuple[tuple[str, int], ...] = ()
    lm_head: int = 4
    embedding: int = 4

    def of(self, node: str) -> int:
        return next((bits for role, bits in self.roles if role in node), self.default)

    def to_json(self) -> dict[str, Any]:
        return {
            "default": self.default,
            "roles": dict(self.roles),
            "lm_head": self.lm_head,
            "embedding": self.embedding,
        }


# The streamed INT8 CPU file: 8-bit weight-only blocks (MatMulNBits, accuracy_level 4: activations rounded
# to int8 per row and block at run time), not quantize_dynamic's per-tensor u8 activations. Measured (README
# "Streaming export of large decoders"): the dynamic file missed the int8 gate at 8B (logit cosine 0.961);
# on the 45M bench Llama it scored 0.960 vs 0.9974 for this scheme.
INT8_BLOCK_SIZE = 32
INT8_PIECE_BITS = PieceBits(default=8, lm_head=8, embedding=8)
INT8_SCHEME = (
    "8-bit weight-only blocks of 32 (MatMulNBits, accuracy_level 4: activations int8 per row and block at "
    "run time; embedding GatherBlockQuantized 8-bit), per piece"
)
# The streamed INT4 CPU file's widths, chosen by measurement (README "Streaming export of large decoders",
# the 1B sweep): the end-to-end error of an all-4-bit file comes from the EARLY layers (the layers after them
# amplify it: layers 0-3 of 16 at 8 bits took the logit cosine from 0.839 to 0.942, layers 12-15 changed
# nothing), the token embedding next (0.839 -> 0.867); the LM head at 4 bits costs nothing measurable.
# So the first INT4_EARLY_FRACTION of the decoder layers and the embedding are 8-bit, the rest 4-bit.
INT4_EARLY_FRACTION = 0.75


def int4_piece_bits(layers: int, lm_head: str = "auto", early_fraction: float | None = None) -> PieceBits:
    """The streamed INT4 file's widths for a decoder of `layers` layers; `--int4-lm-head int8` widens the LM
    head."""
    fraction = INT4_EARLY_FRACTION if early_fraction is None else early_fraction
    wide = math.ceil(fraction * layers)
    return PieceBits(
        roles=tuple((f"/layers.{i}/", 8) for i in range(wide)),
        lm_head=8 if lm_head == "int8" else 4,
        embedding=8,
    )


def int4_bits_reason(bits: PieceBits, layers: int) -> str:
    wide = len(bits.roles)
    return (
        f"layers 0-{wide - 1} of {layers} and the embedding at 8 bits, the rest 4 (measured: the all-4-bit "
        "file's end-to-end error comes from the early layers, amplified by the layers after them)"
        if wide
        else "every decoder layer 4-bit"
    )


def int4_cpu_file(
    exported: Path, out: Path, family: str, block_size: int, accuracy_level: int, lm_head_bits: int
) -> dict[str, Any]:
    """`model.int4.cpu.onnx` at `out`, every weight in round-to-nearest 4-bit blocks (the LM head at
    `lm_head_bits`): `nbits_cpu_file` with one width."""
    return nbits_cpu_file(exported, out, family, block_size, accuracy_level, PieceBits(lm_head=lm_head_bits))


def nbits_cpu_file(
    exported: Path, out: Path, family: str, block_size: int, accuracy_level: int, bits: PieceBits
) -> dict[str, Any]:
    """The MatMulNBits CPU file at `out` (round-to-nearest blocks, the widths `bits` says per piece) from the
    streamed fp32 `exported` file. The embedding goes first (its fp32 table is the largest tensor read);
    each piece's quantized weights are written to `out`'s data file as soon as it is spliced
    (exporter/export/streaming/spill.py), so only one piece is ever in memory."""
    from exporter.export.streaming.spill import DataFileWriter
    from exporter.quantize.int4 import Plan, concatenated, cpu_model, find_sites, prepare
    from exporter.quantize.int4_stage import PACKED_PROJECTIONS

    start = time.perf_counter()
    model, section = _fused(exported, family)
    steps = {"load_and_fuse": time.perf_counter() - start}
    graph = model.graph
    scratch = out.parent / f".{out.name}.pieces"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    writer = DataFileWriter(out)
    layers: dict[str, int] = {}

    def spill_new() -> None:
        # every tensor a spliced piece brought (ir.from_proto wraps the piece's protos): a tensor left
        # wrapping its proto, even a small one, would keep the whole piece's protobuf arena alive
        writer.spill_all(
            [v for v in graph.initializers.values() if isinstance(v.const_value, ir.serde.TensorProtoTensor)]
        )

    try:
        embedding = None
        for k, gather in enumerate(_embedding_gathers(graph, 0)):  # int4.prepare: any table, H % block == 0
            if (gather.inputs[0].shape[1] % block_size) != 0:  # type: ignore[union-attr,index]
                continue
            path = piecewise.extract(graph, [gather], scratch, f"table{k}.onnx", with_data=False)
            piece = onnx.load(str(path), load_external_data=False)
            table = gather.inputs[0]
            assert table is not None
            q = _chunked_blocks(table, bits.embedding, block_size, concatenated, transpose=True)
            rewritten, _ = cpu_model(piece, Plan({}, {}, {}, embedding=(str(table.name), q)), accuracy_level)
            del q, piece
            piecewise.splice(model, [gather], rewritten)
            del rewritten
            spill_new()
            embedding = {"table": table.name, "bits": bits.embedding}
            _clear(scratch)
        steps["embedding"] = time.perf_counter() - start - sum(steps.values())
        groups = piecewise.by_layer(_constant_matmuls(graph))
        for k, group in enumerate(progress_bar(groups, desc="nbits per piece", unit="piece")):
            head = piecewise.layer_of(group[0]) is None  # the LM head: block-quantized in column chunks
            path = piecewise.extract(graph, group, scratch, f"piece{k}.onnx", with_data=not head)
            piece = onnx.load(str(path), load_external_data=not head)
            if head:
                widths = {group[0].name: bits.lm_head}
                weight = _chunked_blocks(group[0].inputs[1], bits.lm_head, block_size, concatenated)
                plan = Plan({group[0].name: weight}, {}, {})
            else:
                widths = {str(n.name): bits.of(str(n.name)) for n in group}
                plan = prepare(piece, find_sites(piece), None, method="rtn", block_size=block_size).plan(
                    widths
                )
            rewritten, _ = cpu_model(piece, plan, accuracy_level, PACKED_PROJECTIONS)
            layers.update(widths)
            del piece, plan
            piecewise.splice(model, group, rewritten)
            del rewritten
            spill_new()
            _clear(scratch)
            _trim_heap()
        steps["pieces"] = time.perf_counter() - start - sum(steps.values())
        graph.sort()
        writer.finish(model)
        steps["save"] = time.perf_counter() - start - sum(steps.values())
    finally:
        writer.close()
        shutil.rmtree(scratch, ignore_errors=True)
    counts: dict[str, int] = {}
    for width in layers.values():
        counts[str(width)] = counts.get(str(width), 0) + 1
    return {
        **section,
        "file": out.name,
        "method": "rtn",
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "bits": bits.to_json(),
        "lm_head_bits": bits.lm_head,
        "packed": list(PACKED_PROJECTIONS),
        "layers": layers,
        "matmuls_by_bits": counts,
        "embedding": embedding,
        "seconds": round(time.perf_counter() - start, 3),
        "seconds_by_step": {k: round(v, 3) for k, v in steps.items()},
    }


def _chunked_blocks(value: ir.Value, bits: int, block_size: int, concatenated, transpose: bool = False):  # type: ignore[no-untyped-def]
    """The lazily read weight W [K, N] (or the table E [V, H] as W = E^T) block-quantized a chunk of columns
    at a time and concatenated along N: the same BlockQuantized as quantizing it whole, one chunk in fp32."""
    from exporter.quantize.blocks import quantize_blocks

    const = value.const_value
    assert const is not None
    array = const.numpy()
    columns = array.shape[0] if transpose else array.shape[1]
    parts = []
    for c in range(0, columns, INT4_LM_HEAD_CHUNK):
        chunk = array[c : c + INT4_LM_HEAD_CHUNK].T if transpose else array[:, c : c + INT4_LM_HEAD_CHUNK]
        parts.append(quantize_blocks(np.ascontiguousarray(chunk, dtype=np.float32), bits, block_size))
    del array, chunk  # no view into the mapped file may outlive it
    if isinstance(const, ir.ExternalTensor):
        const.release()
    return concatenated(parts) if len(parts) > 1 else parts[0]


def _trim_heap() -> None:
    """Give freed heap back to the OS after each piece: glibc raises its mmap threshold as large blocks are
    freed, so later pieces' buffers land on the heap and stay resident once freed (measured at 8B, 8-bit
    pieces: 7.9 GiB anonymous at the end of the stage with only one piece live)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _clear(folder: Path) -> None:
    for f in folder.iterdir():
        f.unlink()


_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def markdown(precision: str, section: dict[str, Any], end_to_end: dict[str, Any] | None) -> str:
    """report.md's section on a per-piece file: the widths of every decoder layer's projections, the LM head
    and the embedding, and the end-to-end check that judged it."""
    import re

    rows: dict[int, dict[str, int]] = {}
    head = []
    for node, width in section.get("layers", {}).items():
        match = re.search(r"/layers\.(\d+)/", node)
        role = next((r for r in _ROLES if r in node), None)
        if match is None or role is None:
            head.append(f"{node}: {width}")
            continue
        rows.setdefault(int(match.group(1)), {})[role] = width
    lines = [
        f"## {precision.upper()} CPU file, quantized per piece (streamed)",
        "",
        f"`{section['file']}`: {section.get('scheme') or 'round-to-nearest blocks (MatMulNBits)'}; block size "
        f"{section['block_size']}, accuracy_level {section['accuracy_level']}. MatMuls by bits: "
        + ", ".join(f"{n} at {b}" for b, n in sorted(section.get("matmuls_by_bits", {}).items()))
        + f"; LM head ({'; '.join(head) or '-'}); embedding {section.get('embedding') or 'fp32'}.",
    ]
    if section.get("bits_reason"):
        lines += ["", f"Why these widths: {section['bits_reason']}"]
    roles = [r for r in _ROLES if any(r in cells for cells in rows.values())]
    lines += ["", "| layer | " + " | ".join(roles) + " |", "|---|" + "---|" * len(roles)]
    for layer in sorted(rows):
        lines.append(f"| {layer} | " + " | ".join(str(rows[layer].get(r, "-")) for r in roles) + " |")
    if end_to_end:
        gate = end_to_end.get("gate", {})
        lines += [
            "",
            f"End to end vs the streamed PyTorch reference (prefill + {end_to_end['decode_steps']} cached decode "
            f"steps): mean logit cosine {end_to_end['mean_cosine']:.5f}, greedy agreement "
            f"{end_to_end['greedy_agreement']:.3f}; gate cosine >= {gate.get('min_mean_cosine')}, agreement >= "
            f"{gate.get('min_greedy_agreement')}: {'passed' if gate.get('passed') else 'failed'}.",
        ]
    return "\n".join(lines)
