"""Prompted inference: sizes, batching equivalences, the per-group ensemble, snapping, validation."""
from pathlib import Path

import numpy as np
import pytest
import torch

from seggpt_lib import build_seggpt
from seggpt_lib.predict.predictor import (
    PromptMaskError,
    PromptPairs,
    SegGPTPredictor,
    _Group,
    check_prompt_mask,
    forward_grouped,
)
from seggpt_lib.predict.tiling import plan_windows
from seggpt_lib.utils.masking import query_half_mask


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_seggpt("vit_nano").eval()
    # random (non-zero) relative-position tables and tokens so that every path matters
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.1)
    return m


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    prompts = [rng.integers(0, 256, (80, 120, 3), dtype=np.uint8), rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)]
    masks = [np.zeros((80, 120), np.uint8), np.zeros((70, 50), bool)]
    masks[0][20:50, 30:90] = 255
    masks[1][10:30, 5:25] = True
    return q, prompts, masks


def _query_half(pred_patches, model):
    img = model.unpatchify(pred_patches)
    return img[:, :, img.shape[2] // 2 :]


# ------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("grid,pairing,seam", [(1, "all", False), (2, "all", False), (2, "aligned", True), (4, "aligned", False)])
def test_mask_at_original_size(model, images, grid, pairing, seam):
    q, prompts, masks = images
    pred = SegGPTPredictor(model, max_batch=64).predict(
        q, prompts, masks, grid=grid, tile_pairing=pairing, seam_pass=seam, work_size=96
    )
    assert pred.mask.shape == (97, 131) and pred.mask.dtype == bool
    assert pred.color.shape == (97, 131, 3) and pred.color.dtype == np.uint8
    assert pred.raw.shape == (97, 131, 3) and pred.raw.dtype == np.float32
    assert 0.0 <= pred.raw.min() and pred.raw.max() <= 255.0
    # colour output is exactly the palette: black where no defect, the defect colour elsewhere
    assert np.array_equal(pred.color.any(axis=2), pred.mask)
    per_window = len(prompts) * (grid * grid if pairing == "all" else 1)
    assert pred.n_pairs == len(plan_windows(grid, (96, 96), seam)) * per_window
    assert {"prepare_s", "model_s", "post_s", "total_s"} <= set(pred.timing)


def test_top_k_and_label(model, images):
    q, prompts, masks = images
    p = SegGPTPredictor(model)
    a = p.predict(q, prompts, masks, top_k=1)
    b = p.predict(q, prompts[:1], masks[:1])
    np.testing.assert_allclose(a.raw, b.raw, atol=1e-4)
    assert a.n_pairs == 1
    assert set(np.unique(a.label)) <= {0, 255}


def test_plan_windows_cover_and_paste_inside():
    for grid in (2, 3, 4):
        hw = (grid * 20, grid * 20)
        wins = plan_windows(grid, hw, seam_pass=True)
        assert len(wins) == grid * grid + 2 * grid * (grid - 1) + (grid - 1) ** 2
        cover = np.zeros(hw, bool)
        for w in wins:
            t, l, h, wd = w.box
            pt, pl, ph, pw = w.paste
            assert 0 <= t and 0 <= l and t + h <= hw[0] and l + wd <= hw[1]
            assert t <= pt and l <= pl and pt + ph <= t + h and pl + pw <= l + wd
            if w.tile >= 0:
                cover[t : t + h, l : l + wd] = True
        assert cover.all()
    assert len(plan_windows(1, (64, 64), seam_pass=True)) == 1


# ------------------------------------------------------------------------------ batching
def test_batched_equals_one_pair_at_a_time_no_ensemble(model, images):
    q, prompts, masks = images
    kw = dict(grid=2, ensemble=False, work_size=64)
    one = SegGPTPredictor(model, max_batch=1).predict(q, prompts, masks, **kw)
    many = SegGPTPredictor(model, max_batch=7).predict(q, prompts, masks, **kw)  # groups split across passes
    np.testing.assert_allclose(many.raw, one.raw, atol=1e-3)


def test_forward_groups_matches_manual_loop(model, images):
    """Packed passes (several groups each) == a loop calling the model once per pair / per group."""
    q, prompts, masks = images
    pred = SegGPTPredictor(model, max_batch=5)
    pp = pred.prompt_pairs(prompts, masks, grid=2, work_size=64)  # 8 prompt tiles
    tiles = pred.prompt_pairs([q], [np.zeros(q.shape[:2], np.uint8)], grid=2, work_size=64).images  # 4 query tiles
    groups = [_Group(i, PromptPairs(pp.images[i : i + 2 + i % 2], pp.targets[i : i + 2 + i % 2]), 0, i) for i in range(4)]
    hp_mask = query_half_mask(model.cfg.grid, 1)
    with torch.inference_mode():
        for ensemble in (False, True):
            got = pred._forward_groups(tiles, groups, ensemble)
            for g, out in zip(groups, got):
                n = len(g.prompts)
                imgs = torch.cat([g.prompts.images, tiles[g.query : g.query + 1].expand(n, -1, -1, -1)], dim=2)
                tgts = torch.cat([g.prompts.targets, g.prompts.targets], dim=2)
                if ensemble:
                    _, y, _ = model(imgs, tgts, hp_mask.expand(n, -1), merge_between_batch=0)
                    ref = _query_half(y, model).mean(0)
                else:
                    ref = torch.stack([
                        _query_half(model(imgs[j : j + 1], tgts[j : j + 1], hp_mask)[1], model)[0] for j in range(n)
                    ]).mean(0)
                torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # ensemble: groups are never split, so 2+3 | 2+3 pairs -> 2 passes; no ensemble: 10 pairs -> 2 passes
    assert pred.stats["forward_passes"] == 4


def test_grouped_ensemble_one_group_equals_model(model):
    torch.manual_seed(1)
    n = 3
    h, w = model.cfg.img_size
    imgs, tgts = torch.randn(n, 3, h, w), torch.randn(n, 3, h, w)
    mask = query_half_mask(model.cfg.grid, n)
    with torch.inference_mode():
        ref = model.unpatchify(model(imgs, tgts, mask, merge_between_batch=0)[1])
        got = forward_grouped(model, imgs, tgts, mask, torch.zeros(n, dtype=torch.long))
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        # no groups = no ensemble
        plain = model.unpatchify(model(imgs, tgts, mask)[1])
        torch.testing.assert_close(forward_grouped(model, imgs, tgts, mask, None), plain, atol=1e-5, rtol=1e-5)
        # the ensemble matters (otherwise the tests above prove nothing)
        assert not torch.allclose(ref[:, :, h // 2 :], plain[:, :, h // 2 :], atol=1e-3)


def test_grouped_ensemble_groups_are_independent(model):
    torch.manual_seed(2)
    h, w = model.cfg.img_size
    imgs, tgts = torch.randn(5, 3, h, w), torch.randn(5, 3, h, w)
    gid = torch.tensor([1, 0, 1, 0, 1])  # interleaved groups of 3 and 2
    mask = query_half_mask(model.cfg.grid, 5)
    with torch.inference_mode():
        got = forward_grouped(model, imgs, tgts, mask, gid)
        for g in (0, 1):
            sel = (gid == g).nonzero().flatten()
            ref = model.unpatchify(model(imgs[sel], tgts[sel], mask[sel], merge_between_batch=0)[1])
            torch.testing.assert_close(got[sel], ref, atol=1e-5, rtol=1e-5)
        # decoding only the query half (what the predictor runs) gives the same query pixels
        query_only = forward_grouped(model, imgs, tgts, mask, gid, query_only=True)
        torch.testing.assert_close(query_only, got[:, :, h // 2 :], atol=1e-6, rtol=1e-6)


def test_predict_batch_equals_single_predictions(model, images):
    q, prompts, masks = images
    q2 = np.ascontiguousarray(q[::-1, :100])
    pred = SegGPTPredictor(model, max_batch=6)
    kw = dict(grid=2, work_size=64)
    batch = pred.predict_batch([q, q2], [prompts, prompts[1:]], [masks, masks[1:]], **kw)
    for query, ps, ms, b in ((q, prompts, masks, batch[0]), (q2, prompts[1:], masks[1:], batch[1])):
        single = SegGPTPredictor(model, max_batch=1).predict(query, ps, ms, **kw)
        assert b.mask.shape == query.shape[:2]
        np.testing.assert_allclose(b.raw, single.raw, atol=1e-3)


def test_learned_prompt_pairs_path(model, images):
    q, prompts, masks = images
    pred = SegGPTPredictor(model)
    pairs = pred.prompt_pairs(prompts, masks)
    a = pred.predict(q, prompts, masks)
    b = pred.predict(q, prompt_pairs=pairs)
    np.testing.assert_allclose(a.raw, b.raw, atol=1e-4)
    with pytest.raises(ValueError):
        PromptPairs(pairs.images, pairs.targets[:, :, :10])


def test_bf16_autocast_runs(model, images):
    q, prompts, masks = images
    pred = SegGPTPredictor(model, precision="bf16").predict(q, prompts, masks)
    assert pred.mask.shape == q.shape[:2]
    with pytest.raises(ValueError):
        SegGPTPredictor(model, precision="int8")


def test_inputs_as_paths_and_pil(model, images, tmp_path):
    from PIL import Image

    q, prompts, masks = images
    Image.fromarray(q).save(tmp_path / "q.png")
    Image.fromarray(prompts[0]).save(tmp_path / "p.png")
    Image.fromarray(masks[0]).save(tmp_path / "m.png")
    pred = SegGPTPredictor(model)
    a = pred.predict(tmp_path / "q.png", [Image.open(tmp_path / "p.png")], [str(tmp_path / "m.png")])
    b = pred.predict(q, prompts[:1], masks[:1])
    np.testing.assert_allclose(a.raw, b.raw, atol=1e-4)


# ------------------------------------------------------------------------------ snapping
def test_palette_snapping(model):
    pred = SegGPTPredictor(model)
    raw = np.zeros((2, 3, 3), np.float32)
    raw[0, 0] = (240, 250, 235)  # near white -> defect
    raw[0, 1] = (140, 150, 130)  # just past the middle -> defect
    raw[0, 2] = (100, 110, 120)  # nearer black -> background
    raw[1, :] = (20, 5, 30)
    mask, color = pred.snap(raw)
    assert mask.tolist() == [[True, True, False], [False, False, False]]
    assert color[0, 0].tolist() == [255, 255, 255] and color[0, 2].tolist() == [0, 0, 0]
    red = SegGPTPredictor(model, defect_color=(255, 0, 0))
    m2, _ = red.snap(np.array([[[200, 30, 20], [40, 200, 200]]], np.float32))
    assert m2.tolist() == [[True, False]]
    with pytest.raises(ValueError):
        SegGPTPredictor(model, defect_color=(0, 0, 0))


# ------------------------------------------------------------------------------ validation
def test_prompt_mask_validation(model, images, tmp_path):
    from PIL import Image

    q, prompts, masks = images
    ok01 = (masks[0] > 0).astype(np.uint8)
    assert check_prompt_mask(ok01, (80, 120)).sum() == check_prompt_mask(masks[0], (80, 120)).sum() > 0
    assert not check_prompt_mask(np.zeros((4, 4), np.uint8)).any()  # an empty mask is binary
    three = masks[0].copy()
    three[0, 0] = 7
    with pytest.raises(PromptMaskError, match="not binary"):
        check_prompt_mask(three, name="bad.png")
    with pytest.raises(PromptMaskError, match="2-D"):
        check_prompt_mask(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(PromptMaskError, match="NaN"):
        check_prompt_mask(np.array([[0.0, np.nan]]))
    pred = SegGPTPredictor(model)
    with pytest.raises(PromptMaskError, match="80x120 .*image is 70x50"):
        pred.predict(q, [prompts[1]], [masks[0]])
    with pytest.raises(PromptMaskError, match="not binary"):
        pred.predict(q, prompts[:1], [three])
    # files are named in the message
    Image.fromarray(three).save(tmp_path / "three.png")
    with pytest.raises(PromptMaskError, match="three.png"):
        pred.predict(q, prompts[:1], [tmp_path / "three.png"])
    # a colour mask: the layout's one rule (every non-black pixel is defect), as in training
    from seggpt_lib.data.layout import read_label

    colour = np.zeros((80, 120, 3), np.uint8)
    colour[masks[0] > 0] = (200, 30, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    assert np.array_equal(check_prompt_mask(tmp_path / "colour.png", (80, 120)), masks[0] > 0)
    assert np.array_equal(read_label(tmp_path / "colour.png") != 0, masks[0] > 0)
    with pytest.raises(ValueError, match="prompt masks"):
        pred.predict(q, prompts, masks[:1])
    with pytest.raises(ValueError):
        pred.predict(q, prompts, masks, grid=0)
    with pytest.raises(ValueError):
        pred.predict(q, prompts, masks, tile_pairing="diagonal")


# ------------------------------------------------------------------------------ scoring a mapping
def test_score_mapping_equals_direct_predictions(model, tmp_path):
    """score_mapping (the one scoring path of infer, notebooks and study) == predictor calls."""
    from PIL import Image

    from seggpt_lib.eval.scoring import Folder, LearnedPrompts, ScoringConfig, score_mapping

    rng = np.random.default_rng(3)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    files = []
    for i, cls in enumerate(["pit", "pit", "dent", "dent"]):
        f = f"{cls}_{i:06d}.png"
        img = rng.integers(0, 256, (40 + 4 * i, 50, 3), dtype=np.uint8)
        m = np.zeros(img.shape[:2], np.uint8)
        m[5 : 15 + i, 10:30] = 255
        Image.fromarray(img).save(tmp_path / "images" / f)
        Image.fromarray(m).save(tmp_path / "labels" / f"{Path(f).stem}.png")
        files.append(f)
    folder = Folder.of_dataset(tmp_path)
    mapping = {files[0]: [files[1], files[2]], files[2]: [files[3]], files[3]: [files[0]]}
    pred = SegGPTPredictor(model, max_batch=4)
    cfg = ScoringConfig(grid=2, top_k=1, work_size=64, tile_pairing="aligned", extra={"tag": 1},
                        columns=("n_prompts", "seconds"))
    seen = []
    out = list(score_mapping(pred, folder, mapping, "auto", cfg, prompts=folder, progress=lambda d, t: seen.append((d, t))))
    assert [s.result.query for s in out] == list(mapping) and seen[-1] == (3, 3)
    assert [s.result.kind for s in out] == ["positive", "positive", "negative"]
    for s in out:
        q = s.result.query
        p = mapping[q][0]
        ref = pred.predict(tmp_path / "images" / q, [tmp_path / "images" / p], [tmp_path / "labels" / f"{Path(p).stem}.png"],
                           grid=2, work_size=64, tile_pairing="aligned")
        np.testing.assert_array_equal(s.result.pred, ref.mask)
        assert s.result.prompts == [p] and s.result.query_class == q.split("_")[0]
        assert list(s.result.extra) == ["tag", "n_prompts", "seconds"] and s.result.extra["n_prompts"] == 1
        assert s.result.gt.shape == s.image.shape[:2] and s.result.gt.any()
    # learned prompts by class: a positive query takes its class's, a negative one its prompt's class's
    pairs = {c: pred.prompt_pairs([tmp_path / "images" / f], [tmp_path / "labels" / f"{Path(f).stem}.png"])
             for c, f in (("pit", files[1]), ("dent", files[3]))}
    got = {s.result.query: s.result for s in score_mapping(pred, folder, {files[0]: [files[2]]}, "negative",
                                                            prompts=folder, learned=LearnedPrompts(pairs))}
    assert got[files[0]].prompts == ["learned:dent"]
    ref = pred.predict(tmp_path / "images" / files[0], prompt_pairs=pairs["dent"])
    np.testing.assert_array_equal(got[files[0]].pred, ref.mask)
