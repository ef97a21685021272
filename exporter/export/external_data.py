"""ONNX external data for models over the 2 GB protobuf limit: one `model.onnx.data` beside model.onnx.

A protobuf message cannot exceed 2 GiB, so a larger model keeps its weights outside the .onnx file.
The TorchScript exporter then writes one file per initializer (thousands of files named after
tensors). `consolidate_external_data` rewrites such a model as model.onnx + one data file, streaming
one tensor at a time (a tensor's bytes are the only extra memory), each tensor's offset aligned to
64 KiB (the largest alignment the external-data spec allows, so readers may map tensors from the
file). Offsets follow the tensors' order in the graph, so the same model always gives the same bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

if TYPE_CHECKING:  # torch only for the hints: the INT8 CPU file's child process saves without importing it
    from torch import nn

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT_BYTES = 2**31 - 1
# Weights above this go external: leaves headroom under the limit for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
MIN_EXTERNAL_TENSOR_BYTES = 1024  # smaller tensors stay inline (as onnx.save does)
ALIGNMENT = 64 * 1024  # ONNX's largest alignment boundary; ORT maps aligned tensors from the file


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the module's parameters and buffers, a tied tensor counted at each use: the ONNX
    may hold it twice (e.g. embeddings for Gather and, transposed, for the LM head's MatMul)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    tensors = [t for _, t in named]
    return sum(t.numel() * t.element_size() for t in tensors)


def needs_external_data(model: nn.Module) -> bool:
    """True when the model's weights would not fit in one protobuf with the graph."""
    return parameter_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES


def data_file_name(onnx_path: Path) -> str:
    return onnx_path.name + ".data"


def consolidate_external_data(source: Path, target: Path) -> Path:
    """Rewrite the ONNX at `source` (initializers inline or in any external files under its folder)
    as `target` plus one `<target name>.data` file beside it. Returns `target`.

    `source` and its external files are left in place (the caller removes their folder)."""
    model = onnx.load(str(source), load_external_data=False)
    data_path = target.parent / data_file_name(target)
    with open(data_path, "wb") as data:
        for tensor in _initializers(model.graph):
            _move_to_data_file(tensor, source.parent, data, data_path.name)
    onnx.save_model(model, str(target))
    logger.info(
        "wrote %s with external data %s (%d bytes)", target.name, data_path.name, data_path.stat().st_size
    )
    return target


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers, inline or external."""
    total = 0
    for tensor in _initializers(model.graph):
        if uses_external_data(tensor):
            total += int(ExternalDataInfo(tensor).length or 0)
        else:
            total += len(tensor.raw_data)
    return total


def save_onnx(model: onnx.ModelProto, path: Path) -> Path:
    """Save `model` at `path`; when its weights are over the limit, they go to one `<name>.data`
    beside it (a fixed name, unlike `onnx.save(save_as_external_data=True)` without `location`,
    which names the file with a fresh uuid on every run).

    The large case moves the weights out of `model`: the proto then references the data file."""
    path = Path(path)
    data = one_file_bytes(model)
    if data is not None:
        with open(path, "wb") as file:
            file.write(data)
        return path
    if initializer_bytes(model) <= EXTERNAL_DATA_THRESHOLD_BYTES:
        onnx.save_model(model, str(path))
        return path
    if any(uses_external_data(t) for t in _initializers(model.graph)):
        raise ValueError(f"{path}: save_onnx needs the weights in memory (load with load_external_data=True)")
    data_path = path.parent / data_file_name(path)
    with open(data_path, "wb") as data:
        for tensor in _initializers(model.graph):
            _move_to_data_file(tensor, path.parent, data, data_path.name)
    onnx.save_model(model, str(path))
    return path


def one_file_bytes(model: onnx.ModelProto) -> bytes | None:
    """The bytes `save_onnx` writes for `model` when they are one file with no external data, else None.

    The same decision as `initializer_bytes(model) <= EXTERNAL_DATA_THRESHOLD_BYTES` without reading every
    weight's bytes for it (upb copies a tensor's raw_data on each read: ~0.1 s for a 221 MB model): a
    serialized model of at most the threshold holds at most that many initializer bytes. Tried only where
    the weights' shapes say the model is under the threshold, so a large model is not serialized in vain;
    anything else (external tensors, a file over the threshold) is left to `save_onnx`'s exact count."""
    tensors = list(_get_all_tensors(model))
    if any(uses_external_data(t) for t in tensors) or _shape_bytes(tensors) > EXTERNAL_DATA_THRESHOLD_BYTES:
        return None
    data = model.SerializeToString()  # what onnx.save_model writes for a model without external tensors
    return data if len(data) <= EXTERNAL_DATA_THRESHOLD_BYTES else None


def _shape_bytes(tensors: list[onnx.TensorProto]) -> int:
    """The tensors' sizes from their shapes and element types (no data read): a cheap estimate."""
    total = 0
    for tensor in tensors:
        count = 1
        for dim in tensor.dims:
            count *= dim
        try:
            total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            continue  # an undefined or unknown element type: the exact count decides
    return total


