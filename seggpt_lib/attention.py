"""Global attention with decomposed relative positions (ViTDet / SegGPT).

The score between query position ``(hq, wq)`` and key position ``(hk, wk)`` is
``scale * q·k + q·Rh[hq, hk] + q·Rw[wq, wk]``; ``Rh``/``Rw`` come from the learnt tables
``rel_pos_h`` (``2*Hp-1, head_dim``) and ``rel_pos_w`` (``2*Wp-1, head_dim``).

``rel_pos_attention`` is the single entry point the model calls; ``impl`` picks the kernel.
``"math"`` is the reference: it materialises the full ``L x L`` score matrix in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_IMPLS = ("math",)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) coordinate pair: ``(q_size, k_size, C)``.

    A table whose length differs from ``2 * max(q_size, k_size) - 1`` is resized linearly.
    """
    max_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_dist:
        rel_pos = resize_rel_pos(rel_pos, max_dist)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[rel.long()]


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resize a ``(n, C)`` relative-position table to ``(length, C)``."""
    resized = F.interpolate(rel_pos.float().t().unsqueeze(0), size=length, mode="linear")
    return resized[0].t().to(rel_pos.dtype)


def rel_pos_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two bias terms per query: ``rel_h (B, n, Hp, Wp, Hp)`` and ``rel_w (B, n, Hp, Wp, Wp)``.

    ``q``: ``(B, n_heads, L, head_dim)``, unscaled.
    """
    hp, wp = grid
    rh = get_rel_pos(hp, hp, rel_pos_h).to(q.dtype)
    rw = get_rel_pos(wp, wp, rel_pos_w).to(q.dtype)
    r_q = q.reshape(*q.shape[:2], hp, wp, q.shape[-1])
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)
    return rel_h, rel_w


def attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    grid: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """Reference attention: explicit scores, bias added, softmax, weighted sum. ``(B, n, L, d)``."""
    hp, wp = grid
    b, n, length, _ = q.shape
    attn = (q * scale) @ k.transpose(-2, -1)
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, grid)
    attn = attn.view(b, n, hp, wp, hp, wp) + rel_h[..., :, None] + rel_w[..., None, :]
    attn = attn.view(b, n, length, length).softmax(dim=-1)
    return attn @ v


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    grid: tuple[int, int],
    scale: float,
    impl: str = "auto",
) -> torch.Tensor:
    """Attention with decomposed relative positions; ``impl`` in ``("auto",) + ATTENTION_IMPLS``."""
    if impl not in ("auto",) + ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose from {('auto',) + ATTENTION_IMPLS}")
    return attention_math(q, k, v, rel_pos_h, rel_pos_w, grid, scale)
