"""Transformer primitives shared by both towers: rotary embeddings, attention, MLP, block.

Read top-down: position helpers, then attention, then the MLP, then the pre-norm block.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MLP_ACTIVATIONS

# --------------------------------------------------------------------------- linear layers
# oneDNN's fused post-op for each activation `linear` takes: (attr, scalars, algorithm)
ONEDNN_ACTS: dict[str | None, tuple[str, list, str]] = {
    None: ("none", [], ""), "gelu": ("gelu", [], "none"), "silu": ("swish", [], ""),
}
ACTS = {None: lambda y: y, "gelu": F.gelu, "silu": F.silu}


@functools.cache
def _onednn_linear_works(dtype: torch.dtype) -> bool:
    """Whether torch's oneDNN linear kernel (the one torch.compile uses on CPU) exists for `dtype` and agrees
    with F.linear, each fused activation included."""
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((2, 3, 8), (5, 8), (5,)))
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        for act, (attr, scalars, algorithm) in ONEDNN_ACTS.items():
            y = torch.ops.mkldnn._linear_pointwise(x, w, b, attr, scalars, algorithm)
            expected = ACTS[act](F.linear(x.float(), w.float(), b.float()))
            if y.dtype != dtype or not torch.allclose(y.float(), expected, atol=tol, rtol=tol):
                return False
        return True
    except Exception:  # noqa: BLE001 - an older/newer torch (or a CPU) without it simply takes F.linear
        return False


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None = None) -> torch.Tensor:
    """F.linear, then `act` (None, "gelu": exact GELU, or "silu"), on oneDNN with the activation fused when
    inferring in fp32 or bf16 on CPU.

    The fused kernel is faster on CPU (docs/benchmarks.md) but has no autograd, so training
    keeps F.linear; under torch.compile, inductor chooses its own kernels.
    """
    if (
        not torch.compiler.is_compiling()  # inductor picks (and fuses) its own kernels
        and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype and not torch.is_autocast_enabled("cpu") and _onednn_linear_works(x.dtype)
    ):
        attr, scalars, algorithm = ONEDNN_ACTS[act]
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, scalars, algorithm)
    return ACTS[act](F.linear(x, weight, bias))


# --------------------------------------------------------------------------- rotary embeddings
def rope_cache(seq_len: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim // 2) for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (B, H, T, D) by position-dependent angles.

    The rotation makes q.k depend only on the distance between positions.
    """
    t = x.shape[-2]
    return rotate(x, cos[:t], sin[:t])


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary rotation itself, with cos/sin already broadcastable to x[..., :d/2]."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# --------------------------------------------------------------------------- attention
def math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain softmax(QK^T/sqrt(d))V, the reference for the fused kernels (use_sdpa=False).

    mask: optional boolean (..., Tq, Tk), True where a query may attend.
    """
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal:
        t = q.shape[-2]
        causal_mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal_mask, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


class Attention(nn.Module):
    """Multi-head self-attention with optional grouped-query heads and rotary positions.

    n_kv_heads < n_heads shares each key/value head across n_heads / n_kv_heads query
    heads (GQA), shrinking the K/V projections; n_kv_heads == n_heads is plain MHA.
    """

    def __init__(
        self, dim: int, n_heads: int, n_kv_heads: int | None = None, *, dropout: float = 0.0,
        causal: bool = False, use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = dim // n_heads
        self.causal = causal
        self.use_sdpa = use_sdpa
        self.dropout = dropout
        self.qkv = nn.Linear(dim, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, n_queries: int | None = None,
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with n_queries, only the first n_queries positions are computed.

        Keys and values still come from all T tokens, so those outputs equal the full
        computation's; the ViT uses it in its last block, where only the CLS token is read.
        """
        if n_queries is not None and (rope is not None or self.causal):
            raise ValueError("n_queries is for non-causal attention without rotary positions (the image tower)")
        b, t, c = x.shape
        hd = self.head_dim
        q_rows = self.n_heads * hd
        if n_queries is None:
            qkv = linear(x, self.qkv.weight, self.qkv.bias)
            q, k, v = qkv.split([q_rows, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
            tq = t
        else:
            w, bias = self.qkv.weight, self.qkv.bias
            q = linear(x[:, :n_queries], w[:q_rows], bias[:q_rows])
            k, v = linear(x, w[q_rows:], bias[q_rows:]).chunk(2, dim=-1)
            tq = n_queries
        q = q.view(b, tq, self.n_heads, hd).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        causal = self.causal
        p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            gqa = self.n_kv_heads != self.n_heads
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal, enable_gqa=gqa)
        else:
            y = math_attention(q, k, v, causal, p)
        y = y.transpose(1, 2).reshape(b, tq, c)
        return self.proj_drop(linear(y, self.proj.weight, self.proj.bias))

    def attend_at(
        self, x: torch.Tensor, pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Causal attention output at one position per row: (B, T, C), (B,) -> (B, 1, C).

        Equals forward(x, rope)[arange(B), pos] without computing the other queries; the
        text tower uses it in its last block, where only the end-of-text position is read.
        """
        b, t, c = x.shape
        hd = self.head_dim
        q_rows = self.n_heads * hd
        rows = torch.arange(b, device=x.device)
        w, bias = self.qkv.weight, self.qkv.bias
        q = linear(x[rows, pos].unsqueeze(1), w[:q_rows], bias[:q_rows])
        k, v = linear(x, w[q_rows:], bias[q_rows:]).chunk(2, dim=-1)
        q = q.view(b, 1, self.n_heads, hd).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q = rotate(q, cos[pos].view(b, 1, 1, -1), sin[pos].view(b, 1, 1, -1))
            k = apply_rope(k, cos, sin)
        # The query at pos sees keys 0..pos (the causal mask, for one row each).
        mask = (torch.arange(t, device=x.device) <= pos.unsqueeze(1)).view(b, 1, 1, t)
        p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            gqa = self.n_kv_heads != self.n_heads
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)
        else:
            y = math_attention(q, k, v, False, p, mask)
        y = y.transpose(1, 2).reshape(b, 1, c)
        return self.proj_drop(linear(y, self.proj.weight, self.proj.bias))


# --------------------------------------------------------------------------- MLP and block
QUICK_GELU_ALPHA = 1.702


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""
    return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float, dropout: float = 0.0, *, act: str = "gelu") -> None:
        super().__init__()
        if act not in MLP_ACTIVATIONS:
            raise ValueError(f"act must be one of {', '.join(MLP_ACTIVATIONS)}, got {act!r}")
        hidden = int(dim * ratio)
        self.act = act
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "gelu":  # exact (erf) GELU, fused into the linear where the kernel allows
            h = linear(x, self.fc.weight, self.fc.bias, "gelu")
        elif self.act == "silu":  # quick_gelu with its 1.702 folded into the weights (fold_quick_gelu)
            h = linear(x, self.fc.weight, self.fc.bias, "silu")
        else:
            h = quick_gelu(linear(x, self.fc.weight, self.fc.bias))
        return self.drop(linear(h, self.proj.weight, self.proj.bias))

    @torch.no_grad()
    def fold_quick_gelu(self) -> None:
        """For inference only: x sigmoid(a x) = silu(a x) / a, so a goes into fc and 1/a into proj, and the
        activation becomes one silu kernel instead of three (a multiply, a sigmoid, a multiply). The weights
        change, so a folded model is not one to train or save."""
        if self.act != "quick_gelu":
            return
        self.fc.weight.mul_(QUICK_GELU_ALPHA)
        self.fc.bias.mul_(QUICK_GELU_ALPHA)
        self.proj.weight.div_(QUICK_GELU_ALPHA)
        self.act = "silu"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, dim: int, n_heads: int, *, n_kv_heads: int | None = None, mlp_ratio: float = 4.0,
        dropout: float = 0.0, eps: float = 1e-6, causal: bool = False, use_sdpa: bool = True,
        mlp_act: str = "gelu",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, n_heads, n_kv_heads, dropout=dropout, causal=causal, use_sdpa=use_sdpa)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_ratio, dropout, act=mlp_act)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, n_queries: int | None = None,
    ) -> torch.Tensor:
        """n_queries: return only the first n_queries positions (all tokens still serve as keys)."""
        h = self.norm1(x)
        if n_queries is not None:
            x = x[:, :n_queries]
        x = x + self.attn(h, rope, n_queries)
        return x + self.mlp(self.norm2(x))

    def forward_at(
        self, x: torch.Tensor, pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, T, C) -> (B, C): the causal block's output at position pos[b] of each row only."""
        x_at = x[torch.arange(x.shape[0], device=x.device), pos].unsqueeze(1)
        x_at = x_at + self.attn.attend_at(self.norm1(x), pos, rope)
        return (x_at + self.mlp(self.norm2(x_at)))[:, 0]