class BackgroundSave:
    """`save_onnx(model, path)` with the disk write in a thread, so that it overlaps the caller's next work
    (~0.5 s for 221 MB here: the kernel's time, outside the GIL). A model that fits in one file is serialized
    first, in the caller's thread (`data`: the file's bytes, e.g. for an ONNX Runtime session built from
    memory while the file is written): serializing holds the GIL anyway, and a thread's 221 MB buffer comes
    from its own malloc arena as fresh pages (measured ~0.25 s more, all of it under the GIL). `model` may be
    those bytes already (an export made in memory: exporter/export/in_memory.py). The bytes go to a hidden
    file beside `path`, renamed to `path` once complete: a failed write leaves no partial file at `path`. A
    larger model is saved whole in the thread (`model` must not change until `wait`). `wait` joins the thread
    and re-raises what the save raised; `temporary` saves into a fresh folder that `move_to` / `discard`
    remove."""

    def __init__(self, model: onnx.ModelProto | bytes, path: Path) -> None:
        self.path = Path(path)
        self.data = model if isinstance(model, bytes) else one_file_bytes(model)
        self._error: BaseException | None = None
        what = model if self.data is None else self.data
        self._thread = threading.Thread(
            target=self._save, args=(what,), name=f"save {self.path.name}", daemon=True
        )
        self._thread.start()

    @classmethod
    def temporary(cls, model: onnx.ModelProto, name: str) -> BackgroundSave:
        """Saving into `<a fresh temporary folder>/<name>`; `move_to` or `discard` must follow."""
        return cls(model, Path(tempfile.mkdtemp(prefix="export-engine-save-")) / name)

    def _save(self, what: onnx.ModelProto | bytes) -> None:
        try:
            if isinstance(what, bytes):
                write_whole(what, self.path)
            else:
                save_onnx(what, self.path)
        except BaseException as exc:  # re-raised in the caller's thread by wait
            self._error = exc

    def wait(self) -> Path:
        """The saved file, once written (its bytes released); raises what the save raised."""
        self._thread.join()
        self.data = None
        if self._error is not None:
            raise self._error
        return self.path

    def join(self) -> None:
        """Wait for the thread without raising (the caller is already failing)."""
        self._thread.join()

    def move_to(self, target: Path) -> Path:
        """A `temporary` save's file (and its `.data`) at `target`, whose folder exists and whose name is the
        same (the .data file is named after it); the temporary folder removed."""
        target = Path(target)
        try:
            self.wait()
            if target.name != self.path.name:
                raise ValueError(
                    f"{target}: the saved {self.path.name} keeps its name (its .data file is named after it)"
                )
            for file in sorted(self.path.parent.iterdir()):
                shutil.move(str(file), str(target.parent / file.name))
        finally:
            shutil.rmtree(self.path.parent, ignore_errors=True)
        return target

    def discard(self) -> None:
        """A `temporary` save not used (the export stopped before): waited for and its folder removed."""
        self._thread.join()
        shutil.rmtree(self.path.parent, ignore_errors=True)


def write_whole(data: bytes, path: Path) -> None:
    """`data` at `path`, or nothing there: written to a hidden file beside it and renamed once complete (a
    write that fails, e.g. a full disk, removes its partial file and raises)."""
    partial = path.parent / f".{path.name}.partial"
    try:
        with open(partial, "wb") as file:
            file.write(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Initializers of the graph and of every subgraph, in graph order."""
    tensors = list(graph.initializer)
    for node in graph.node:
        for attribute in node.attribute:
            subgraphs = ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs)
            for subgraph in subgraphs:
                tensors += _initializers(subgraph)
    return tensors


def _move_to_data_file(tensor: onnx.TensorProto, source_dir: Path, data, location: str) -> None:  # type: ignore[no-untyped-def]
    if uses_external_data(tensor):
        _copy_external(tensor, source_dir, data, location)
        return
    if tensor.HasField("raw_data") and len(tensor.raw_data) >= MIN_EXTERNAL_TENSOR_BYTES:
        payload = tensor.raw_data
    else:
        return
    offset = -(-data.tell() // ALIGNMENT) * ALIGNMENT
    data.write(b"\0" * (offset - data.tell()))
    data.write(payload)
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(payload)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _copy_external(tensor: onnx.TensorProto, source_dir: Path, data, location: str) -> None:  # type: ignore[no-untyped-def]
    """An external tensor's bytes copied into `data` in 64 MiB chunks (never the whole tensor in memory)."""
    info = ExternalDataInfo(tensor)
    file = (source_dir / info.location).resolve()
    if source_dir.resolve() not in file.parents:
        raise ValueError(f"external data of {tensor.name!r} points outside {source_dir}: {info.location}")
    offset = -(-data.tell() // ALIGNMENT) * ALIGNMENT
    data.write(b"\0" * (offset - data.tell()))
    length = 0
    with open(file, "rb") as handle:
        handle.seek(info.offset or 0)
        left = info.length if info.length is not None else -1
        while left != 0:
            chunk = handle.read(64 * 2**20 if left < 0 else min(left, 64 * 2**20))
            if not chunk:
                break
            data.write(chunk)
            length += len(chunk)
            left = left - len(chunk) if left > 0 else left
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


@contextlib.contextmanager
def export_target(path: Path, large: bool) -> Iterator[Path]:
    """The file name to hand to `torch.onnx.export` for `path`: a file in a scratch folder beside it,
    where the exporter may drop one file per tensor. On leaving the block without error, a large
    model (or any export that came out with external data, e.g. tied weights stored twice pushing
    it over the limit) is packed into `path` + `<path name>.data`; a small one is just moved to
    `path`. The scratch folder is removed either way."""
    scratch = path.parent / f".{path.name}.export-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        yield scratch / path.name
        # no file beside the model: no external data (the exporter writes its tensors beside the model),
        # so the 45M Llama's 221 MB are not parsed again just to find none (~0.2 s)
        others = any(p.name != path.name for p in scratch.iterdir())
        if large or (others and has_external_data(scratch / path.name)):
            consolidate_external_data(scratch / path.name, path)
        else:
            (scratch / path.name).replace(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def holds_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor of `model` (initializers, attribute tensors, subgraphs) points to external data."""
    return any(uses_external_data(t) for t in _get_all_tensors(model))


def has_external_data(onnx_path: Path) -> bool:
    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(uses_external_data(t) for t in _initializers(model.graph))
