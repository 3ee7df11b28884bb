"""The text tower: a GPT-style causal transformer pooled at the end-of-text token."""

from __future__ import annotations

import torch
from torch import nn

from .config import CLIPConfig
from .layers import Block, rope_cache


def eot_positions(ids: torch.Tensor, eot_id: int, pad_id: int) -> torch.Tensor:
    """Index of the first end-of-text token per row; rows without one use their last non-pad token.

    Pooling at the real EOT position (not argmax of ids, which only works when EOT has the
    largest id) keeps the tokenizer free to number its special tokens as it likes.
    """
    is_eot = ids == eot_id
    first_eot = is_eot.int().argmax(dim=1)
    last_real = ((ids != pad_id).sum(dim=1) - 1).clamp(min=0)
    return torch.where(is_eot.any(dim=1), first_eot, last_real)


class TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.text_dim
        self.tok_embed = nn.Embedding(cfg.vocab_size, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.max_seq_len, d)) if cfg.text_pos == "learned" else None
        self.drop = nn.Dropout(cfg.text_dropout_rate)
        self.blocks = nn.ModuleList(
            Block(d, cfg.text_n_heads, n_kv_heads=cfg.text_n_kv_heads, mlp_ratio=cfg.text_mlp_ratio,
                  dropout=cfg.text_dropout_rate, eps=cfg.eps, causal=True, use_sdpa=cfg.use_sdpa,
                  mlp_act=cfg.mlp_act)
            for _ in range(cfg.text_n_layers)
        )
        self.norm = nn.LayerNorm(d, eps=cfg.eps)
        if cfg.text_pos == "rope":
            cos, sin = rope_cache(cfg.max_seq_len, d // cfg.text_n_heads, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def _embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        if ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.tok_embed(ids)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, : ids.shape[1]]
        else:
            rope = (self.rope_cos, self.rope_sin)
        return self.drop(x), rope

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, text_dim) final-norm hidden state at every position.

        Position t depends on tokens 0..t only (causal), which the tests check directly.
        """
        x, rope = self._embed(ids)
        for block in self.blocks:
            x = block(x, rope)
        return self.norm(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids, right-padded -> (B, text_dim) feature at each row's EOT token.

        Right padding plus the causal mask means no real token (EOT included) ever attends
        to a pad, so padding needs no extra mask and the result is independent of pad length.
        Equals hidden_states(ids)[b, eot_b] but cheaper: columns after the longest caption are
        dropped, and the last block computes only the EOT positions.
        """
        pos = eot_positions(ids, self.cfg.eot_token_id, self.cfg.pad_token_id)
        if not ids.is_meta:  # meta tensors (shape checks of big presets) carry no values to trim by
            ids = ids[:, : int(pos.max()) + 1]
        x, rope = self._embed(ids)
        for block in self.blocks[:-1]:
            x = block(x, rope)
        return self.norm(self.blocks[-1].forward_at(x, pos, rope))
