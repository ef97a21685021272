"""One runner interface for every backend (ONNX Runtime, TensorRT).

A runner is a context manager: constructing it touches no device; `__enter__` loads the artifact
(session or engine); `infer(feeds)` validates feeds against `input_specs` with exact messages and
returns outputs as numpy arrays keyed by name. Modelled on Polygraphy's runner base.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from export_errors import InputError


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype and shape; a dimension is an int or a symbolic name (dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]


class Runner(abc.ABC):
    """Base runner. Subclasses implement `_activate`, `_deactivate`, `_infer`, and the specs."""

    backend: str = "?"
    # Filled by `_activate` in runners that learn their I/O from the loaded artifact.
    _inputs: list[TensorSpec] | None = None
    _outputs: list[TensorSpec] | None = None

    def __init__(self) -> None:
        self._active = False

    def __enter__(self) -> Runner:
        self._activate()
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._deactivate()
        self._active = False

    @abc.abstractmethod
    def _activate(self) -> None: ...

    def _deactivate(self) -> None:
        return None

    @property
    def input_specs(self) -> list[TensorSpec]:
        if self._inputs is None:
            raise RuntimeError(f"{type(self).__name__}: input specs are known after __enter__")
        return self._inputs

    @property
    def output_specs(self) -> list[TensorSpec]:
        if self._outputs is None:
            raise RuntimeError(f"{type(self).__name__}: output specs are known after __enter__")
        return self._outputs

    @abc.abstractmethod
    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate `feeds` against the input specs, run, return outputs by name."""
        if not self._active:
            raise RuntimeError(f"{type(self).__name__} is not active: use it as a context manager")
        self.validate_feeds(feeds)
        return self._infer(feeds)

    def validate_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        specs = {spec.name: spec for spec in self.input_specs}
        missing = [name for name in specs if name not in feeds]
        if missing:
            raise InputError("feeds", f"missing input(s) {missing}; expected {sorted(specs)}")
        extra = [name for name in feeds if name not in specs]
        if extra:
            raise InputError("feeds", f"unknown input(s) {extra}; expected {sorted(specs)}")
        for name, spec in specs.items():
            array = feeds[name]
            if np.dtype(array.dtype) != spec.dtype:
                raise InputError("feeds", f"input {name!r} has dtype {array.dtype}, expected {spec.dtype}")
            if len(array.shape) != len(spec.shape):
                raise InputError(
                    "feeds",
                    f"input {name!r} has rank {array.ndim} {array.shape}, expected shape {spec.shape}",
                )
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
                if isinstance(want, int) and want >= 0 and got != want:
                    raise InputError(
                        "feeds", f"input {name!r} axis {axis} is {got}, expected {want} (shape {spec.shape})"
                    )


def open_together(
    runners: Sequence[Runner], stack: contextlib.ExitStack, workers: int = 2
) -> list[Exception | None]:
    """Activate `runners` on `workers` threads, each active one's exit pushed on `stack`; returns, per runner,
    None or the exception its activation raised (the caller decides: report it, or raise it). Loading a
    session or compiling a model is mostly one core's work that releases the GIL: on the export's 2 cores,
    two at a time take about half the wall time (measured: 3 OpenVINO candidates + 4 ONNX Runtime sessions
    of the demo, 1.31 -> 0.70 s). Nothing is timed meanwhile: every activation has ended when this returns."""

    def enter(runner: Runner) -> Exception | None:
        try:
            runner.__enter__()
        except Exception as exc:
            return exc
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        errors = list(pool.map(enter, runners))
    for runner, error in zip(runners, errors):
        if error is None:
            stack.push(runner)  # its __exit__ runs when the stack closes
    return errors
