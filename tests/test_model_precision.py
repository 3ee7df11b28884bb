"""bf16 inference (CLIPInference precision="bf16", serve --precision, index build --precision): the weights run
in bfloat16, the embeddings come back float32, unit-norm and within cosine 0.999 of fp32's, the temperature exact."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from test_app_support import shape_image

import clipforge_cli
from app.limits import ServingLimits
from app.main import create_app
from app.settings import Settings, SettingsError, load_settings
from index import ImageIndex
from model import (
    CLIPInference,
    load_checkpoint,
    save_checkpoint,
)

TEXTS = ["a red circle", "a big blue square next to a green triangle", "green", "a triangle on the left"]
IMAGES = [shape_image(shape, colour, size=40) for shape, colour in
          (("circle", "red"), ("square", "blue"), ("triangle", "green"), ("circle", "yellow"))]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with every parameter perturbed, so no norm or bias sits at its trivial init."""
    model, tokenizer, meta = load_checkpoint(tiny_checkpoint)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    path = tmp_path_factory.mktemp("precision") / "perturbed"
    save_checkpoint(path, model, tokenizer, {"step": 0, "class_names": meta.get("class_names")})
    return path


@pytest.fixture(scope="module")
def pair(checkpoint: Path) -> tuple[CLIPInference, CLIPInference]:
    return CLIPInference.load(checkpoint), CLIPInference.load(checkpoint, precision="bf16")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_bf16_runs_the_weights_in_bf16_and_keeps_the_temperature(pair: tuple[CLIPInference, CLIPInference]) -> None:
    fp32, bf16 = pair
    dtypes = {name: p.dtype for name, p in bf16.model.named_parameters()}
    assert dtypes.pop("logit_scale") == torch.float32
    assert set(dtypes.values()) == {torch.bfloat16}
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    assert bf16.logit_scale == fp32.logit_scale
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")


def test_bf16_embeddings_are_float32_unit_norm_and_close_to_fp32(pair: tuple[CLIPInference, CLIPInference]) -> None:
    fp32, bf16 = pair
    for embed, inputs in ((CLIPInference.embed_texts, TEXTS), (CLIPInference.embed_images, IMAGES)):
        a, b = embed(fp32, inputs), embed(bf16, inputs)
        assert b.dtype == np.float32 and b.shape == a.shape
        np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
        assert _cosines(a, b).min() > 0.999
        assert np.abs(a - b).max() > 1e-4  # the bf16 pass really ran: fp32 would match to ~1e-7
        # the ranking the service answers with is the same
        assert (np.argsort(-(a @ a.T), axis=1)[:, :2] == np.argsort(-(b @ a.T), axis=1)[:, :2]).all()


def test_unknown_precision_is_refused(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        CLIPInference.load(checkpoint, precision="fp16")


def test_service_serves_bf16_and_says_so(checkpoint: Path) -> None:
    apps = [create_app(Settings(checkpoint=checkpoint, precision=p, text_cache_size=0), ServingLimits())
            for p in ("fp32", "bf16")]
    with TestClient(apps[0]) as fp32, TestClient(apps[1]) as bf16:
        assert fp32.get("/info").json()["precision"] == "fp32"
        info = bf16.get("/info").json()
        assert info["precision"] == "bf16" and info["runtime"] == "torch"
        assert info["logit_scale"] == fp32.get("/info").json()["logit_scale"]
        a, b = (c.post("/embed/text", json={"texts": TEXTS}).json()["embeddings"] for c in (fp32, bf16))
        assert _cosines(a, b).min() > 0.999 and np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
        files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(IMAGES)]
        a, b = ([r["embedding"] for r in c.post("/embed/image", files=files).json()["results"]] for c in (fp32, bf16))
        assert _cosines(a, b).min() > 0.999


def test_settings_refuse_bf16_on_the_onnx_path_and_unknown_precisions(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="precision bf16 applies to the torch path"):
        load_settings(checkpoint=checkpoint, onnx=tmp_path, precision="bf16")
    with pytest.raises(SettingsError, match="precision"):
        load_settings(checkpoint=checkpoint, precision="fp16")


