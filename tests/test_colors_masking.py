"""Palettes, palette snapping (cmap_to_lbl) and patch masks, with hypothesis properties."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seggpt_lib.utils.colors import (
    cmap_to_lbl,
    denormalize,
    label_to_color,
    normalize,
    random_palette,
    snap_to_palette,
)
from seggpt_lib.utils.masking import patch_mask_to_pixels, query_half_mask, random_patch_mask, seam_mask


@given(n=st.integers(2, 6), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_palette_black_background_distinct_and_reproducible(n, seed):
    a = random_palette(n, torch.Generator().manual_seed(seed))
    b = random_palette(n, torch.Generator().manual_seed(seed))
    assert torch.equal(a, b)
    assert a.shape == (n, 3) and a.dtype == torch.uint8
    assert a[0].tolist() == [0, 0, 0]
    d = torch.cdist(a.float(), a.float()) + torch.eye(n) * 1e9
    assert d.min() >= 60.0


@given(
    n=st.integers(2, 5),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    noise=st.floats(0.0, 17.0),  # L2 norm < 30 = half the minimum palette distance
)
@settings(max_examples=60, deadline=None)
def test_cmap_to_lbl_recovers_labels_under_noise(n, h, w, seed, noise):
    g = torch.Generator().manual_seed(seed)
    pal = random_palette(n, g)
    lbl = torch.randint(0, n, (2, h, w), generator=g)
    img = label_to_color(lbl, pal).float()
    img = img + (torch.rand(img.shape, generator=g) * 2 - 1) * noise  # |noise| < half the min distance
    assert torch.equal(cmap_to_lbl(img, pal), lbl)
    assert torch.equal(cmap_to_lbl(img[0], pal), lbl[0])


def test_cmap_to_lbl_nearest_by_l2_and_per_sample_palettes():
    pal = torch.tensor([[[0, 0, 0], [255, 0, 0]], [[0, 0, 0], [0, 0, 255]]], dtype=torch.uint8)
    img = torch.zeros(2, 3, 1, 3)
    img[:, :, 0, 0] = torch.tensor([200.0, 0, 0])  # red-ish
    img[:, :, 0, 1] = torch.tensor([0.0, 0, 200])  # blue-ish
    img[:, :, 0, 2] = torch.tensor([100.0, 100, 100])  # grey: distance to black 173, to red/blue ~ 200
    out = cmap_to_lbl(img, pal)
    assert out[0, 0].tolist() == [1, 0, 0]
    assert out[1, 0].tolist() == [0, 1, 0]
    snapped = snap_to_palette(img, pal)
    assert snapped[0, :, 0, 0].tolist() == [255, 0, 0] and snapped[1, :, 0, 1].tolist() == [0, 0, 255]


def test_normalize_roundtrip():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    assert torch.allclose(denormalize(normalize(x)), x.float(), atol=1e-3)


@given(
    hp=st.integers(1, 10).map(lambda v: 2 * v),
    wp=st.integers(1, 10),
    ratio=st.floats(0.0, 1.0),
    b=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
@settings(max_examples=60, deadline=None)
def test_random_patch_mask_exact_count_and_reproducible(hp, wp, ratio, b, seed):
    m = random_patch_mask((hp, wp), ratio, b, torch.Generator().manual_seed(seed))
    assert m.shape == (b, hp * wp) and m.dtype == torch.bool
    assert (m.sum(1) == round(ratio * hp * wp)).all()
    assert torch.equal(m, random_patch_mask((hp, wp), ratio, b, torch.Generator().manual_seed(seed)))


def test_random_patch_mask_covers_whole_pair():
    m = random_patch_mask((8, 4), 0.75, 4000, torch.Generator().manual_seed(0)).float().mean(0)
    assert (m > 0.7).all() and (m < 0.8).all()  # every patch, prompt and query half, equally likely


@given(hp=st.integers(1, 10).map(lambda v: 2 * v), wp=st.integers(1, 10))
@settings(max_examples=30, deadline=None)
def test_query_half_mask(hp, wp):
    m = query_half_mask((hp, wp), 2).reshape(2, hp, wp)
    assert not m[:, : hp // 2].any() and m[:, hp // 2 :].all()


def test_seam_mask_only_in_query_half_around_seams():
    m = seam_mask((8, 6), rows=(2,), cols=(3,), width=1).reshape(8, 6)
    assert not m[:4].any()
    q = m[4:]
    assert q[1].all() and q[2].all()  # rows either side of the seam at 2
    assert q[:, 2].all() and q[:, 3].all()
    assert not q[0, 0] and not q[3, 5]
    px = patch_mask_to_pixels(m.flatten()[None], (8, 6), 4)
    assert px.shape == (1, 1, 32, 24) and px.sum() == m.sum() * 16
