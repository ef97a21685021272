"""The streaming export driver: prefix, then each decoder layer, then the suffix; each checked, stitched, freed.

Per decoder layer i: read + merge + mask (`LayerSource.layer`), the PyTorch reference outputs on the
real hidden states of the cases (a prefill of the validation feeds with an empty past, then DECODE_STEPS
cached decode steps), plan and compact the layer (the restructure family), the compact layer checked against
the reference layer (fp32 tolerance), traced at its own widths (`LayerForExport`), its ONNX checked
on ONNX Runtime against the compact layer (hidden state and present keys/values, fp32 tolerance),
appended to the stitched graph (weights to the data file), then freed. The reference hidden states
(not the compact ones) go on to layer i+1, so the logits at the end are the streamed masked+merged
reference, what the whole-model path's `build_reference_model` computes; its logits on every case are
returned, so the final (quantized) files can be checked end to end against them.

Layers with the same signature reuse one traced graph (exporter/export/streaming/reuse.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export_errors import InputError, ValidationError
from exporter.export.decoder_with_past import (
    DecoderManifest,
    LayerAttentionShape,
    cache_layers,
    example_feeds,
    io_names,
    past_names,
    positions_from_mask,
)
from exporter.export.streaming import reuse, tables
from exporter.export.streaming.layer_source import LayerSource
from exporter.export.streaming.pieces import (
    EMBEDS,
    LayerForExport,
    PrefixForExport,
    SuffixForExport,
    hidden_name,
)
from exporter.export.streaming.stitch import StitchedGraph
from exporter.export.torch_to_onnx import torchscript_export
from exporter.model_dir.loader import ModelDir
from exporter.model_dir.lora import LoraMerge
from exporter.progress import bar as progress_bar
from exporter.restructure.plan import LayerPlan, RestructurePlan
from exporter.validate.tolerances import tolerance

logger = logging.getLogger(__name__)

PREFIX_PAST = "streaming.past_length"  # the prefix reads only the past's length; renamed at the end


@dataclasses.dataclass
class StreamResult:
    manifest: DecoderManifest
    plan: RestructurePlan
    reference_logits: np.ndarray  # the streamed PyTorch reference on the prefill feeds
    decode_ids: list[np.ndarray]  # each cached decode step's tokens (batch x 1)
    decode_logits: list[np.ndarray]  # the streamed reference's logits of each decode step
    lora_merge: LoraMerge | None
    checks: dict[str, float]  # worst errors: compact vs reference layer, ONNX piece vs PyTorch piece
    seconds: dict[str, float]  # time per sub-stage, summed over the layers
    layer_traces: int = 0  # decoder layers traced by TorchScript (the others reuse a signature's graph)


@dataclasses.dataclass
class _Case:
    """One set of inputs flowing through the pieces: its prefix outputs and current hidden state."""

    name: str
    feeds: dict[str, np.ndarray]  # input_ids, attention_mask, position_ids
    past_length: int
    prefix: list[torch.Tensor] = dataclasses.field(default_factory=list)  # embeds, cos, sin, *masks
    hidden: torch.Tensor | None = None


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> Any:
        clock = self

        class _Timer:
            def __enter__(self) -> None:
                self.start = time.perf_counter()

            def __exit__(self, *exc: object) -> None:
                clock.seconds[name] = clock.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Timer()


DECODE_STEPS = 3  # cached decode steps after the prefill, in every layer's checks and the reference logits


def _cases(feeds: dict[str, np.ndarray], vocab: int) -> list[_Case]:
    """The prefill of the validation feeds, DECODE_STEPS cached decode steps after it (seeded tokens), and
    the trace case (always last)."""
    ids, mask = feeds["input_ids"].astype(np.int64), feeds["attention_mask"].astype(np.int64)
    prefill = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions_from_mask(mask, ids.shape[1]),
    }
    cases = [_Case("prefill", prefill, 0)]
    rng = np.random.default_rng(1)
    for step in range(DECODE_STEPS):
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        decode = {
            "input_ids": rng.integers(0, vocab, (ids.shape[0], 1), dtype=np.int64),
            "attention_mask": mask,
            "position_ids": positions_from_mask(mask, 1),
        }
        cases.append(_Case(f"decode{step + 1}", decode, ids.shape[1] + step))
    trace = example_feeds((), min(vocab, tables.STANDIN_ROWS), batch=2, past=3, seq=4)  # ids fit a stand-in
    return [*cases, _Case("trace", trace, 3)]


def stream_decoder_export(
    md: ModelDir,
    path: Path,
    feeds: dict[str, np.ndarray],
    *,
    opset: int = 17,
    progress: bool = True,
    reuse_traces: bool = True,
) -> StreamResult:
    """Export `md` (loaded lazily) to a decoder-with-past ONNX at `path` (+ `<name>.data`) layer by layer.
    `reuse_traces`: trace once per layer signature and reuse that graph (exporter/export/streaming/reuse.py);
    False traces every layer."""
    if opset < 17:
        raise InputError("--opset", f"decoder export needs opset >= 17, got {opset}")
    path = Path(path)
    scratch = path.parent / f".{path.name}.pieces"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    clock = _Clock()
    source = LayerSource(md)
    hd = source.head_dim
    vocab = int(md.config.vocab_size)
    cases = _cases(feeds, vocab)
    tol = tolerance("fp32").max_abs
    worst = {"compact_vs_reference_layer": 0.0, "onnx_vs_pytorch_piece": 0.0}
    layers_plan: list[LayerPlan] = []
    shapes: list[LayerAttentionShape | None] = []
    stitched: StitchedGraph | None = None
    templates: dict[tuple, reuse.Template | None] = {}
    traces = 0
    params_before = params_after = 0
    try:
        # ---- prefix: embeddings, rotary cos/sin, causal masks
        hidden_size = int(md.config.hidden_size)
        table_values = vocab * hidden_size
        with clock("read_merge_mask"):
            embed_table = source.plain_table("model.embed_tokens.weight")
            shell = source.prefix_shell(embeddings=embed_table is None)
            if embed_table is not None:  # PyTorch reads rows of the stored table; the trace uses a stand-in
                shell.model.embed_tokens = tables.RowLookup(embed_table)
            prefix = PrefixForExport(shell, source.attention_types()).eval()
            base_params = table_values + _params(shell.model.norm)
        with clock("pytorch"), torch.no_grad():
            for case in cases:
                case.prefix = list(prefix(*_prefix_args(case, hd)))
                case.hidden = case.prefix[0]
        mask_of_layer = list(prefix.mask_of_layer)
        p_in, p_out, p_axes = prefix.names(0)
        p_in[3] = PREFIX_PAST
        p_axes[PREFIX_PAST] = p_axes.pop(past_names(0)[0])
        rows = tables.standin_rows(vocab)
        with clock("trace"):
            piece = scratch / "prefix.onnx"
            if embed_table is not None:
                shell.model.embed_tokens = nn.Embedding(rows, hidden_size)
            torchscript_export(prefix, _prefix_args(cases[-1], hd), piece, p_in, p_out, p_axes, opset, True)
        del prefix, shell  # the outputs to check against are computed: free the embedding table
        if embed_table is not None:
            with clock("stitch"):
                data = scratch / "embed_tokens.fp32"
                tables.stream_in(piece, embed_table, data, [rows, hidden_size], vocab, transpose=False)
            del embed_table
        with clock("onnx_check"):
            err = _check_piece(
                piece, p_in, p_out, [(c.name, _prefix_args(c, hd), c.prefix) for c in cases[:-1]], "prefix"
            )
            worst["onnx_vs_pytorch_piece"] = max(worst["onnx_vs_pytorch_piece"], err)
        inputs: list[str] = []
        outputs: list[str] = []
        stitched = StitchedGraph(path, inputs, outputs)  # the names are filled once every layer is known
        with clock("stitch"):
            stitched.append(piece, "prefix")
            piece.unlink()
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()

        # ---- decoder layers, one at a time
        previous = EMBEDS
        layers = range(source.num_layers)
        bar = progress_bar(layers, desc="streaming export", unit="layer") if progress else None
        for index in bar if bar is not None else layers:
            with clock("read_merge_mask"):
                layer = source.layer(index)
            before = source.family.layer_params(layer)
            params_before += _params(layer)
            with clock("plan"), torch.no_grad():
                plan = source.family.plan_layer(layer, index, hd)
                plan.params_before = before
            with clock("pytorch"), torch.no_grad():
                full_kv = _kv_heads(layer, hd)
                reference = _run_cases(layer, index, cases[:-1], mask_of_layer, full_kv, hd)
            with clock("compact"), torch.no_grad():
                compact = source.family.apply_layer(layer, plan, hd) or layer
                plan.params_after = source.family.layer_params(compact)
                params_after += _params(compact)
                kv = _kv_heads(compact, hd)
                got = _run_cases(compact, index, cases[:-1], mask_of_layer, kv, hd)
                err = max(_max_error(g[0], r[0]) for g, r in zip(got, reference))
                if err > tol:
                    raise ValidationError(
                        f"layer {index}: compact layer differs from the masked reference by {err:.3e} > {tol}"
                    )
                worst["compact_vs_reference_layer"] = max(worst["compact_vs_reference_layer"], err)
            wrapper = LayerForExport(compact, index, mask_of_layer[index]).eval()
            l_in, l_out, l_axes = wrapper.names(previous)
            with clock("trace"), torch.no_grad():
                trace_args = _layer_args(cases[-1], mask_of_layer[index], kv, hd, index, random_hidden=True)
                piece = scratch / f"layer{index}.onnx"
                trace = functools.partial(
                    _trace_to, wrapper, trace_args, l_in, l_out, l_axes, opset
                )  # trace(path): the layer's TorchScript export
                sig = reuse.signature(compact, mask_of_layer[index]) if reuse_traces else None
                if sig is not None and sig not in templates:
                    templates[sig] = reuse.trace_template(compact, index, previous, trace, scratch)
                    traces += 1
                template = templates.get(sig) if sig is not None else None
                if template is None:
                    trace(piece)
                    traces += 1
            if template is not None:
                with clock("write_piece"):
                    reuse.write_piece(template, compact, index, previous, piece)
            kv_shape = None if kv is None else LayerAttentionShape(_q_heads(compact, hd), kv, hd)
            del layer, compact, wrapper  # free the weights before ONNX Runtime maps the piece's
            with clock("onnx_check"):
                runs = [
                    (
                        c.name,
                        _layer_args(
                            c, mask_of_layer[index], kv, hd, index, past=_past_for(k, c, got, kv, hd)
                        ),
                        out,
                    )
                    for k, (c, out) in enumerate(zip(cases[:-1], got))
                ]
                err = _check_piece(piece, l_in, l_out, runs, f"layer {index}")
                worst["onnx_vs_pytorch_piece"] = max(worst["onnx_vs_pytorch_piece"], err)
            with clock("stitch"):
                stitched.append(piece, f"layer{index}")
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir()
            for case, out in zip(cases[:-1], reference):
                case.hidden = out[0]
            shapes.append(kv_shape)
            layers_plan.append(plan)
            previous = hidden_name(index)
            del reference, got
        if bar is not None:
            bar.close()

        # ---- suffix: final norm + LM head
        with clock("read_merge_mask"):
            head_table = source.plain_table("lm_head.weight")
            if head_table is not None:  # streamed as a table: a stand-in head is traced
                norm, lm_head = source.suffix_norm(), nn.Linear(hidden_size, rows, bias=False)
            else:
                norm, lm_head = source.suffix()
            suffix = SuffixForExport(norm, lm_head).eval()
            base_params += 0 if source.tied else table_values
        with clock("pytorch"), torch.no_grad():
            if head_table is not None:
                logits = [tables.chunked_logits(norm(case.hidden), head_table) for case in cases[:-1]]
            else:
                logits = [suffix(case.hidden) for case in cases[:-1]]
        s_in, s_out, s_axes = suffix.names(previous)
        with clock("trace"):
            piece = scratch / "suffix.onnx"
            hidden = torch.randn(2, 4, hidden_size, generator=torch.Generator().manual_seed(2))
            torchscript_export(suffix, (hidden,), piece, s_in, s_out, s_axes, opset, True)
        del suffix, norm, lm_head
        if head_table is not None:
            with clock("stitch"):
                data = scratch / "lm_head.fp32"
                tables.stream_in(piece, head_table, data, [hidden_size, rows], vocab, transpose=True)
            del head_table
        with clock("onnx_check"):
            err = _check_piece(
                piece,
                s_in,
                s_out,
                [(c.name, (c.hidden,), [out]) for c, out in zip(cases[:-1], logits)],
                "suffix",
            )
            worst["onnx_vs_pytorch_piece"] = max(worst["onnx_vs_pytorch_piece"], err)
        if not cache_layers(tuple(shapes)):
            raise InputError(
                "pruning masks",
                "every layer's attention is dead (all KV groups masked): the model has no attention left, so "
                "there is no KV cache to export; it cannot use context (each token's logits depend on it alone)",
            )
        unclaimed = source.unclaimed_masks()
        if unclaimed:
            raise InputError(md.path, f"mask {unclaimed[0]!r} names no parameter the streaming export reads")
        inputs[:], outputs[:], axes = io_names(cache_layers(tuple(shapes)))
        with clock("stitch"):
            stitched.append(piece, "suffix")
            stitched.rename_input(PREFIX_PAST, past_names(cache_layers(tuple(shapes))[0])[0])
            stitched.finish()
    finally:
        if stitched is not None:
            stitched.close()
        shutil.rmtree(scratch, ignore_errors=True)
    plan_all = RestructurePlan(
        md.model_type,
        hd,
        layers_plan,
        params_before=params_before + base_params,
        params_after=params_after + base_params,
    )
    manifest = DecoderManifest(
        layers=tuple(shapes),
        input_names=tuple(inputs),
        output_names=tuple(outputs),
        dynamic_axes=axes,
        vocab_size=vocab,
        dtype="float32",
        opset=opset,
        model_type=str(md.config.model_type),
        validation_max_abs_error=worst["onnx_vs_pytorch_piece"],
    )
    seconds = {k: round(v, 3) for k, v in clock.seconds.items()}
    logger.info("streaming export: %s", seconds)
    return StreamResult(
        manifest,
        plan_all,
        logits[0].numpy(),
        [c.feeds["input_ids"] for c in cases[1:-1]],
        [x.numpy() for x in logits[1:]],
        source.lora_merge(),
        worst,
        seconds,
        layer_traces=traces,
    )


def _trace_to(
    wrapper: nn.Module,
    args: tuple[torch.Tensor, ...],
    names_in: list[str],
    names_out: list[str],
    axes: dict[str, dict[int, str]],
    opset: int,
    target: Path,
) -> None:
    torchscript_export(wrapper, args, target, names_in, names_out, axes, opset, True)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _kv_heads(layer: nn.Module, hd: int) -> int | None:
    attn = getattr(layer, "self_attn", None)
    return None if attn is None else int(attn.k_proj.out_features) // hd


def _q_heads(layer: nn.Module, hd: int) -> int:
    return int(layer.self_attn.q_proj.out_features) // hd  # type: ignore[union-attr]


def _prefix_args(case: _Case, hd: int) -> tuple[torch.Tensor, ...]:
    f = case.feeds
    batch = f["input_ids"].shape[0]
    past = torch.zeros(batch, 1, case.past_length, hd)
    return (
        torch.from_numpy(f["input_ids"]),
        torch.from_numpy(f["attention_mask"]),
        torch.from_numpy(f["position_ids"]),
        past,
    )


def _layer_args(
    case: _Case,
    mask_index: int | None,
    kv: int | None,
    hd: int,
    index: int,
    *,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
    random_hidden: bool = False,
) -> tuple[torch.Tensor, ...]:
    embeds, cos, sin, *masks = case.prefix
    hidden = case.hidden
    if random_hidden:
        gen = torch.Generator().manual_seed(index)
        hidden = torch.randn(embeds.shape, generator=gen)
    assert hidden is not None
    args: list[torch.Tensor] = [hidden]
    if mask_index is not None:
        args.append(masks[mask_index])
    args += [cos, sin, torch.from_numpy(case.feeds["position_ids"])]
    if kv is not None:
        if past is None:
            gen = torch.Generator().manual_seed(1000 + index)
            shape = (hidden.shape[0], kv, case.past_length, hd)
            past = (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
        args += list(past)
    return tuple(args)


def _run_cases(
    layer: nn.Module, index: int, cases: list[_Case], mask_of_layer: list[int | None], kv: int | None, hd: int
) -> list[tuple[torch.Tensor, ...]]:
    """The layer on the prefill (empty past) then each decode step (past = the previous case's presents)."""
    wrapper = LayerForExport(layer, index, mask_of_layer[index]).eval()
    results: list[tuple[torch.Tensor, ...]] = []
    for k, case in enumerate(cases):
        past = _past_for(k, case, results, kv, hd)
        results.append(tuple(wrapper(*_layer_args(case, mask_of_layer[index], kv, hd, index, past=past))))
    return results


def _past_for(
    k: int, case: _Case, got: list[tuple[torch.Tensor, ...]], kv: int | None, hd: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Case `k`'s past: empty for the prefill, else the presents case k-1 returned."""
    if kv is None:
        return None
    if k == 0:
        empty = torch.zeros(case.feeds["input_ids"].shape[0], kv, 0, hd)
        return empty, empty
    return got[k - 1][1], got[k - 1][2]


def _max_error(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    b = b.numpy() if isinstance(b, torch.Tensor) else b
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    same = a == b  # equal infinities / dtype minima of masks
    return float(np.where(same, 0.0, np.abs(a.astype(np.float64) - b.astype(np.float64))).max())


def _check_piece(
    piece: Path,
    input_names: list[str],
    output_names: list[str],
    runs: list[tuple[str, Sequence[torch.Tensor], Sequence[torch.Tensor]]],
    what: str,
) -> float:
    """The piece's ONNX on ONNX Runtime (optimizations off) vs the PyTorch piece, on each case."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")  # weights stay mapped from the file
    session = ort.InferenceSession(str(piece), options, providers=["CPUExecutionProvider"])
    present = {i.name for i in session.get_inputs()}
    worst = 0.0
    tol = tolerance("fp32").max_abs
    for case, args, expected in runs:
        feeds = {n: a.numpy() for n, a in zip(input_names, args) if n in present}
        got = session.run(output_names, feeds)
        for name, g, w in zip(output_names, got, expected):
            err = _max_error(g, w)
            if err > tol:
                raise ValidationError(
                    f"{what}: ONNX output {name} ({case}) differs from PyTorch by {err:.3e} > {tol}"
                )
            worst = max(worst, err)
    del session
    return worst
