"""Write a piece-by-piece rewritten graph's weights to its final data file as each piece is done.

Why: the per-piece quantizers (exporter/quantize/per_piece.py) splice each quantized piece back into the
lazily loaded graph. Held in memory until the end, the quantized weights of an 8B model are the stage's
peak (measured: 6.36 GiB anonymous for the all-4-bit file, about 9 GiB for 8-bit weights, over the issue's
8 / 12 GiB bars once the process's own ~1.5 GiB is added). Here each piece's new initializers are appended
to `<out>.data` as soon as the piece is spliced, and the value then points at that file (an onnx-ir
`ExternalTensor`, never read again by the rewrite): only one piece's weights are ever in memory, and the
data file written is the final one (no second copy on disk). `finish` appends what is left (norm gains,
small constants, still mapped from the fp32 file, each unmapped once written) and writes the graph.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from exporter.export.external_data import ALIGNMENT

INLINE_BYTES = 1024  # smaller tensors stay in the .onnx (as ir.save and onnx's converter keep them)


class DataFileWriter:
    """Appends tensors to `<out>.data` (each ALIGNMENT-aligned, as exporter.export.external_data writes
    them: ONNX Runtime maps aligned initializers in place) and repoints their values at it."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.parent / (out.name + ".data")
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by finish()/close()
        self.written = 0

    def spill(self, value: ir.Value) -> None:
        """`value`'s tensor appended to the data file and replaced by a reference to it (released if it was
        mapped from another file); small tensors become in-memory copies (inlined by `finish`)."""
        const = value.const_value
        if const is None or self._is_ours(const):
            return
        data = const.tobytes()
        if isinstance(const, ir.ExternalTensor):
            const.release()
        if len(data) < INLINE_BYTES:
            value.const_value = ir.Tensor(_array(const, data), dtype=const.dtype, name=value.name)
            return
        offset = -(-self._file.tell() // ALIGNMENT) * ALIGNMENT
        self._file.write(b"\0" * (offset - self._file.tell()))
        self._file.write(data)
        self.written += len(data)
        value.const_value = ir.ExternalTensor(
            self.path.name,
            offset,
            len(data),
            const.dtype,
            shape=const.shape,
            name=str(value.name),
            base_dir=str(self.path.parent),
        )
        del data

    def spill_all(self, values: list[ir.Value]) -> None:
        for value in values:
            self.spill(value)
        self._file.flush()

    def finish(self, model: ir.Model) -> None:
        """Every remaining initializer appended, then `out` written with references into the data file."""
        self.spill_all(list(model.graph.initializers.values()))
        self._file.close()
        onnx.save_model(ir.serde.serialize_model(model), str(self.out))

    def close(self) -> None:
        self._file.close()

    def _is_ours(self, const: object) -> bool:
        return isinstance(const, ir.ExternalTensor) and Path(const.path) == self.path


def _array(const: object, data: bytes):  # type: ignore[no-untyped-def]
    """A copy that references neither a mapped file nor a protobuf message (a numpy view of either would
    keep it alive)."""
    import numpy as np

    return np.frombuffer(data, dtype=const.dtype.numpy()).reshape(const.shape.numpy()).copy()  # type: ignore[attr-defined]
