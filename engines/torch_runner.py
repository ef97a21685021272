"""A `Runner` over a PyTorch `nn.Module`, so the PyTorch reference stage is timed by the same loop,
with the same feed validation, as the ONNX Runtime and TensorRT stages.

The module is called with keyword arguments named as the ONNX inputs (`input_ids`, ...), under
`torch.inference_mode()`; a tensor or tuple result is mapped onto `output_names` in order. Threads:
`threads` sets `torch.set_num_threads` while the runner is active and restores it on exit, so a
comparison against ONNX Runtime with `intra_op_num_threads=threads` is like for like.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from engines.base import Runner, TensorSpec

DYNAMIC_TOKEN_SHAPE: tuple[int | str, ...] = ("batch", "sequence")


class TorchRunner(Runner):
    """Runs `module(**feeds)` on CPU; inputs default to int64 (batch, sequence) token tensors."""

    backend = "pytorch"

    def __init__(
        self,
        module: nn.Module,
        input_names: Sequence[str],
        output_names: Sequence[str],
        *,
        input_specs: Sequence[TensorSpec] | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.output_names = list(output_names)
        self._inputs = (
            list(input_specs)
            if input_specs is not None
            else [TensorSpec(name, np.dtype(np.int64), DYNAMIC_TOKEN_SHAPE) for name in input_names]
        )
        self.threads = threads
        self._saved_threads: int | None = None

    @property
    def output_specs(self) -> list[TensorSpec]:
        """Names and dtype only: a module does not declare its output ranks, so shapes are left empty."""
        return [TensorSpec(name, np.dtype(np.float32), ()) for name in self.output_names]

    def _activate(self) -> None:
        self.module.eval()
        if self.threads is not None:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def _deactivate(self) -> None:
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            result = self.module(
                **{name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in feeds.items()}
            )
        return self._name_outputs(result)

    def _name_outputs(self, result: Any) -> dict[str, np.ndarray]:
        tensors = (result,) if isinstance(result, torch.Tensor) else tuple(result)
        if len(tensors) != len(self.output_names):
            raise RuntimeError(
                f"module returned {len(tensors)} output(s), expected {len(self.output_names)} {self.output_names}"
            )
        return {name: t.detach().float().numpy() for name, t in zip(self.output_names, tensors)}
