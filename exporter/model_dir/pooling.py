"""sentence-transformers pooling, read from `modules.json` and its Pooling folder's config.json.

The exported encoder computes the same `sentence_embedding` as sentence-transformers does, so the mode
(mean, CLS, max) and the optional L2 normalisation are read from the folder, never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export_errors import InputError
from exporter.model_dir.files import read_json

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class Pooling:
    """sentence-transformers pooling: mean over unmasked tokens (or CLS), optional L2 normalisation."""

    mode: str = "mean"  # "mean" | "cls" | "max"
    normalize: bool = False


def read_pooling(path: Path) -> Pooling | None:
    """sentence-transformers pooling from modules.json + its Pooling folder's config.json, else None."""
    if not (path / "modules.json").exists():
        return None
    modules = read_json(path / "modules.json", expect=list)
    if not all(isinstance(m, dict) for m in modules):
        raise InputError(path / "modules.json", "not a JSON list of modules")
    types = [str(m.get("type", "")) for m in modules]
    pooling = next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    if pooling is None:
        return None
    file = path / str(pooling.get("path", "")) / CONFIG_FILE
    if not file.exists():
        raise InputError(file, "missing: modules.json names a Pooling module but its config.json is absent")
    return Pooling(
        mode=pooling_mode(read_json(file), file), normalize=any(t.endswith("Normalize") for t in types)
    )


def pooling_mode(config: Mapping[str, Any], where: Path) -> str:
    """ "mean" | "cls" | "max" from a sentence-transformers Pooling config (old flags or new `pooling_mode`)."""
    if "pooling_mode" in config:
        mode = str(config["pooling_mode"])
    else:
        flags = [k for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
        if len(flags) != 1:
            raise InputError(where, f"expected exactly one pooling mode flag set, found {flags}")
        mode = flags[0].removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens")
    if mode not in ("mean", "cls", "max"):
        raise InputError(where, f"pooling mode {mode!r} is not supported (mean, cls, max)")
    return mode