def test_index_build_embeds_in_the_precision_asked(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, data in enumerate(IMAGES):
        (photos / f"{i}.png").write_bytes(data)
    loaded: list[str] = []
    real_load = CLIPInference.load.__func__

    def spy(cls: type[CLIPInference], *args: object, **kwargs: object) -> CLIPInference:
        clip = real_load(cls, *args, **kwargs)
        loaded.append(clip.precision)
        return clip

    monkeypatch.setattr(CLIPInference, "load", classmethod(spy))
    code = clipforge_cli.main(["index", "build", "--checkpoint", str(checkpoint), "--images", str(photos),
                               "--out", str(tmp_path / "idx"), "--precision", "bf16", "--workers", "0", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert loaded == ["bf16"]
    fp32 = CLIPInference.load(checkpoint)
    with ImageIndex.open(tmp_path / "idx") as idx:
        assert len(idx) == len(IMAGES)
        hits = idx.search_by_vector(fp32.embed_images(IMAGES), k=1)
    assert [Path(h[0].path).name for h in hits] == [f"{i}.png" for i in range(len(IMAGES))]
    assert min(h[0].score for h in hits) > 0.999
    with pytest.raises(SystemExit):
        clipforge_cli.main(["index", "build", "--checkpoint", str(checkpoint), "--images", str(photos),
                            "--out", str(tmp_path / "idx2"), "--precision", "fp16"])


def test_precision_comes_from_the_environment_too(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPFORGE_PRECISION", "bf16")
    assert load_settings(checkpoint=checkpoint).precision == "bf16"
    assert load_settings(checkpoint=checkpoint, precision="fp32").precision == "fp32"  # a flag wins


def test_a_cpu_without_native_bf16_gets_a_warning(checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    import app.lifespan

    monkeypatch.setattr(app.lifespan, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING), TestClient(create_app(Settings(checkpoint=checkpoint, precision="bf16"),
                                                                 ServingLimits())) as client:
        assert client.get("/info").json()["precision"] == "bf16"
    assert any("no native bf16" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setattr(app.lifespan, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level(logging.WARNING), TestClient(create_app(Settings(checkpoint=checkpoint, precision="bf16"),
                                                                 ServingLimits())):
        pass
    assert not any("no native bf16" in r.getMessage() for r in caplog.records)


def test_index_add_embeds_in_the_precision_asked(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "0.png").write_bytes(IMAGES[0])
    assert clipforge_cli.main(["index", "build", "--checkpoint", str(checkpoint), "--images", str(photos),
                               "--out", str(tmp_path / "idx"), "--workers", "0", "--quiet"]) == 0
    (photos / "1.png").write_bytes(IMAGES[1])
    loaded: list[str] = []
    real_load = CLIPInference.load.__func__
    monkeypatch.setattr(CLIPInference, "load", classmethod(
        lambda cls, *a, **kw: loaded.append(kw.get("precision")) or real_load(cls, *a, **kw)))
    code = clipforge_cli.main(["index", "add", str(tmp_path / "idx"), str(photos), "--precision", "bf16",
                               "--workers", "0", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert loaded == ["bf16"]
    with ImageIndex.open(tmp_path / "idx") as idx:
        assert len(idx) == 2


def test_quick_gelu_folds_into_silu_exactly_and_bf16_uses_it(checkpoint: Path) -> None:
    """x sigmoid(1.702 x) = silu(1.702 x) / 1.702: folded weights give fp32's outputs to rounding, and bf16
    inference of a quick_gelu model (OpenAI's CLIP) runs the folded silu."""
    from dataclasses import replace

    from model import CLIP
    from model.layers import MLP

    model, tokenizer, meta = load_checkpoint(checkpoint)

    def quick_gelu_copy() -> CLIP:
        """The perturbed model's weights under OpenAI CLIP's activation."""
        copy = CLIP(replace(model.cfg, mlp_act="quick_gelu"))
        copy.load_state_dict(model.state_dict())
        return copy.eval()

    def acts(m: torch.nn.Module) -> set[str]:
        return {module.act for module in m.modules() if isinstance(module, MLP)}

    quick = quick_gelu_copy()
    ids = tokenizer.encode(TEXTS)
    pixels = torch.randn(2, 3, model.cfg.img_size, model.cfg.img_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        before = quick.encode_text(ids), quick.encode_image(pixels)
    mlps = [m for m in quick.modules() if isinstance(m, MLP)]
    fc_before = mlps[0].fc.weight.clone()
    for m in mlps:
        m.fold_quick_gelu()
    assert acts(quick) == {"silu"} and not torch.equal(mlps[0].fc.weight, fc_before)
    with torch.inference_mode():
        after = quick.encode_text(ids), quick.encode_image(pixels)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    folded = [p.clone() for p in mlps[0].parameters()]
    mlps[0].fold_quick_gelu()  # folding twice is a no-op, not a second scaling
    assert mlps[0].act == "silu"
    assert all(torch.equal(p, q) for p, q in zip(mlps[0].parameters(), folded))

    fp32 = CLIPInference(quick_gelu_copy(), tokenizer, meta)
    assert acts(fp32.model) == {"quick_gelu"}  # fp32 stays as trained
    bf16 = CLIPInference(quick_gelu_copy(), tokenizer, meta, precision="bf16")
    assert acts(bf16.model) == {"silu"}
    assert _cosines(bf16.embed_texts(TEXTS), fp32.embed_texts(TEXTS)).min() > 0.999
