"""export-engine: pruned + LoRA Hugging Face model -> exact compact ONNX -> optimized, INT8 engine.

Public API (imported lazily so `import exporter` stays cheap):
    export_engine(model_dir, output_dir, config) -> ExportResult
    ExportConfig, ExportResult, load_compact
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExportConfig", "ExportResult", "export_engine", "load_compact"]

_LAZY = {
    "export_engine": "exporter.api",
    "ExportResult": "exporter.api",
    "ExportConfig": "exporter.config",
    "load_compact": "exporter.restructure.compact",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'exporter' has no attribute {name!r}")
