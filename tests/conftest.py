"""Shared fixtures: the real assets and one real Ollama server for the whole test session."""
import os
from pathlib import Path

import ollama  # noqa: F401  the real client, imported before a test puts bench/ on sys.path (bench/ollama.py would shadow it)
import pytest

from movierec.assets import base_model_path, ml100k_path
from movierec.core import PROJECT_ROOT

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def base_gguf() -> Path:
    "The default base model, SmolLM2-135M-Instruct (Q4_1 GGUF)."
    return base_model_path()


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    "MovieLens-100K as set up by `movierec setup` (RecBole atomic files or GroupLens' layout)."
    return ml100k_path()


@pytest.fixture(scope="session")
def ml100k_prepared(ml100k_dir, tmp_path_factory) -> dict:
    """ML-100K prepared once per session with the default knobs (seed 0) but 2 folds: the hybrid prompt's out-of-fold
    classic fits take most of its time, so the modules that only sample its examples share one preparation."""
    from movierec.prompts import PrepareConfig, load_prepared, prepare
    full = tmp_path_factory.mktemp("ml100k-prepared")
    prepare(PrepareConfig(dataset=str(ml100k_dir), folds=2, seed=0), full)
    return load_prepared(full)


@pytest.fixture(scope="session")
def ollama_server():
    "A real `ollama serve` on a free loopback port with its own models folder, stopped at the end."
    from movierec.ollama_server import OllamaServer
    with OllamaServer(num_parallel=2) as srv:
        yield srv
