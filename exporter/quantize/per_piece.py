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
ONNX Runtime's `quantize_dynamic` per piece (per-tensor u8 activations), the whole-model INT8 stage's CPU
scheme, was the streamed INT8 file until it missed the int8 gate at 8B (logit cosine 0.961); removed.

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
from exporter.quantize.embeddings import MIN_ELEMENTS
from graph_passes.pipeline import optimize_ir

INT4_LM_HEAD_CHUNK = 8192  # LM head / embedding columns block-quantized at a time


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
