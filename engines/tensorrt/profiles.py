"""Optimization profiles (min/opt/max shapes per input): parsed, defaulted and checked as pure code.

TensorRT builds kernels for a range of shapes per dynamic input; a feed outside [min, max] is
refused at run time, and a profile that misses a dynamic input or disagrees with a fixed
dimension fails the build (TensorRT #3048). We check all of that before TensorRT sees it.
Strings follow trtexec: `--minShapes=input_ids:1x1,attention_mask:1x1`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from engines.base import TensorSpec
from export_errors import InputError

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ShapeRange:
    """min <= opt <= max, elementwise, all of one rank."""

    min: Shape
    opt: Shape
    max: Shape

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= dim <= hi for lo, dim, hi in zip(self.min, shape, self.max)
        )


@dataclasses.dataclass(frozen=True)
class OptimizationProfile:
    """One TensorRT optimization profile: a shape range per input name."""

    shapes: dict[str, ShapeRange]

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return {
            name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)}
            for name, r in self.shapes.items()
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OptimizationProfile:
        return cls(
            {name: ShapeRange(tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])) for name, r in data.items()}
        )


def parse_shapes(text: str, flag: str) -> dict[str, Shape]:
    """`input_ids:1x128,attention_mask:1x128` -> {"input_ids": (1, 128), ...}; a scalar is `name:` (trtexec)."""
    shapes: dict[str, Shape] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, dims = item.rpartition(":")
        name = name.strip("'\"")
        if not sep or not name:
            raise InputError(flag, f"{item!r} is not NAME:DxDx..D (example: input_ids:1x128)")
        try:
            shape = tuple(int(d) for d in dims.split("x")) if dims else ()
        except ValueError:
            raise InputError(flag, f"{item!r}: dimensions must be integers separated by 'x'") from None
        if any(d < 1 for d in shape):
            raise InputError(flag, f"{item!r}: every dimension must be >= 1")
        if name in shapes:
            raise InputError(flag, f"input {name!r} is given twice")
        shapes[name] = shape
    if not shapes:
        raise InputError(flag, "no shapes given")
    return shapes


def profiles_from_shapes(
    min_shapes: str | None, opt_shapes: str | None, max_shapes: str | None
) -> OptimizationProfile:
    """One profile from trtexec-style strings. A missing one takes the value of opt (or of the other given)."""
    given = {
        "--minShapes": min_shapes,
        "--optShapes": opt_shapes,
        "--maxShapes": max_shapes,
    }
    parsed = {flag: parse_shapes(text, flag) for flag, text in given.items() if text}
    if not parsed:
        raise InputError("--minShapes/--optShapes/--maxShapes", "give at least one of them")
    fallback = parsed.get("--optShapes") or next(iter(parsed.values()))
    lo, opt, hi = (parsed.get(flag, fallback) for flag in given)
    if not (set(lo) == set(opt) == set(hi)):
        raise InputError(
            "--minShapes/--optShapes/--maxShapes",
            f"they name different inputs: min {sorted(lo)}, opt {sorted(opt)}, max {sorted(hi)}",
        )
    ranges: dict[str, ShapeRange] = {}
    for name in lo:
        if not (len(lo[name]) == len(opt[name]) == len(hi[name])):
            raise InputError("--minShapes/--optShapes/--maxShapes", f"input {name!r}: ranks differ")
        if not all(a <= b <= c for a, b, c in zip(lo[name], opt[name], hi[name])):
            raise InputError(
                "--minShapes/--optShapes/--maxShapes",
                f"input {name!r}: need min <= opt <= max, got {lo[name]}, {opt[name]}, {hi[name]}",
            )
        ranges[name] = ShapeRange(lo[name], opt[name], hi[name])
    return OptimizationProfile(ranges)


def _axis_range(spec: TensorSpec, axis: int, dim: int | str, batch: Shape, seq: Shape) -> Shape:
    if isinstance(dim, int) and dim >= 0:
        return (dim, dim, dim)
    name = str(dim).lower()
    if "batch" in name or (axis == 0 and "seq" not in name):
        return batch
    if "seq" in name or axis == 1:
        return seq
    raise InputError(
        spec.name,
        f"axis {axis} ({dim}) is dynamic and neither batch nor sequence: give --minShapes/--optShapes/--maxShapes",
    )


def default_profiles(
    input_specs: Sequence[TensorSpec],
    max_batch: int,
    max_seq: int,
    *,
    opt_batch: int | None = None,
    opt_seq: int | None = None,
) -> OptimizationProfile:
    """A profile from the export's dynamic axes: batch 1..max_batch, sequence 1..max_seq.

    opt defaults to min(8, max_batch) x min(128, max_seq): the shapes the benchmarks time.
    """
    if max_batch < 1 or max_seq < 1:
        raise InputError("max_batch/max_seq", f"must be >= 1, got {max_batch}, {max_seq}")
    ob = opt_batch if opt_batch is not None else min(8, max_batch)
    os_ = opt_seq if opt_seq is not None else min(128, max_seq)
    if not (1 <= ob <= max_batch and 1 <= os_ <= max_seq):
        raise InputError("opt_batch/opt_seq", f"must lie in 1..max, got {ob}/{max_batch}, {os_}/{max_seq}")
    batch, seq = (1, ob, max_batch), (1, os_, max_seq)
    ranges: dict[str, ShapeRange] = {}
    for spec in input_specs:
        per_axis = [_axis_range(spec, axis, dim, batch, seq) for axis, dim in enumerate(spec.shape)]
        ranges[spec.name] = ShapeRange(*(tuple(r[i] for r in per_axis) for i in range(3)))
    return OptimizationProfile(ranges)


def check_profile(input_specs: Sequence[TensorSpec], profile: OptimizationProfile) -> list[str]:
    """Problems that would make TensorRT reject `profile` for these inputs (empty list: fine)."""
    problems: list[str] = []
    specs = {spec.name: spec for spec in input_specs}
    for name in sorted(set(profile.shapes) - set(specs)):
        problems.append(f"profile names {name!r}, which is not an input of the model ({sorted(specs)})")
    for name, spec in specs.items():
        dynamic = any(not isinstance(d, int) or d < 0 for d in spec.shape)
        if name not in profile.shapes:
            if dynamic:
                problems.append(f"input {name!r} {spec.shape} is dynamic but has no shape in the profile")
            continue
        r = profile.shapes[name]
        if len(r.min) != len(spec.shape):
            problems.append(
                f"input {name!r}: profile rank {len(r.min)} but the model's rank is {len(spec.shape)}"
            )
            continue
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim >= 0 and not (r.min[axis] == r.opt[axis] == r.max[axis] == dim):
                problems.append(f"input {name!r} axis {axis} is fixed at {dim}; the profile gives {r}")
    return problems
