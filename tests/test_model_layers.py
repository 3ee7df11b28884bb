"""Attention primitives: RoPE, GQA against an explicit reference, SDPA against the math path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import CLIP, CLIPConfig
from model.layers import MLP, Attention, apply_rope, linear, math_attention, rope_cache


def _micro(**kw) -> CLIPConfig:
    base = {
        "img_size": 16, "patch_size": 4, "img_dim": 32, "img_n_heads": 4, "img_n_layers": 2, "vocab_size": 64,
        "max_seq_len": 12, "text_dim": 32, "text_n_heads": 4, "text_n_kv_heads": 2, "text_n_layers": 2,
        "align_dim": 16,
    }
    return CLIPConfig(**{**base, **kw})


# --------------------------------------------------------------------------- RoPE
def test_rope_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(0)
    head_dim, seq = 16, 24
    cos, sin = rope_cache(seq, head_dim)
    q = torch.randn(head_dim)
    k = torch.randn(head_dim)
    # The same q and k vectors placed at every position.
    rq = apply_rope(q.expand(1, 1, seq, head_dim).contiguous(), cos, sin)[0, 0]
    rk = apply_rope(k.expand(1, 1, seq, head_dim).contiguous(), cos, sin)[0, 0]
    scores = rq @ rk.T  # scores[m, n] = <R_m q, R_n k>
    for m, n, shift in [(3, 1, 5), (0, 7, 10), (10, 10, 13), (2, 20, 3)]:
        assert torch.allclose(scores[m, n], scores[m + shift, n + shift], atol=1e-4)
    # ...and it does depend on the distance (else positions would be invisible).
    assert not torch.allclose(scores[5, 0], scores[5, 4], atol=1e-3)


def test_rope_is_a_rotation_and_identity_at_position_zero() -> None:
    torch.manual_seed(1)
    cos, sin = rope_cache(10, 8)
    x = torch.randn(2, 3, 10, 8)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.equal(y[:, :, 0], x[:, :, 0])
    assert not torch.allclose(y[:, :, 1:], x[:, :, 1:])


# --------------------------------------------------------------------------- reference attention
def _reference_attention(attn: Attention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """torch's own nn.MultiheadAttention with our weights, K/V heads explicitly repeated for GQA."""
    dim = x.shape[-1]
    h, kvh, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    w, b = attn.qkv.weight.detach(), attn.qkv.bias.detach()
    wq, wk, wv = w.split([h * hd, kvh * hd, kvh * hd])
    bq, bk, bv = b.split([h * hd, kvh * hd, kvh * hd])
    rep = h // kvh

    def repeat(t: torch.Tensor) -> torch.Tensor:  # (kvh*hd, ...) -> (h*hd, ...), head i uses kv head i // rep
        return t.reshape(kvh, hd, *t.shape[1:]).repeat_interleave(rep, dim=0).reshape(h * hd, *t.shape[1:])

    mha = nn.MultiheadAttention(dim, h, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([wq, repeat(wk), repeat(wv)]))
        mha.in_proj_bias.copy_(torch.cat([bq, repeat(bk), repeat(bv)]))
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    t = x.shape[1]
    mask = torch.ones(t, t, dtype=torch.bool).triu(1) if causal else None
    return mha(x, x, x, attn_mask=mask, need_weights=False)[0]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_mha_equals_torch_multihead_attention(causal: bool, use_sdpa: bool) -> None:
    torch.manual_seed(2)
    attn = Attention(32, 4, 4, causal=causal, use_sdpa=use_sdpa).eval()
    for p in attn.parameters():
        nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        assert torch.allclose(attn(x), _reference_attention(attn, x, causal), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_gqa_equals_mha_with_repeated_kv_heads(kv_heads: int, use_sdpa: bool) -> None:
    torch.manual_seed(3)
    attn = Attention(32, 4, kv_heads, causal=True, use_sdpa=use_sdpa).eval()
    for p in attn.parameters():
        nn.init.normal_(p, std=0.2)
    assert attn.qkv.out_features == (4 + 2 * kv_heads) * 8  # GQA really shrinks K/V
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        assert torch.allclose(attn(x), _reference_attention(attn, x, True), atol=1e-5)


def test_gqa_with_kv_heads_equal_heads_is_plain_mha_module() -> None:
    torch.manual_seed(4)
    a = Attention(32, 4, None, causal=True)
    b = Attention(32, 4, 4, causal=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 32)
    assert torch.equal(a(x), b(x))


def test_math_attention_matches_hand_softmax() -> None:
    torch.manual_seed(5)
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    out = math_attention(q, k, v, causal=True)
    for t in range(4):
        s = torch.stack([q[0, 0, t] @ k[0, 0, j] / math.sqrt(8) for j in range(t + 1)])
        expected = (s.softmax(0)[:, None] * v[0, 0, : t + 1]).sum(0)
        assert torch.allclose(out[0, 0, t], expected, atol=1e-5)


# --------------------------------------------------------------------------- fused vs math, whole towers
@pytest.mark.parametrize("text_pos", ["rope", "learned"])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_sdpa_path_equals_math_path_in_both_towers(text_pos: str, kv_heads: int) -> None:
    torch.manual_seed(6)
    fused = CLIP(_micro(use_sdpa=True, text_pos=text_pos, text_n_kv_heads=kv_heads))
    plain = CLIP(_micro(use_sdpa=False, text_pos=text_pos, text_n_kv_heads=kv_heads))
    plain.load_state_dict(fused.state_dict())
    pixels = torch.randn(4, 3, 16, 16)
    ids = torch.tensor([[1, 5, 6, 7, 2, 0, 0], [1, 9, 2, 0, 0, 0, 0], [1, 3, 4, 5, 6, 7, 2], [1, 2, 0, 0, 0, 0, 0]])
    for m in (fused, plain):
        m.train()  # dropout is 0: training mode must take the same path as eval
    out_f = fused(pixels, ids)[0]
    out_p = plain(pixels, ids)[0]
    assert torch.allclose(out_f, out_p, atol=1e-4)
    assert torch.allclose(fused.encode_image(pixels), plain.encode_image(pixels), atol=1e-5)
    assert torch.allclose(fused.encode_text(ids), plain.encode_text(ids), atol=1e-5)
    out_f.sum().backward()
    out_p.sum().backward()
    for (name, pf), (_, pp) in zip(fused.named_parameters(), plain.named_parameters()):
        assert torch.allclose(pf.grad, pp.grad, atol=1e-4, rtol=1e-3), name


# --------------------------------------------------------------------------- the inference linear kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", [None, "gelu", "silu"])
def test_inference_linear_matches_f_linear(act: str | None, dtype: torch.dtype) -> None:
    torch.manual_seed(7)
    x = torch.randn(3, 9, 32).to(dtype)
    w, b = torch.randn(48, 32).to(dtype), torch.randn(48).to(dtype)
    expected = F.linear(x.float(), w.float(), b.float())  # the same (rounded) inputs, in float32
    expected = {None: expected, "gelu": F.gelu(expected), "silu": F.silu(expected)}[act]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad():  # the fused oneDNN path where torch has it
        got = linear(x, w, b, act)
        strided = linear(x[:, :1], w[:16], b[:16], act)  # row slices, as the CLS-only block uses
    assert got.dtype == dtype
    assert torch.allclose(got.float(), expected, atol=tol, rtol=tol)
    assert torch.allclose(strided.float(), expected[:, :1, :16], atol=tol, rtol=tol)
    assert torch.allclose(linear(x, w, b, act).float(), expected, atol=tol, rtol=tol)  # grad mode: F.linear


def test_model_outputs_agree_between_inference_and_grad_mode() -> None:
    torch.manual_seed(8)
    model = CLIP(_micro()).eval()
    pixels, ids = torch.randn(2, 3, 16, 16), torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    with_grad = model(pixels, ids)[0]
    with torch.inference_mode():
        inferred = model(pixels, ids)[0]
    assert torch.allclose(with_grad, inferred, atol=1e-4)


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_mlp_activation_is_the_configured_one(act: str) -> None:
    torch.manual_seed(9)
    mlp = MLP(16, 2.0, act=act)
    x = torch.randn(2, 5, 16)
    h = F.linear(x, mlp.fc.weight, mlp.fc.bias)
    h = F.gelu(h) if act == "gelu" else h * torch.sigmoid(1.702 * h)
    expected = F.linear(h, mlp.proj.weight, mlp.proj.bias)
    with torch.no_grad():
        assert torch.allclose(mlp(x), expected, atol=1e-5)
    other = MLP(16, 2.0, act="quick_gelu" if act == "gelu" else "gelu")
    other.load_state_dict(mlp.state_dict())
    with torch.no_grad():
        assert not torch.allclose(other(x), expected, atol=1e-3)  # the two activations really differ


def test_quick_gelu_reaches_both_towers() -> None:
    model = CLIP(_micro(mlp_act="quick_gelu"))
    acts = {m.act for m in model.modules() if isinstance(m, MLP)}
    assert acts == {"quick_gelu"} and len([m for m in model.modules() if isinstance(m, MLP)]) == 4
