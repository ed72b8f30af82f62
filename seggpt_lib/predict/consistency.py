"""Prompt consistency: does the painted query region look like the prompt's defect?

Measured from the encoder features the model computes anyway (the last of ``out_indices``,
``(N, Hp, Wp, D)`` for the stacked pair: prompt rows on top, query rows below). Per pair::

    d = mean feature under the prompt's defect mask      (prompt half)
    b = mean feature under the prompt's background        (prompt half)
    q = mean feature under the predicted defect region    (query half)
    consistency = cos(d, q) - cos(b, q)

Positive: the predicted region is closer to the prompt's defect than to its background. NaN
where the prompt has no defect or background patch, or nothing is predicted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_mean", "patch_fraction", "prompt_consistency"]


def patch_fraction(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """``(N, H, W)`` 0/1 (or soft) mask -> ``(N, H/patch, W/patch)`` mean per patch."""
    return F.avg_pool2d(mask.float()[:, None], patch)[:, 0]


def masked_mean(feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean feature ``(N, D)`` of ``feats`` ``(N, h, w, D)`` under ``weights`` ``(N, h, w)``;
    NaN rows where the weights sum to zero."""
    w = weights.to(feats.dtype)
    s = torch.einsum("nhwd,nhw->nd", feats, w)
    tot = w.sum(dim=(1, 2))[:, None]
    return torch.where(tot > 0, s / tot.clamp_min(1e-12), torch.full_like(s, float("nan")))


def prompt_consistency(feats: torch.Tensor, prompt_w: torch.Tensor, query_w: torch.Tensor) -> torch.Tensor:
    """``cos(defect, query) - cos(background, query)`` per pair, ``(N,)`` float32.

    ``feats`` ``(N, Hp, Wp, D)`` (prompt rows ``0..Hp/2-1``, query rows below); ``prompt_w`` and
    ``query_w`` ``(N, Hp/2, Wp)``: the prompt's defect fraction per patch and the predicted
    defect fraction per query patch.
    """
    feats = feats.float()
    h = feats.shape[1] // 2
    top, bottom = feats[:, :h], feats[:, h:]
    d = masked_mean(top, prompt_w)
    b = masked_mean(top, 1.0 - prompt_w.float())
    q = masked_mean(bottom, query_w)
    return F.cosine_similarity(d, q, dim=-1) - F.cosine_similarity(b, q, dim=-1)
