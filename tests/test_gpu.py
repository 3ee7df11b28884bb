"""The CUDA path against the CPU path: bf16 autocast against fp32, a checkpoint saved on the GPU and
read on the CPU, a run resumed on the GPU against an uninterrupted one, CLIPInference on cuda
against the CPU.

Marked gpu and skipped where torch sees no CUDA GPU; bench/gpu_check.sh runs them on one.
Tolerances follow the usual error of each arithmetic (norm of the difference over the norm of
the reference): fp32 against fp32 well under 1e-4, TF32 convolutions near 3e-4, bf16 operands
1e-3 to 1e-2 per layer (a 6-layer tiny model in bf16 autocast: about 5e-3 on the embeddings
and 3e-2 on the gradients, measured on the CPU's bf16 autocast).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
from test_train_support import SMALL, base_config, draw, weights, write_caption_data

from model import (
    CLIP,
    CLIPInference,
    clip_loss,
    content_hash,
    load_checkpoint,
    preset_config,
    save_checkpoint,
)
from model.config import CLIPConfig
from training.config import build_config
from training.loop import train
from training.run_state import load_trainer_state

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
# cuBLAS reads this when its first handle is made: deterministic matrix products for the resume test.
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
if torch.cuda.is_available():
    for _key, _value in DETERMINISTIC_ENV.items():
        os.environ.setdefault(_key, _value)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 references without TF32 (cuDNN's convolutions use it unless told not to)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def random_batch(cfg: CLIPConfig, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixels and right-padded captions of random length (start, tokens, end, padding)."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, cfg.channel, cfg.img_size, cfg.img_size, generator=gen)
    ids = torch.full((n, cfg.max_seq_len), cfg.pad_token_id, dtype=torch.long)
    for i, length in enumerate(torch.randint(6, cfg.max_seq_len + 1, (n,), generator=gen).tolist()):
        ids[i, 0], ids[i, length - 1] = cfg.sot_token_id, cfg.eot_token_id
        ids[i, 1 : length - 1] = torch.randint(3, cfg.vocab_size - 1, (length - 2,), generator=gen)
    return pixels, ids


def loss_and_grads(model: CLIP, pixels: torch.Tensor, ids: torch.Tensor, bf16: bool = False) -> dict[str, torch.Tensor]:
    """One contrastive forward/backward: the loss, both embeddings and every gradient, flattened in order."""
    model.zero_grad(set_to_none=True)
    autocast = torch.autocast(pixels.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        img, txt, scale = model.encode_image(pixels), model.encode_text(ids), model.scale()
    loss = clip_loss(img.float(), txt.float(), scale.float())
    loss.backward()
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                       for p in model.parameters()])
    return {"loss": loss.detach(), "img": img.detach().float(), "txt": txt.detach().float(), "grads": grads}


def test_bf16_autocast_agrees_with_fp32_forward_and_backward() -> None:
    torch.manual_seed(0)
    cfg = preset_config("tiny")  # 224 px / 16, GQA text tower: the real shapes
    model = CLIP(cfg).to(CUDA).eval()  # eval: no dropout, so both passes compute the same function
    pixels, ids = (t.to(CUDA) for t in random_batch(cfg, 32))
    with exact_fp32():
        ref = loss_and_grads(model, pixels, ids)
    half = loss_and_grads(model, pixels, ids, bf16=True)
    for key, value in half.items():
        assert torch.isfinite(value).all(), f"bf16 {key} has NaN or inf"
    assert rel_err(half["img"], ref["img"]) < 3e-2
    assert rel_err(half["txt"], ref["txt"]) < 3e-2
    assert rel_err(half["loss"], ref["loss"]) < 1e-2
    assert rel_err(half["grads"], ref["grads"]) < 1e-1


def test_gpu_fp32_agrees_with_cpu_fp32() -> None:
    torch.manual_seed(0)
    cfg = preset_config("tiny", img_size=64, patch_size=8)  # small enough for a quick CPU pass
    cpu_model = CLIP(cfg).eval()
    gpu_model = CLIP(cfg).to(CUDA).eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    pixels, ids = random_batch(cfg, 8)
    cpu = loss_and_grads(cpu_model, pixels, ids)
    with exact_fp32():
        gpu = loss_and_grads(gpu_model, pixels.to(CUDA), ids.to(CUDA))
    for key in cpu:
        assert rel_err(gpu[key], cpu[key]) < 1e-4, key


def test_checkpoint_saved_on_gpu_loads_on_cpu_with_identical_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model, tokenizer, _meta = load_checkpoint(tiny_checkpoint, device=CUDA)
    model.train()
    pixels, ids = (t.to(CUDA) for t in random_batch(model.cfg, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_and_grads(model, pixels, ids, bf16=True)
    opt.step()  # weights now computed on the GPU, not copied from the CPU
    model.eval()
    digest = save_checkpoint(tmp_path / "from_gpu", model, tokenizer, {"step": 1})

    cpu_model, _, cpu_meta = load_checkpoint(tmp_path / "from_gpu", device="cpu")
    assert cpu_meta["content_hash"] == digest
    gpu_state = model.state_dict()
    for key, value in cpu_model.state_dict().items():
        assert value.device.type == "cpu"
        assert torch.equal(value, gpu_state[key].cpu()), key
    # the same weights written again from the CPU are the same bytes
    assert save_checkpoint(tmp_path / "from_cpu", cpu_model, tokenizer, {"step": 1}) == digest
    assert content_hash(tmp_path / "from_cpu") == digest

    with torch.no_grad(), exact_fp32():
        gpu_img, gpu_txt = model.encode_image(pixels), model.encode_text(ids)
        cpu_img, cpu_txt = cpu_model.encode_image(pixels.cpu()), cpu_model.encode_text(ids.cpu())
        again, _, _ = load_checkpoint(tmp_path / "from_gpu", device=CUDA)
        assert torch.equal(again.encode_image(pixels), gpu_img)  # same device, same kernels: bit for bit
        assert torch.equal(again.encode_text(ids), gpu_txt)
    assert rel_err(cpu_img, gpu_img) < 1e-5
    assert rel_err(cpu_txt, gpu_txt) < 1e-5


CHILD = """
import json, sys, torch
torch.use_deterministic_algorithms(True, warn_only=True)
from training.config import build_config
from training.loop import train
train(build_config(json.loads(sys.argv[1])))
"""


def _last_step(run: Path) -> int:
    try:
        return int(json.loads((run / "last" / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.fixture()
def deterministic() -> Iterator[None]:
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def test_resume_on_gpu_after_sigkill_equals_uninterrupted(tmp_path: Path, deterministic: None) -> None:
    data = write_caption_data(tmp_path / "caps", n=96)  # 76 training images: 9 steps an epoch, 18 in all
    common = {"epochs": 2, "save_every": 1, "device": "cuda", "precision": "fp32",
              "model": {**SMALL, "img_dropout_rate": 0.1, "text_dropout_rate": 0.1}}  # dropout: CUDA RNG state matters
    train(build_config(base_config(data, tmp_path / "ref", **common)))
    train(build_config(base_config(data, tmp_path / "ref2", **common)))
    noise = _max_diff(tmp_path / "ref" / "last", tmp_path / "ref2" / "last")  # what the GPU varies between two runs
    assert noise < 1e-5, f"two identical GPU runs differ by {noise:.2e}: too much for the resume check to mean anything"
    total = load_trainer_state(tmp_path / "ref" / "last")[1]["step"]

    run = tmp_path / "killed"
    cfg = build_config(base_config(data, run, **common))
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg.model_dump())], cwd=ROOT,
                             env={**os.environ, **DETERMINISTIC_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while _last_step(run) < 2:
            assert child.poll() is None, f"child ended early: {child.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "child made no checkpoint in time"
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    killed_at = _last_step(run)
    assert 2 <= killed_at < total, "the kill must land mid-run"

    train(cfg, resume=True)
    assert _last_step(run) == total
    diff = _max_diff(tmp_path / "ref" / "last", run / "last")
    assert diff <= max(1e-6, 10 * noise), f"resumed run differs from the uninterrupted one by {diff:.2e}"
    ta, ia = load_trainer_state(tmp_path / "ref" / "last")
    tb, ib = load_trainer_state(run / "last")
    for key in ta:
        if key.startswith("optim."):
            assert torch.allclose(ta[key], tb[key], atol=max(1e-6, 10 * noise)), key
    assert (ia["epoch"], ia["batch_in_epoch"]) == (ib["epoch"], ib["batch_in_epoch"])


def test_inference_on_cuda_matches_cpu(tiny_checkpoint: Path) -> None:
    gpu = CLIPInference.load(tiny_checkpoint, device="cuda")
    cpu = CLIPInference.load(tiny_checkpoint, device="cpu")
    assert next(gpu.model.parameters()).device.type == "cuda"
    rng = random.Random(0)
    images = [draw(color, shape, rng) for color in ("red", "blue", "green") for shape in ("circle", "square")]
    texts = ["a red circle", "a big blue square", "the triangle is green"]
    # as served: torch's default precision settings, under which cuDNN convolutions (the patch
    # embedding) run in TF32 while matrix products stay fp32
    assert rel_err(torch.from_numpy(gpu.embed_images(images)), torch.from_numpy(cpu.embed_images(images))) < 5e-3
    assert rel_err(torch.from_numpy(gpu.embed_texts(texts)), torch.from_numpy(cpu.embed_texts(texts))) < 1e-4
    labels = ["circle", "square", "triangle"]
    for image in images[:2]:
        on_gpu = {p["label"]: p["probability"] for p in gpu.classify(image, labels)}
        on_cpu = {p["label"]: p["probability"] for p in cpu.classify(image, labels)}
        assert on_gpu.keys() == on_cpu.keys()
        assert all(abs(on_gpu[k] - on_cpu[k]) < 1e-2 for k in labels), (on_gpu, on_cpu)
