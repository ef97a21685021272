"""report.json (everything, machine-readable, keys sorted) and report.md (the same, for people)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write(directory: Path, report: dict[str, Any]) -> None:
    (directory / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    (directory / "report.md").write_text(render_markdown(report))


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# export-engine report", ""]
    model = report.get("model", {})
    lines += [f"- Model: `{report.get('model_dir')}` ({model.get('model_type')})"]
    if model.get("task"):
        lines += [f"- Task: **{model['task']}** as {model.get('architecture')} ({model.get('task_source')})"]
    lines += [f"- Masks: {model.get('mask_source')}; adapter: {model.get('adapter') or 'none'}"]
    if model.get("adapter_head_tensors"):
        lines += [
            f"- Trained head from the adapter (modules_to_save): {', '.join(model['adapter_head_tensors'])}"
        ]
    if model.get("ignored_tensors"):
        ignored = model["ignored_tensors"]
        more = f" (and {len(ignored) - 8} more)" if len(ignored) > 8 else ""
        lines += [
            f"- Checkpoint tensors the {model.get('task')} model has no place for: {', '.join(ignored[:8])}{more}"
        ]
    if "backend" in report:
        backend = report["backend"]
        lines += [f"- Backend: **{backend.get('name')}**: {backend.get('reason')}"]
        for name, why in backend.get("skipped", {}).items():
            lines += [f"  - {name} skipped: {why}"]
    cpu_int8 = report.get("int8", {}).get("cpu", {})
    if "weight_bits_reason" in cpu_int8:
        lines += [f"- INT8 CPU file: {cpu_int8['weight_bits_reason']}"]
    gate = report.get("int8", {}).get("agreement_gate")
    if gate:
        measured = ", ".join(
            f"{report['int8'][v]['heldout_task_agreement']['agreement']:.4f} ({v})"
            for v in ("tensorrt", "cpu")
            if "heldout_task_agreement" in report["int8"].get(v, {})
        )
        lines += [
            f"- INT8 task agreement with fp32 on {gate['samples']} held-out samples: {measured}; "
            f"gate >= {gate['target']} passed"
        ]
    if report.get("eval"):
        lines += [f"- Labeled evaluation: `{report['eval']['file']}` ({report['eval']['samples']} samples)"]
    lines.append("")
    lines += _cpu_engine(report.get("engine", {}).get("cpu"))
    if report.get("stages_md"):
        lines += [
            "## Stages",
            "",
            report["stages"]["timing"],
            "",
            report["stages_md"],
            "![stages](stages.png)",
            "",
        ]
    lines += _restructure(report.get("restructure"), report.get("config", {}).get("sequence_length", 128))
    lines += _validation(report.get("validation", {}), report.get("task_agreement", {}))
    lines += _graph_passes(report.get("graph_passes"))
    for section in report.get("extra_sections_md", []):
        lines += [section, ""]
    lines += _timings(report.get("timings_s", {}))
    return "\n".join(lines) + "\n"


def _cpu_engine(cpu: dict[str, Any] | None) -> list[str]:
    """The CPU engine chosen by measurement, and every candidate with its numbers and why it lost."""
    if not cpu:
        return []
    lines = [
        "## CPU engine",
        "",
        f"**{cpu['candidate']}**: {cpu['engine']} on `{cpu['file']}` ({cpu['precision']}): {cpu['reason']}.",
        f"CPU: {cpu['cpu']}; {cpu['threads']} threads; {cpu['timing']}.",
        "",
        "| candidate | engine | file | latency ms | cosine | max abs err | gate | chosen | why not |",
        "|---|---|---|---:|---:|---:|---|---|---|",
    ]
    for row in cpu["candidates"]:
        latency = "—" if row["latency_ms"] is None else f"{row['latency_ms']:.2f}"
        cosine = "—" if row["cosine"] is None else f"{row['cosine']:.5f}"
        max_abs = "—" if row["max_abs_err"] is None else f"{row['max_abs_err']:.2e}"
        gate = ("passed: " if row["passed_gate"] else "failed: ") + row["gate"] if row["gate"] else "—"
        if row.get("passed_gate") is None and not row.get("error"):
            gate = "not judged (slower than the chosen engine)"
        lines.append(
            f"| {row['name']} | {row['engine']} | `{row['file']}` | {latency} | {cosine} | {max_abs} | {gate} "
            f"| {'**yes**' if row['chosen'] else ''} | {row['why_not'] or ''} |"
        )
    lines += [f"- {name} not measured: {why}" for name, why in cpu.get("skipped", {}).items()]
    return [*lines, ""]


def _restructure(restructure: dict[str, Any] | None, context: int = 128) -> list[str]:
    if not restructure:
        return []
    before, after = restructure["params_before"], restructure["params_after"]
    lines = [
        "## Restructure",
        "",
        f"Parameters: {before:,} -> {after:,} ({100.0 * (before - after) / max(before, 1):.1f}% removed)",
        "",
        *_flops_lines(restructure, context),
        "| layer | heads | kv heads | ffn | params before | params after | removed | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer in restructure["layers"]:
        removed = "; ".join(f"{count} {reason}" for reason, count in layer["removed"].items()) or "-"
        notes = "; ".join(layer["notes"]) or "-"
        kv = layer["kv_heads"] if layer["kv_heads"] is not None else "-"
        lines.append(
            f"| {layer['layer']} | {layer['heads']} | {kv} | {layer['ffn']} | {layer['params_before']:,} "
            f"| {layer['params_after']:,} | {removed} | {notes} |"
        )
    return [*lines, ""]


def _flops(count: dict[str, int], context: int) -> str:
    at = count["fixed"] + count["per_context_token"] * context
    return f"{count['fixed']:,} + {count['per_context_token']:,}·T ({at:,} at T = {context})"


def _flops_lines(restructure: dict[str, Any], context: int) -> list[str]:
    """FLOPs per token of the layers before / after, and the whole sublayers removed with what they saved."""
    if "flops_per_token" not in restructure:
        return []
    total = restructure["flops_per_token"]
    lines = [
        f"FLOPs per token of the layers (T = context tokens attended to): {_flops(total['before'], context)} "
        f"-> {_flops(total['after'], context)}",
        "",
    ]
    removed = restructure.get("sublayers_removed") or {}
    if removed:
        gone = "; ".join(f"layer {layer}: {' and '.join(names)}" for layer, names in removed.items())
        saved = _flops(restructure["flops_saved_by_sublayer_removal"], context)
        lines += [
            f"Whole sublayers removed (every unit dead; no projections, no attention or KV cache): {gone}. "
            f"FLOPs per token they saved: {saved}.",
            "",
        ]
    if restructure.get("flops_formula"):
        lines += [restructure["flops_formula"], ""]
    return lines


def _validation(validation: dict[str, Any], agreement: dict[str, Any]) -> list[str]:
    if not validation:
        return []
    lines = [
        "## Validation against the masked+merged PyTorch reference",
        "",
        "| check | output | max abs err | mean abs err | mean cosine | min cosine | task agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for check, comparisons in validation.items():
        task = agreement.get(check, {}).get("agreement")
        for c in comparisons:
            lines.append(
                f"| {check} | {c['output']} | {c['max_abs']:.3g} | {c['mean_abs']:.3g} "
                f"| {c['mean_cosine']:.6f} | {c['min_cosine']:.6f} | {'-' if task is None else f'{task:.4f}'} |"
            )
    return [*lines, ""]


def _graph_passes(pipeline: dict[str, Any] | None) -> list[str]:
    if not pipeline:
        return []
    lines = [
        f"## Graph passes (target: {pipeline['target']})",
        "",
        "| fusion | layer | status | reason |",
        "|---|---|---|---|",
    ]
    for row in pipeline["fusions"]:
        lines.append(f"| {row['fusion']} | {row['layer']} | {row['status']} | {row.get('reason') or '-'} |")
    lines += ["", "| pass | changes | seconds |", "|---|---|---|"]
    for p in pipeline["passes"]:
        changes = ", ".join(
            f"{k} {v:+d}" if isinstance(v, int) else f"{k} {v}" for k, v in p["counts"].items()
        )
        lines.append(f"| {p['name']} | {changes or '-'} | {p['seconds']:.3f} |")
    return [*lines, ""]


def _timings(timings: dict[str, float]) -> list[str]:
    if not timings:
        return []
    lines = ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in timings.items()]
    return [*lines, ""]
