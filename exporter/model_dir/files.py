"""Reading a MODEL_DIR's files: JSON, safetensors (one file or shards), pickles only when allowed.

Each reader turns a library's failure into an InputError naming the file, so a truncated shard or a
malformed index is one line for the user. Nothing here runs code from the folder: pickles (.bin/.pt)
load only with `allow_pickle=True`, and then through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from export_errors import InputError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_FILES = ("pytorch_model.bin", "model.bin", "model.pt", "pytorch_model.pt")


def read_json(file: Path, expect: type = dict) -> Any:
    """Parsed JSON of the expected top-level type, or an InputError naming the file."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(file, f"not valid JSON ({exc})") from exc
    if not isinstance(data, expect):
        raise InputError(file, f"not a JSON {'object' if expect is dict else 'list'}")
    return data


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (library messages often span several), shortened."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, or an InputError if it is truncated or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.exists():
        raise InputError(file, "missing")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(file, f"cannot read safetensors (truncated or corrupt?): {one_line(exc)}") from exc
    check_finite(tensors, file)
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """A NaN or inf in a stored weight (or LoRA factor) is bad input naming its file and tensor: found
    here, at load, it is the user's file to fix; found later it reads as "non-finite outputs" of a stage."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            continue
        bad = ~torch.isfinite(tensor)
        nan = int(torch.isnan(tensor).sum())
        first = tuple(int(i) for i in bad.nonzero()[0]) if tensor.dim() else ()
        raise InputError(
            file,
            f"tensor {name!r} {tuple(tensor.shape)} holds {int(bad.sum())} non-finite values ({nan} NaN, "
            f"{int(bad.sum()) - nan} inf; first at index {list(first)}): the checkpoint is corrupt or its "
            "training diverged",
        )


def read_pickle_weights(file: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """A .bin/.pt state dict, only when allowed, and only through torch.load(weights_only=True)."""
    if not allow_pickle:
        raise InputError(
            file,
            "pickle checkpoint refused (unpickling can run code): pass --allow-pickle (allow_pickle=True) to "
            "load it with torch.load(weights_only=True), or convert it to safetensors",
        )
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            file, "not loadable with weights_only=True (corrupt, or holds objects besides tensors)"
        ) from exc
    except Exception as exc:  # torch.load raises many types on bad files
        raise InputError(file, f"cannot load with torch.load(weights_only=True): {one_line(exc)}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(file, "not a state dict (name -> tensor)")
    check_finite(state, file)
    return state


def read_weights(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], Path]:
    """The checkpoint's tensors (all shards) and the file to name in errors."""
    if (path / SAFETENSORS_INDEX).exists():
        return read_sharded(path / SAFETENSORS_INDEX, read_safetensors), path / SAFETENSORS_INDEX
    if (path / SAFETENSORS_FILE).exists():
        return read_safetensors(path / SAFETENSORS_FILE), path / SAFETENSORS_FILE
    if (path / PICKLE_INDEX).exists():
        load = lambda f: read_pickle_weights(f, allow_pickle)  # noqa: E731
        return read_sharded(path / PICKLE_INDEX, load), path / PICKLE_INDEX
    for name in PICKLE_FILES:
        if (path / name).exists():
            return read_pickle_weights(path / name, allow_pickle), path / name
    raise InputError(path, f"no weights: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def read_sharded(index_file: Path, load: Any) -> dict[str, torch.Tensor]:
    """Tensors of every shard listed by a HF index; each listed tensor must be in its shard."""
    weight_map = read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(index_file, "no 'weight_map' (tensor name -> shard file)")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (index_file.parent / shard).exists():
            raise InputError(index_file.parent / shard, f"shard listed in {index_file.name} is missing")
        tensors.update(load(index_file.parent / shard))
    absent = [name for name in weight_map if name not in tensors]
    if absent:
        raise InputError(
            weight_map[absent[0]], f"tensor {absent[0]!r} listed in {index_file.name} is not in it"
        )
    return tensors
