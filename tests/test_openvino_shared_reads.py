"""OpenVINO runners of one file opened inside `shared_reads()` (as the CPU engine stage opens its
candidates): the file is read once, each runner compiles its own model, and their outputs are those of
runners opened apart (bitwise), f32 and bf16 alike; outside the block every runner reads the file."""

from __future__ import annotations

import contextlib

import graph_models as gm
import numpy as np
import onnx
import pytest

from engines.base import open_together
from engines.openvino_runner import OpenVinoRunner, openvino_unavailable_reason, shared_reads

pytestmark = pytest.mark.skipif(openvino_unavailable_reason() is not None, reason="OpenVINO not usable here")


def _outputs(path, shared: bool, monkeypatch) -> tuple[list[dict[str, np.ndarray]], int]:
    import openvino as ov

    reads = {"n": 0}
    real = ov.Core.read_model

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        reads["n"] += 1
        return real(self, *args, **kwargs)

    feeds = gm.bert_example()
    with monkeypatch.context() as patch, contextlib.ExitStack() as stack:
        patch.setattr(ov.Core, "read_model", counted)
        runners = [OpenVinoRunner(path, threads=1, precision=p) for p in ("f32", "bf16", "f32")]
        with shared_reads() if shared else contextlib.nullcontext():
            assert open_together(runners, stack) == [None, None, None]
        return [r.infer(feeds) for r in runners], reads["n"]


def test_one_read_per_file_and_the_same_outputs(tmp_path, monkeypatch):
    path = tmp_path / "bert.onnx"
    onnx.save(gm.bert_onnx(), str(path))
    apart, reads_apart = _outputs(path, False, monkeypatch)
    shared, reads_shared = _outputs(path, True, monkeypatch)
    assert (reads_apart, reads_shared) == (3, 1)
    for a, b in zip(apart, shared):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
