"""Checkpoint tensors read one at a time, for the streaming export of models larger than memory.

`read_lazy_weights(path)` opens the safetensors file(s) of a MODEL_DIR (one file or HF shards) and
returns name -> `LazyTensor`: the shape and dtype are known from the header, the bytes are read only
when `load()` is called, in the checkpoint's dtype (a bf16 shard stays bf16 until the caller converts
it), and checked finite then (a NaN names its file and tensor, as the whole-model load does).
safetensors' `safe_open` reads a single tensor without touching the rest of the file, so the
streaming export (exporter/export/streaming) holds one decoder layer at a time, never the model.
Pickle checkpoints cannot be read per tensor: they are refused here (convert them to safetensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from export_errors import InputError
from exporter.model_dir.files import SAFETENSORS_FILE, SAFETENSORS_INDEX, check_finite, one_line, read_json


@dataclass(frozen=True)
class LazyTensor:
    """One checkpoint tensor not yet read: its file, name, shape and dtype."""

    file: Path
    name: str
    shape: torch.Size
    dtype: torch.dtype

    def load(self) -> torch.Tensor:
        """The tensor's values, in the checkpoint's dtype (read from disk now, nothing cached)."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.file), framework="pt") as handle:
                tensor = handle.get_tensor(self.name)
        except Exception as exc:  # safetensors raises several types on a truncated file
            raise InputError(self.file, f"cannot read tensor {self.name!r}: {one_line(exc)}") from exc
        check_finite({self.name: tensor}, self.file)  # as the whole-model load does, when it is read
        return tensor

    @property
    def nbytes(self) -> int:
        return int(self.shape.numel()) * torch.empty((), dtype=self.dtype).element_size()


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_lazy_weights(path: Path) -> tuple[dict[str, LazyTensor], Path]:
    """name -> LazyTensor for every tensor of the MODEL_DIR's safetensors, and the file to name in errors."""
    if (path / SAFETENSORS_INDEX).exists():
        index = path / SAFETENSORS_INDEX
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(index, "no 'weight_map' (tensor name -> shard file)")
        tensors: dict[str, LazyTensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_header(path / shard))
        absent = [name for name in weight_map if name not in tensors]
        if absent:
            raise InputError(
                weight_map[absent[0]], f"tensor {absent[0]!r} listed in {index.name} is not in it"
            )
        return tensors, index
    if (path / SAFETENSORS_FILE).exists():
        return _header(path / SAFETENSORS_FILE), path / SAFETENSORS_FILE
    raise InputError(
        path,
        f"the streaming export reads safetensors one tensor at a time: expected {SAFETENSORS_FILE} or "
        f"{SAFETENSORS_INDEX} (convert pickle checkpoints, or pass --streaming off)",
    )


def _header(file: Path) -> dict[str, LazyTensor]:
    """The tensors of one safetensors file from its header (no tensor bytes are read)."""
    from safetensors import safe_open

    if not file.exists():
        raise InputError(file, "missing")
    try:
        with safe_open(str(file), framework="pt") as handle:
            found = {}
            for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                info: Any = handle.get_slice(name)
                dtype = _DTYPES.get(info.get_dtype())
                if dtype is None:
                    raise InputError(file, f"tensor {name!r}: unsupported dtype {info.get_dtype()}")
                found[name] = LazyTensor(file, name, torch.Size(info.get_shape()), dtype)
            return found
    except InputError:
        raise
    except Exception as exc:
        raise InputError(file, f"cannot read safetensors (truncated or corrupt?): {one_line(exc)}") from exc
