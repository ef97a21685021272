"""Shared fixtures: seeded synthetic MODEL_DIRs written to temporary folders (see exporter/testing/synthetic.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def model_dir_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make(family, **write_model_dir_kwargs) -> Path`: a fresh tiny MODEL_DIR per call."""
    from exporter.testing.synthetic import write_model_dir

    def make(family: str, **kwargs: object) -> Path:
        return write_model_dir(tmp_path_factory.mktemp(f"{family}_dir"), family, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def minilm_demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo MODEL_DIR built once per session from the real all-MiniLM-L6-v2 weights."""
    from exporter.testing.synthetic import write_minilm_demo_dir

    return write_minilm_demo_dir(tmp_path_factory.mktemp("minilm_demo"))


@pytest.fixture(scope="session")
def minilm_demo_export(minilm_demo_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The demo MODEL_DIR exported once per session with the default configuration (the product's
    main job); tests read its report and artifacts."""
    from exporter.api import export_engine

    return export_engine(minilm_demo_dir, tmp_path_factory.mktemp("minilm_export") / "out")
