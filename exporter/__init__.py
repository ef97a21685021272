"""export-engine: pruned + LoRA Hugging Face model -> exact compact ONNX -> optimized, INT8 engine.

Public API (imported lazily so `import exporter` stays cheap):
    export_engine(model_dir, output_dir, config) -> ExportResult
    ExportConfig, ExportResult, load_compact
    load(out_dir) -> ExportedModel: an export served for its task (classify, tag, answer, fill_mask, embed,
    generate) on the engine the export chose, with the folder's tokenizer
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExportConfig", "ExportResult", "ExportedModel", "export_engine", "load", "load_compact"]

_LAZY = {
    "export_engine": "exporter.api",
    "ExportResult": "exporter.api",
    "ExportConfig": "exporter.config",
    "load_compact": "exporter.restructure.compact",
    "load": "exporter.runtime.task_model",
    "ExportedModel": "exporter.runtime.task_model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'exporter' has no attribute {name!r}")
