"""Global attention with decomposed relative positions (ViTDet / SegGPT).

The score between query position ``(hq, wq)`` and key position ``(hk, wk)`` is
``scale * q·k + q·Rh[hq, hk] + q·Rw[wq, wk]``; ``Rh``/``Rw`` come from the learnt tables
``rel_pos_h`` (``2*Hp-1, head_dim``) and ``rel_pos_w`` (``2*Wp-1, head_dim``).

``rel_pos_attention`` is the single entry point the model calls; ``impl`` picks the kernel:

``"math"``
    The reference: explicit ``L x L`` scores, bias added, softmax, weighted sum.
``"sdpa_bias"``
    The bias ``rel_h + rel_w`` is materialised as an ``L x L`` additive ``attn_mask`` (in q's
    dtype) and handed to :func:`torch.nn.functional.scaled_dot_product_attention`.
``"sdpa_folded"``
    No ``L x L`` tensor at all: the bias is folded into the dot product. With
    ``q' = [scale*q, rel_h(q), rel_w(q)]`` and ``k' = [k, onehot(hk), onehot(wk)]``,
    ``q'·k' = scale*q·k + rel_h[q, hk] + rel_w[q, wk]`` exactly, so a mask-free SDPA call
    (flash / memory-efficient kernels on GPU, the flash kernel on CPU) computes the same
    attention. Head dims are zero-padded to a multiple of 8 (ViT-L: 64 + 56 + 28 = 148 -> 152,
    within flash attention's 256 limit); ``v`` is padded to match and the output sliced back.
``"matmul_folded"``
    The same folded ``q'``/``k'``, but scores from one explicit GEMM, softmax, ``@ v`` (no
    padded ``v``; one ``L x L`` tensor instead of the reference's two).
``"sdpa_folded_v"`` (opt-in, never chosen by ``"auto"``)
    ``"sdpa_folded"`` without padding ``v``: SDPA kernels that accept a value head dim other
    than the query's (the memory-efficient one; cuDNN in recent versions) skip the ``P·V`` work
    on 88 zero columns (ViT-L). Where no fused kernel accepts it, SDPA falls back to its math
    path (the CPU always does): correct, but slow.
``"flex"`` (opt-in, never chosen by ``"auto"``)
    FlexAttention with a ``score_mod`` that adds ``rel_h[q, key row] + rel_w[q, key column]``
    to each score inside a compiled kernel: no ``L x L`` tensor and no widened head dim. The
    kernel is compiled with :func:`torch.compile` on first use per shape (seconds on a GPU,
    about 10 s on a CPU; needs a C++ compiler on CPU). PyTorch has no FlexAttention backward on
    CPU: a CPU call that needs gradients runs ``"auto"``'s choice instead (with a warning).

Which one runs (first match wins):

1. :func:`set_attention_impl` (or the :func:`attention_impl` context manager) forcing a name;
2. the environment variable ``SEGGPT_ATTN`` (read at import and by ``set_attention_impl(None)``);
3. the ``impl`` argument (the model passes its config's ``attn_impl``);
4. ``"auto"``: :func:`auto_impl` picks per device and dtype what measured fastest.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

ATTENTION_IMPLS = ("math", "sdpa_bias", "sdpa_folded", "matmul_folded")
OPTIONAL_IMPLS = ("sdpa_folded_v", "flex")  # valid names that "auto" never picks (not measured faster yet)
_ENV_VAR = "SEGGPT_ATTN"


def _check_name(name: str) -> str:
    valid = ("auto",) + ATTENTION_IMPLS + OPTIONAL_IMPLS
    if name not in valid:
        raise ValueError(f"unknown attention impl {name!r}; choose from {valid}")
    return name


def _env_impl() -> str | None:
    value = os.environ.get(_ENV_VAR, "").strip()
    return _check_name(value) if value and value != "auto" else None


_FORCED: str | None = _env_impl()


def set_attention_impl(name: str | None) -> str | None:
    """Force every ``rel_pos_attention`` call to use ``name``; returns the previous setting.

    ``None`` returns to the environment's ``SEGGPT_ATTN`` (or no forcing); ``"auto"`` forces
    nothing either, so each call follows its own ``impl`` argument.
    """
    global _FORCED
    previous = _FORCED
    if name is None:
        _FORCED = _env_impl()
    else:
        _FORCED = None if _check_name(name) == "auto" else name
    return previous


def get_attention_impl() -> str | None:
    """The forced implementation, or ``None`` when each call follows its ``impl`` argument."""
    return _FORCED


@contextlib.contextmanager
def attention_impl(name: str | None) -> Iterator[None]:
    """Temporarily force an implementation: ``with attention_impl("math"): ...``."""
    global _FORCED
    previous = _FORCED
    set_attention_impl(name)
    try:
        yield
    finally:
        _FORCED = previous


def auto_impl(device: torch.device | str, dtype: torch.dtype, grad: bool = False) -> str:
    """The implementation ``"auto"`` resolves to on ``device`` for inputs of ``dtype``.

    ``grad``: whether the call will be differentiated (training). Measured choices (H200 with
    torch 2.11; 2-core AMD EPYC with torch 2.14; ``seggpt bench --attention`` repeats them):

    * CUDA, bf16/fp16: ``"sdpa_folded"``. No ``L x L`` tensor in forward or backward and no bias
      gradient to reduce; SDPA's default dispatch runs it in cuDNN's fused kernel (head dim 152
      on ViT-L). ViT-L shape, batch 16, bf16: forward 2.0 ms (reference 6.6, ``"sdpa_bias"``
      2.8), forward+backward 8.4 ms (14.0, 13.3), 1.2 GiB peak (4.9, 2.8).
    * CUDA, fp32: the reference ``"math"``. No fused kernel has tensor cores for fp32 inputs, so
      the folded path's extra FLOPs (64 -> 152 head dims) are paid in full: the whole ViT-L
      model ran at 0.92x (inference) and 0.80x (training) of transformers' eager fp32 with it.
      The reference matches transformers and uses TF32 tensor cores where they are allowed.
    * CPU, fp32: attention at these sizes is compute-bound, so the folded SDPA's extra head
      dims (vit_tiny grid: 64 -> 112) cost more than the bias tensor they save. Forward only:
      ``"sdpa_bias"`` (the fused CPU kernel with a mask; 10-25 % faster than the reference on
      the vit_tiny shape); with gradients: the reference ``"math"``, whose backward is ~10 %
      faster than SDPA's CPU backward with a mask gradient.
    * CPU, bf16/fp16: ``"matmul_folded"``: low-precision GEMMs are fast on CPU while SDPA's CPU
      kernel is not (about 2x faster than every other path, forward and backward).
    * anything else (mps, xpu, ...): the reference ``"math"``.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return "math" if dtype == torch.float32 else "sdpa_folded"
    if kind == "cpu":
        if dtype != torch.float32:
            return "matmul_folded"
        return "math" if grad else "sdpa_bias"
    return "math"


