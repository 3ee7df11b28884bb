"""Shared fixtures: a small saved checkpoint and the path to the shared real data."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

CAPTIONS = [
    f"a {size}{color} {shape}"
    for size in ("", "small ", "big ")
    for color in ("red", "blue", "green", "yellow", "purple", "orange")
    for shape in ("circle", "square", "triangle")
]


@pytest.fixture(scope="session")
def smoke_client() -> Any:
    """deploy/smoke_client.py (a script, not a package) loaded as a module."""
    spec = importlib.util.spec_from_file_location("smoke_client", ROOT / "deploy" / "smoke_client.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a clean skip where a checkout does not have it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained mini-32 CLIP saved as a real checkpoint directory (random but fixed weights)."""
    from model import CLIP, CLIPTokenizer, preset_config, save_checkpoint

    torch.manual_seed(0)
    cfg = preset_config("mini-32")
    tokenizer = CLIPTokenizer.train(CAPTIONS * 5, vocab_size=cfg.vocab_size, max_length=cfg.max_seq_len)
    model = CLIP(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "mini"
    save_checkpoint(path, model, tokenizer, {"step": 0, "class_names": ["circle", "square", "triangle"]})
    return path
