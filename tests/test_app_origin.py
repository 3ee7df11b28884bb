"""GET /info says where a served model came from: an import's source and licence, nothing for a model trained here."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from test_interop_hf import _hf_dir, bpe_dir  # noqa: F401  (bpe_dir: the module-scoped fixture)

from interop.hf import import_hf


def _info(checkpoint: Path) -> dict:
    with TestClient(create_app(Settings(checkpoint=checkpoint))) as client:
        response = client.get("/info")
    assert response.status_code == 200, response.text
    return response.json()


def test_info_of_an_imported_model_names_its_source_and_licence(tmp_path: Path, bpe_dir: Path) -> None:  # noqa: F811 - the fixture imported above
    _, src = _hf_dir(tmp_path / "hf", bpe_dir, license_card=True)
    import_hf(src, tmp_path / "ckpt")
    origin = _info(tmp_path / "ckpt")["origin"]
    assert origin == {"source": {"format": "hf", "name_or_path": str(src), "license": "mit"}}, origin


def test_info_of_a_model_trained_here_has_no_origin(tiny_checkpoint: Path) -> None:
    assert _info(tiny_checkpoint)["origin"] == {}