def resolve_impl(impl: str, device: torch.device | str, dtype: torch.dtype, grad: bool = False) -> str:
    """The implementation a call with ``impl`` runs, after forcing and ``"auto"``."""
    name = _FORCED or _check_name(impl)
    if name == "flex" and grad and torch.device(device).type == "cpu":
        _warn_once("FlexAttention has no backward on CPU in PyTorch: attention calls that need "
                   f"gradients run {auto_impl(device, dtype, grad)!r} instead")
        name = "auto"
    return auto_impl(device, dtype, grad) if name == "auto" else name


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


# ------------------------------------------------------------------------------------------
# relative positions
# ------------------------------------------------------------------------------------------
def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) coordinate pair: ``(q_size, k_size, C)``.

    A table whose length differs from ``2 * max(q_size, k_size) - 1`` is resized linearly.
    """
    max_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_dist:
        rel_pos = resize_rel_pos(rel_pos, max_dist)
    return rel_pos[_constant(_rel_index, q_size, k_size, rel_pos.device)]


def _rel_index(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    """``(q_size, k_size)`` row of ``rel_pos`` for each (query, key) coordinate pair."""
    q_coords = torch.arange(q_size, device=device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=device)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel.long()


@functools.lru_cache(maxsize=128)
def _constant_cached(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in training too
        return fn(*args)


def _constant(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``fn(*args)``, built once per argument tuple in eager mode (index tensors, one-hots):
    this saves a dozen tiny kernel launches per block on GPU. Traced afresh under torch.compile."""
    if torch.compiler.is_compiling():
        return fn(*args)
    return _constant_cached(fn, *args)


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


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"expected q, k, v of shape (B, heads, L, d), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if grid[0] * grid[1] != q.shape[2]:
        raise ValueError(f"grid {tuple(grid)} does not cover the {q.shape[2]} tokens")


# ------------------------------------------------------------------------------------------
# implementations
# ------------------------------------------------------------------------------------------
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


def attention_sdpa_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    grid: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """SDPA with the relative-position bias as an additive ``(B, n, L, L)`` mask in q's dtype."""
    b, n, length, _ = q.shape
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, grid)
    # contiguous terms give a contiguous broadcast sum, so the reshape below copies nothing
    bias = rel_h.contiguous()[..., :, None] + rel_w.contiguous()[..., None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(b, n, length, length), scale=scale)


