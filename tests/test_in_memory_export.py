"""The export made in memory (exporter/export/in_memory.py): its file holds exactly what torch.onnx.export writes
to a path; export_engine builds one ONNX Runtime session for model.exported.onnx and its graph passes parse
the export's bytes instead of reading the file back; a failed write raises and leaves no file; an error in
the check is raised once the write has ended; models needing external data keep the path export's files."""

from __future__ import annotations

import builtins
import hashlib
import time
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from test_decoder_export import build_pruned_model

from exporter.api import export_engine
from exporter.config import ExportConfig
from exporter.export import external_data
from exporter.export import torch_to_onnx as t2o
from exporter.export.decoder_with_past import (
    DecoderWithPastForExport,
    cache_layers,
    eager_attention,
    example_feeds,
    export_decoder,
    io_names,
    layer_attention_shapes,
)
from exporter.export.in_memory import start_export
from exporter.testing.synthetic import build_base_model

FP32 = ExportConfig(precision="fp32", benchmark=False, sequence_length=32, validation_samples=4)


def plain_export(module, args, path, inputs, outputs, axes) -> bytes:  # type: ignore[no-untyped-def]
    """torch.onnx.export straight to a path, with the options the product exports with."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )
    return Path(path).read_bytes()


def decoder_export_arguments(model):  # type: ignore[no-untyped-def]
    """The decoder wrapper and the arguments export_decoder traces it with."""
    shapes = layer_attention_shapes(model)
    inputs, outputs, axes = io_names(cache_layers(shapes))
    feeds = example_feeds(shapes, int(model.get_output_embeddings().out_features), batch=2, past=3, seq=4)
    args = tuple(torch.from_numpy(feeds[name]) for name in inputs)
    return DecoderWithPastForExport(model).eval(), args, inputs, outputs, axes


def encoder() -> tuple[torch.nn.Module, t2o.ExportArguments]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 9), generator=gen)
    example = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }
    wrapper = t2o.EncoderForExport(build_base_model("bert"), True, None).eval()
    return wrapper, t2o.export_arguments(wrapper, example)


def test_the_decoder_file_and_bytes_are_what_a_plain_export_to_a_path_writes(tmp_path) -> None:
    model = build_pruned_model("llama", seed=1)
    _, data = export_decoder(model, tmp_path / "model.exported.onnx")
    wrapper, args, inputs, outputs, axes = decoder_export_arguments(model)
    with eager_attention(model):
        plain = plain_export(wrapper, args, tmp_path / "plain.onnx", inputs, outputs, axes)
    assert data is not None and data == plain
    assert (tmp_path / "model.exported.onnx").read_bytes() == plain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.exported.onnx", "plain.onnx"]


def test_the_encoder_file_is_what_a_plain_export_to_a_path_writes(tmp_path) -> None:
    wrapper, (args, inputs, outputs, axes) = encoder()
    exported = start_export(wrapper, args, tmp_path / "model.exported.onnx", inputs, outputs, axes, 17)
    with exported.checked():
        pass
    plain = plain_export(wrapper, args, tmp_path / "plain.onnx", inputs, outputs, axes)
    assert exported.data == plain
    assert (tmp_path / "model.exported.onnx").read_bytes() == plain


def _sessions_and_loads(monkeypatch) -> tuple[list[str], list[str]]:  # type: ignore[no-untyped-def]
    """Records each ONNX Runtime session's source (a file name, or the sha256 of the bytes) and each onnx.load."""
    built: list[str] = []
    loaded: list[str] = []
    real_session, real_load = ort.InferenceSession, onnx.load

    def session(source, options=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        built.append(hashlib.sha256(source).hexdigest() if isinstance(source, bytes) else Path(source).name)
        return real_session(source, options, *args, **kwargs)

    def load(f, *args, **kwargs):  # type: ignore[no-untyped-def]
        loaded.append(Path(str(f)).name)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(onnx, "load", load)
    return built, loaded


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_export_engine_builds_one_session_for_the_export_and_passes_parse_its_bytes(
    family, model_dir_factory, tmp_path, monkeypatch
) -> None:
    """The decoder's validation and the stage's check share the session built from the bytes; the graph passes
    take the bytes (no onnx.load of model.exported.onnx anywhere in the run)."""
    built, loaded = _sessions_and_loads(monkeypatch)
    out = tmp_path / "out"
    export_engine(model_dir_factory(family), out, FP32)
    exported = hashlib.sha256((out / "model.exported.onnx").read_bytes()).hexdigest()
    assert built.count(exported) == 1
    assert "model.exported.onnx" not in built
    assert "model.exported.onnx" not in loaded


def _failing_open(after: int):  # type: ignore[no-untyped-def]
    """`open` for external_data whose files take `after` bytes, then fail as a full disk does."""

    class Full:
        def __init__(self, file) -> None:  # type: ignore[no-untyped-def]
            self.file = file

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
            self.file.close()

        def write(self, data) -> int:  # type: ignore[no-untyped-def]
            self.file.write(data[:after])
            self.file.flush()
            raise OSError(28, "No space left on device")

    return lambda path, mode="r": Full(builtins.open(path, mode))


def test_a_failed_write_raises_and_leaves_no_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(external_data, "open", _failing_open(1000), raising=False)
    model = build_pruned_model("llama", seed=1)
    with pytest.raises(OSError, match="No space left"):
        export_decoder(model, tmp_path / "model.exported.onnx")
    assert list(tmp_path.iterdir()) == []  # neither a half-written file nor the partial one
    wrapper, (args, inputs, outputs, axes) = encoder()
    exported = start_export(wrapper, args, tmp_path / "model.exported.onnx", inputs, outputs, axes, 17)
    with pytest.raises(OSError, match="No space left"), exported.checked():
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_export_engine_fails_on_a_failed_write_of_the_export(
    family, model_dir_factory, tmp_path, monkeypatch
):
    monkeypatch.setattr(external_data, "open", _failing_open(1000), raising=False)
    with pytest.raises(OSError, match="No space left"):
        export_engine(model_dir_factory(family), tmp_path / "out", FP32)
    assert list(tmp_path.iterdir()) == []  # no OUT_DIR, no staging folder


def test_an_error_in_the_check_is_raised_once_the_file_is_written(tmp_path, monkeypatch) -> None:
    def slow_open(path, mode="r"):  # type: ignore[no-untyped-def]
        time.sleep(0.5)  # the check fails long before the write ends
        return builtins.open(path, mode)

    monkeypatch.setattr(external_data, "open", slow_open, raising=False)
    wrapper, (args, inputs, outputs, axes) = encoder()
    exported = start_export(wrapper, args, tmp_path / "model.exported.onnx", inputs, outputs, axes, 17)
    with pytest.raises(ValueError, match="the check"), exported.checked():
        raise ValueError("the check failed")
    assert (
        tmp_path / "model.exported.onnx"
    ).read_bytes() == exported.data  # written whole, none left writing


def test_an_export_over_the_protobuf_limit_is_written_from_its_path(tmp_path, monkeypatch) -> None:
    """torch refuses to make an export over 2 GiB in memory: it is exported to its path (as before), the
    same file."""
    real = torch.onnx.export
    refused = []

    def export(module, args, f, *rest, **kwargs):  # type: ignore[no-untyped-def]
        if not isinstance(f, str):
            refused.append(f)
            raise RuntimeError(
                "The serialized model is larger than the 2GiB limit imposed by the protobuf library."
            )
        return real(module, args, f, *rest, **kwargs)

    wrapper, (args, inputs, outputs, axes) = encoder()
    plain = plain_export(wrapper, args, tmp_path / "plain.onnx", inputs, outputs, axes)
    monkeypatch.setattr(torch.onnx, "export", export)
    path = tmp_path / "out" / "model.exported.onnx"
    exported = start_export(wrapper, args, path, inputs, outputs, axes, 17)
    assert refused and exported.data is None
    with exported.checked() as session:
        assert [i.name for i in session.get_inputs()] == inputs
    assert path.read_bytes() == plain

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("another failure")

    monkeypatch.setattr(torch.onnx, "export", failing)
    with pytest.raises(RuntimeError, match="another failure"):  # any other error is the export's own
        start_export(wrapper, args, path, inputs, outputs, axes, 17)


def test_models_needing_external_data_keep_the_path_exports_files(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(external_data, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    wrapper, (args, inputs, outputs, axes) = encoder()
    t2o.torchscript_export(wrapper, args, tmp_path / "a" / "model.onnx", inputs, outputs, axes, 17)
    exported = start_export(wrapper, args, tmp_path / "b" / "model.onnx", inputs, outputs, axes, 17)
    assert exported.data is None
    with exported.checked() as session:
        assert [o.name for o in session.get_outputs()] == outputs
    for folder in ("a", "b"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["model.onnx", "model.onnx.data"]
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
