"""Nothing in MODEL_DIR is executed: remote-code configs (auto_map + a .py file) are not imported, and a
pickle checkpoint that would run code on unpickling is refused, without and with --allow-pickle
(torch.load(weights_only=True)). Each hostile file would create a marker file if it ever ran."""

from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path

import pytest

from export_errors import InputError
from exporter.api import export_engine
from exporter.config import ExportConfig

FP32 = {"precision": "fp32", "benchmark": False, "sequence_length": 16, "validation_samples": 2}


class _RunsCode:
    """Unpickling this calls Path(marker).touch(): what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_remote_code_in_config_is_never_imported(model_dir_factory, tmp_path) -> None:
    model_dir = model_dir_factory("bert")
    marker = tmp_path / "remote_code_ran"
    (model_dir / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    with contextlib.suppress(InputError):  # refusing the folder is fine too; running its code is not
        export_engine(model_dir, tmp_path / "out", ExportConfig(**FP32))
    assert not marker.exists()


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_code_running_pickle_is_refused(model_dir_factory, tmp_path, allow_pickle) -> None:
    model_dir = model_dir_factory("bert")
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "pickle_ran"
    with open(model_dir / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"encoder.layer.0.attention.self.query.weight": _RunsCode(marker)}, handle)
    with pytest.raises(InputError, match=r"pytorch_model\.bin") as caught:
        export_engine(model_dir, tmp_path / "out", ExportConfig(**FP32, allow_pickle=allow_pickle))
    assert "\n" not in str(caught.value)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
