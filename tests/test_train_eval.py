"""Evaluation metrics on hand-made embeddings, template ensembling, and `clipforge eval`."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train_support import write_imagefolder

import clipforge_cli
from model import load_checkpoint, read_meta
from model.zeroshot import top_k_accuracy as zeroshot_metrics
from training.evaluate import class_embeddings, contrastive_val_loss, retrieval_metrics


def _unit(*rows: tuple[float, ...]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_recall_with_five_captions_per_image() -> None:
    images = _unit((1, 0, 0), (0, 1, 0), (0, 0, 1))
    captions = _unit(
        (1, 0, 0), (0, 0, 1), (0, 0, 1), (0, 0, 1), (0, 0, 1),  # image 0: one good caption, four pointing at image 2
        *[(0.6, 0.8, 0)] * 5,  # image 1: closest to its image
        *[(0.8, 0, 0.6)] * 5,  # image 2: closer to image 0 than to its own
    )
    owner = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)
    m = retrieval_metrics(images, captions, owner, ks=(1, 2, 5))
    # image queries: 0 is right at 1 (any caption counts), 1 is right at 1, 2 has four better captions (rank 4)
    assert m["i2t_r1"] == pytest.approx(2 / 3)
    assert m["i2t_r2"] == pytest.approx(2 / 3)
    assert m["i2t_r5"] == pytest.approx(1.0)
    # text queries: caption 0 and image 1's five are right at 1; image 2's five rank it second; image 0's
    # four (0, 0, 1) score image 2 higher and image 1 equal to their own (0 = 0): a tie counts against, third
    assert m["t2i_r1"] == pytest.approx(6 / 15)
    assert m["t2i_r2"] == pytest.approx(11 / 15)
    assert m["t2i_r5"] == pytest.approx(1.0)
    assert m["recall_mean"] == pytest.approx((2 / 3 + 2 / 3 + 1 + 6 / 15 + 11 / 15 + 1) / 6)


def test_collapsed_or_nan_embeddings_never_score_well() -> None:
    """A diverged run must not look perfect: ties count against, NaN gives NaN (then never "best")."""
    owner = torch.arange(20)
    same = F.normalize(torch.ones(20, 4), dim=1)
    m = retrieval_metrics(same, same.clone(), owner, ks=(1, 5))
    assert m["i2t_r1"] == 0.0 and m["t2i_r5"] == 0.0
    nan = torch.full((20, 4), float("nan"))
    m = retrieval_metrics(nan, nan, owner)
    assert all(math.isnan(v) for v in m.values())


def test_identical_caption_strings_count_as_right_for_each_other() -> None:
    """Two cat photos captioned "a photo of a cat": each caption is a right answer for both images."""
    images = _unit((1, 0, 0), (0.9, 0.1, 0), (0, 0, 1))
    captions = _unit((0.95, 0.05, 0), (0.95, 0.05, 0), (0, 0, 1))  # the same text twice, then a dog
    owner = torch.tensor([0, 1, 2])
    plain = retrieval_metrics(images, captions, owner, ks=(1,))
    assert plain["i2t_r1"] < 1.0 and plain["t2i_r1"] < 1.0  # identical embeddings tie: one of each pair loses
    grouped = retrieval_metrics(images, captions, owner, ks=(1,), text_group=torch.tensor([0, 0, 1]))
    assert grouped["i2t_r1"] == 1.0 and grouped["t2i_r1"] == 1.0


def test_recall_chunking_matches_single_pass() -> None:
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(37, 8, generator=g), dim=1)
    captions = F.normalize(torch.randn(37 * 5, 8, generator=g), dim=1)
    owner = torch.arange(37).repeat_interleave(5)
    assert retrieval_metrics(images, captions, owner, chunk=4) == retrieval_metrics(images, captions, owner, chunk=4096)


def test_zeroshot_topk() -> None:
    classes = _unit((1, 0, 0), (0, 1, 0), (0, 0, 1))
    images = _unit((0.9, 0.1, 0), (0.2, 0.1, 0.9), (0.5, 0.45, 0.1))
    labels = torch.tensor([0, 2, 1])  # last one: its class is second best
    m = zeroshot_metrics(images, labels, classes, ks=(1, 2, 5))
    assert m["top1"] == pytest.approx(2 / 3)
    assert m["top2"] == pytest.approx(1.0)
    assert m["top5"] == pytest.approx(1.0)  # k above the class count is capped


def test_val_loss_and_in_batch_accuracy() -> None:
    emb = torch.eye(4)
    out = contrastive_val_loss(emb, emb, torch.tensor(100.0), batch_size=4)
    assert out["val_i2t_acc"] == out["val_t2i_acc"] == 1.0
    assert out["val_loss"] == pytest.approx(0.0, abs=1e-6)
    swapped = contrastive_val_loss(emb, emb[[1, 0, 2, 3]], torch.tensor(100.0), batch_size=4)
    assert swapped["val_i2t_acc"] == pytest.approx(0.5) and swapped["val_loss"] > 10


def test_val_loss_counts_identical_captions_as_matches() -> None:
    """Images 0 and 1 share the caption "a photo of a cat": picking either is right, as in training."""
    images = torch.eye(4)
    texts = torch.eye(4)[[0, 0, 2, 3]]  # the same text embedding for both cat images
    plain = contrastive_val_loss(images, texts, torch.tensor(100.0), batch_size=4)
    grouped = contrastive_val_loss(images, texts, torch.tensor(100.0), batch_size=4, groups=torch.tensor([0, 0, 1, 2]))
    # text 1 is the cat text: image 0 is as right an answer for it as image 1
    assert plain["val_t2i_acc"] == pytest.approx(0.75) and grouped["val_t2i_acc"] == 1.0
    assert grouped["val_i2t_acc"] == 1.0 and math.isfinite(grouped["val_loss"])


def test_template_ensembling_is_normalised_mean(tiny_checkpoint: Path) -> None:
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    names, templates = ["circle", "square"], ["a photo of a {}.", "a {}", "{} drawn"]
    got = class_embeddings(model, tokenizer, names, templates, torch.device("cpu"))
    with torch.no_grad():
        manual = []
        for name in names:
            e = model.encode_text(tokenizer.encode([t.format(name) for t in templates]))  # already unit length
            manual.append(F.normalize(e.mean(dim=0), dim=0))
    assert torch.allclose(got, torch.stack(manual), atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(2), atol=1e-5)


def test_eval_command_writes_report_into_meta(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    data = write_imagefolder(tmp_path / "folder", per_class=2)
    code = clipforge_cli.main(["eval", "--checkpoint", str(ckpt), "--data", f"imagefolder:{data}",
                               "--num-workers", "0", "--json", str(tmp_path / "report.json")])
    assert code == 0
    meta = read_meta(ckpt)
    metrics = meta["metrics"]
    assert metrics["n_images"] == 16 and 0.0 <= metrics["zeroshot_top1"] <= metrics["zeroshot_top5"] <= 1.0
    assert meta["class_names"] == ["blue circle", "blue square", "green circle", "green square", "red circle",
                                   "red square", "yellow circle", "yellow square"]
    assert meta["templates"]
    assert (tmp_path / "report.json").is_file()
    load_checkpoint(ckpt)  # the content hash still verifies: only meta.json changed


def test_eval_on_caption_data_reports_recall(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from test_train_support import write_caption_data

    from training.eval_report import evaluate_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    path = write_caption_data(tmp_path / "caps", n=12, n_corrupt=2)
    report = evaluate_checkpoint(ckpt, f"csv:{path}", num_workers=0, write_meta=False)
    assert report["n_images"] == 10 and report["n_bad"] == 2 and report["n_captions"] == 20
    assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "val_loss"} <= set(report)
    assert report["t2i_r10"] == 1.0  # 10 images: every text query is right at 10
    assert "metrics" not in read_meta(ckpt)


def test_demo_prints_probability_per_text(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    import random

    from test_train_support import draw

    img = tmp_path / "x.png"
    draw("red", "circle", random.Random(0)).save(img)
    code = clipforge_cli.main(["eval", "--checkpoint", str(tiny_checkpoint), "--image", str(img),
                               "--texts", "a red circle", "a blue square", "a dog"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("a red circle")
    probs = [float(line.split("p=")[1].split()[0]) for line in lines]
    assert sum(probs) == pytest.approx(1.0, abs=1e-3)


def test_demo_missing_image_is_one_line_error(tiny_checkpoint: Path, capsys) -> None:
    code = clipforge_cli.main(["eval", "--checkpoint", str(tiny_checkpoint), "--image", "/no/such.png", "--texts", "a"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