def folded_head_dim(head_dim: int, grid: tuple[int, int]) -> int:
    """Head dim of the folded q'/k'/v': ``head_dim + Hp + Wp`` rounded up to a multiple of 8."""
    return -(-(head_dim + grid[0] + grid[1]) // 8) * 8


def _key_position_onehots(grid: tuple[int, int], pad: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(L, Hp + Wp + pad)``: each key's row one-hot then column one-hot, then zeros."""
    hp, wp = grid
    rows = torch.arange(hp, device=device).repeat_interleave(wp)
    cols = torch.arange(wp, device=device).repeat(hp)
    return torch.cat(
        [F.one_hot(rows, hp), F.one_hot(cols, wp), rows.new_zeros(hp * wp, pad)], dim=1
    ).to(dtype)


def fold_rel_pos(
    q: torch.Tensor,
    k: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    grid: tuple[int, int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q', k')`` with ``q' k'^T`` = the biased scores ``scale*q k^T + rel_h + rel_w``.

    Both are ``(B, n, L, folded_head_dim(d, grid))``: ``q' = [scale*q, rel_h(q), rel_w(q), 0]``,
    ``k' = [k, onehot(key row), onehot(key column), 0]``.
    """
    b, n, length, d = q.shape
    hp, wp = grid
    extra = folded_head_dim(d, grid) - d - hp - wp
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, grid)
    q_parts = [q * scale, rel_h.reshape(b, n, length, hp), rel_w.reshape(b, n, length, wp)]
    if extra:
        q_parts.append(q.new_zeros(b, n, length, extra))
    qf = torch.cat(q_parts, dim=-1)
    onehots = _constant(_key_position_onehots, tuple(grid), extra, k.device, k.dtype)
    kf = torch.cat([k, onehots.expand(b, n, length, onehots.shape[-1])], dim=-1)
    return qf, kf


def attention_sdpa_folded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    grid: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """Mask-free SDPA on the folded ``(q', k')`` and zero-padded ``v``; output sliced back to d."""
    qf, kf = fold_rel_pos(q, k, rel_pos_h, rel_pos_w, grid, scale)
    d = v.shape[-1]
    vf = F.pad(v, (0, qf.shape[-1] - d))
    return F.scaled_dot_product_attention(qf, kf, vf, scale=1.0)[..., :d]


def attention_sdpa_folded_v(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    grid: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """Mask-free SDPA on the folded ``(q', k')`` with ``v`` at its own head dim (no padding)."""
    qf, kf = fold_rel_pos(q, k, rel_pos_h, rel_pos_w, grid, scale)
    return F.scaled_dot_product_attention(qf, kf, v, scale=1.0)


def attention_matmul_folded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    grid: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """The folded scores as one explicit GEMM (``q' k'^T``), softmax, ``@ v``.

    It materialises the ``L x L`` scores once (the reference builds them, then a biased
    copy); the fastest path for bf16 on CPU, where GEMMs are cheap and SDPA's CPU kernel is not.
    """
    qf, kf = fold_rel_pos(q, k, rel_pos_h, rel_pos_w, grid, scale)
    return (qf @ kf.transpose(-2, -1)).softmax(dim=-1) @ v


_FLEX_COMPILED: Callable[..., torch.Tensor] | None = None


def _flex_kernel() -> Callable[..., torch.Tensor]:
    """``flex_attention``, compiled once (shapes are static: one graph per attention shape)."""
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # inside a compiled model: the model's graph takes it
        return flex_attention
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


@torch.compiler.disable
def _flex_outside_graph(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Callable[..., torch.Tensor],
                        scale: float) -> torch.Tensor:
    """The flex kernel as its own compiled graph, called from a compiled model on CPU: inductor's
    CPU flex template cannot read bias terms computed inside the same graph."""
    return _flex_kernel()(q, k, v, score_mod=score_mod, scale=scale)


def attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    grid: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """FlexAttention: the bias terms ``(B, n, L, Hp)`` / ``(B, n, L, Wp)`` are gathered per score
    inside the kernel (``score_mod``), at the model's head dim."""
    b, n, length, _ = q.shape
    hp, wp = grid
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, grid)
    rel_h = rel_h.reshape(b, n, length, hp)
    rel_w = rel_w.reshape(b, n, length, wp)

    def score_mod(score, bi, hi, qi, ki):  # noqa: ANN001, ANN202
        return score + rel_h[bi, hi, qi, ki // wp] + rel_w[bi, hi, qi, ki % wp]

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if torch.compiler.is_compiling() and q.device.type == "cpu":
        return _flex_outside_graph(q, k, v, score_mod, scale)
    return _flex_kernel()(q, k, v, score_mod=score_mod, scale=scale)


_IMPLS = {
    "math": attention_math,
    "sdpa_bias": attention_sdpa_bias,
    "sdpa_folded": attention_sdpa_folded,
    "sdpa_folded_v": attention_sdpa_folded_v,
    "matmul_folded": attention_matmul_folded,
    "flex": attention_flex,
}


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
    """Attention with decomposed relative positions over ``grid``: ``(B, n, L, d)``.

    ``q, k, v``: ``(B, n_heads, L = Hp * Wp, head_dim)``; ``impl`` in ``("auto",) +
    ATTENTION_IMPLS + OPTIONAL_IMPLS``, overridden by :func:`set_attention_impl` / ``SEGGPT_ATTN``.
    """
    _check_shapes(q, k, v, grid)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, rel_pos_h, rel_pos_w))
    name = resolve_impl(impl, q.device, q.dtype, grad)
    return _IMPLS[name](q, k, v, rel_pos_h, rel_pos_w, grid, scale)
