"""Stitch piece graphs into one decoder ONNX whose weights stream into one external-data file.

`StitchedGraph.append(piece.onnx)` moves the piece's nodes into the growing graph and its weights,
one tensor at a time, to `<target>.data` (64 KiB-aligned offsets, as exporter/export/external_data.py
writes them), so the stitched model never holds more than one piece's weights. Pieces are connected by
their graph input/output names (exporter/export/streaming/pieces.py); any other name that a piece shares
with the graph so far (TorchScript numbers constants and folded weights per trace, so every layer has
its own `onnx::MatMul_123`) is renamed with the piece's tag. The graph's inputs and outputs are the
whole-model export's (`io_names`), in its order, with the pieces' types and dynamic dims.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import onnx

from exporter.export import external_data


class StitchedGraph:
    def __init__(self, target: Path, input_names: list[str], output_names: list[str]) -> None:
        self.target = Path(target)
        self.data_path = self.target.parent / external_data.data_file_name(self.target)
        self.input_names, self.output_names = input_names, output_names
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.value_infos: dict[str, onnx.ValueInfoProto] = {}  # the pieces' inputs and outputs, by name
        self.names: set[str] = set()
        self.node_names: set[str] = set()
        self.opset_import: list[onnx.OperatorSetIdProto] | None = None
        self.header: tuple[int, str, str] = (0, "", "")
        self._data: BinaryIO = open(self.data_path, "wb")  # noqa: SIM115 (closed by finish)

    def append(self, piece_path: Path, tag: str) -> None:
        """Move the piece at `piece_path` (weights inline or external beside it) into the graph."""
        piece = onnx.load(str(piece_path), load_external_data=False)
        graph = piece.graph
        if self.opset_import is None:
            self.opset_import = list(piece.opset_import)
            self.header = (piece.ir_version, piece.producer_name, piece.producer_version)
        boundary = {v.name for v in graph.input} | {v.name for v in graph.output}
        for value in [*graph.input, *graph.output]:
            self.value_infos.setdefault(value.name, value)
        own = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output if o}
        rename = {}
        for name in sorted(own - boundary):
            new = name
            while new in self.names:
                new = f"{new}.{tag}"
            rename[name] = new
        for tensor in graph.initializer:
            tensor.name = rename.get(tensor.name, tensor.name)
            external_data._move_to_data_file(tensor, piece_path.parent, self._data, self.data_path.name)
            self.initializers.append(tensor)
        for node in graph.node:
            node.input[:] = [rename.get(n, n) for n in node.input]
            node.output[:] = [rename.get(n, n) for n in node.output]
            while node.name in self.node_names:
                node.name = f"{node.name}.{tag}"
            self.node_names.add(node.name)
            self.nodes.append(node)
        self.names |= set(rename.values()) | boundary

    def rename_input(self, old: str, new: str) -> None:
        """Make every node reading `old` read `new` (a graph input known only at the end)."""
        for node in self.nodes:
            node.input[:] = [new if n == old else n for n in node.input]

    def finish(self) -> Path:
        """Write the graph (weights already in the data file) at `target`; returns it."""
        self._data.close()
        missing = [n for n in [*self.input_names, *self.output_names] if n not in self.value_infos]
        if missing:
            raise ValueError(f"stitched decoder: no piece provides {missing[0]!r}")
        graph = onnx.helper.make_graph(
            self.nodes,
            "main_graph",
            [self.value_infos[n] for n in self.input_names],
            [self.value_infos[n] for n in self.output_names],
            initializer=self.initializers,
        )
        ir_version, producer, version = self.header
        model = onnx.helper.make_model(
            graph, opset_imports=self.opset_import, producer_name=producer, producer_version=version
        )
        model.ir_version = ir_version
        onnx.save_model(model, str(self.target))
        return self.target

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()
