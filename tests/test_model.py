"""The SegGPT network: official names and shapes, parity with transformers, feature ensemble."""
from __future__ import annotations

import pytest
import torch

from seggpt_lib import PRESETS, build_seggpt, preset_config
from seggpt_lib.model.checkpoint import hf_config_kwargs, official_to_hf
from seggpt_lib.utils.masking import query_half_mask, random_patch_mask

transformers = pytest.importorskip("transformers")


def _randomise(model: torch.nn.Module, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _hf_twin(model):
    hf = transformers.SegGptForImageSegmentation(transformers.SegGptConfig(**hf_config_kwargs(model.cfg)))
    hf.load_state_dict(official_to_hf(model.state_dict()), strict=True)
    return hf.eval()


def _pair_inputs(cfg, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.image_size
    prompt, query, pmask = (torch.randn(batch, 3, h, w, generator=g) for _ in range(3))
    return prompt, query, pmask


def _ours_vs_hf(model, batch: int = 2) -> float:
    hf = _hf_twin(model)
    prompt, query, pmask = _pair_inputs(model.cfg, batch)
    with torch.no_grad():
        theirs = hf(pixel_values=query, prompt_pixel_values=prompt, prompt_masks=pmask, embedding_type="semantic").pred_masks
        imgs, tgts = torch.cat([prompt, query], 2), torch.cat([pmask, pmask], 2)
        _, pred, _ = model(imgs, tgts, query_half_mask(model.cfg.grid, batch))
        ours = model.unpatchify(pred)
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()


def test_official_state_dict_names_and_count():
    with torch.device("meta"):
        model = build_seggpt("vit_large")
    sd = model.state_dict()
    assert len(sd) == 354
    assert sum(t.numel() for t in sd.values()) == 370_723_203
    assert sd["pos_embed"].shape == (1, 197, 1024)
    assert sd["blocks.0.attn.rel_pos_h"].shape == (111, 64)
    assert sd["blocks.23.attn.rel_pos_w"].shape == (55, 64)
    assert sd["decoder_embed.weight"].shape == (16 * 16 * 64, 4096)
    assert sd["decoder_pred.0.weight"].shape == (64, 64, 3, 3)
    assert sd["decoder_pred.1.weight"].shape == (64,)
    assert sd["decoder_pred.3.weight"].shape == (3, 64, 1, 1)
    for name in ("mask_token", "segment_token_x", "segment_token_y", "type_token_cls", "type_token_ins"):
        assert sd[name].shape == (1, 1, 1, 1024)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_and_run(preset):
    overrides = {} if preset in ("vit_micro", "vit_tiny", "vit_nano") else {"depth": 4, "out_indices": (3,)}
    if preset == "vit_large":
        overrides.update(img_size=(256, 128))
    model = build_seggpt(preset, **overrides).eval()
    h, w = model.cfg.img_size
    x = torch.randn(1, 3, h, w)
    loss, pred, mask = model(x, x, random_patch_mask(model.cfg.grid, 0.75, 1))
    assert pred.shape == (1, model.cfg.grid[0] * model.cfg.grid[1], model.cfg.patch_size**2 * 3)
    assert torch.isfinite(loss) and loss > 0
    assert mask.sum() == round(0.75 * mask.numel())


def test_overrides_use_official_names():
    cfg = preset_config("vit_large", depth=6, embed_dim=256, num_heads=4, out_indices=(3, 5), merge_index=1, decoder_embed_dim=32)
    assert (cfg.depth, cfg.embed_dim, cfg.out_indices, cfg.merge_index) == (6, 256, (3, 5), 1)
    with pytest.raises(ValueError, match="unknown SegGPT config keys"):
        preset_config("vit_large", embed_dimm=3)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("vit_huge")
    with pytest.raises(ValueError, match="out_indices"):
        preset_config("vit_tiny", out_indices=(1,))


def test_parity_with_transformers_reduced_depth():
    model = build_seggpt("vit_tiny", depth=5, out_indices=(3, 4), drop_path_rate=0.0).eval()
    _randomise(model)
    assert _ours_vs_hf(model, batch=2) < 1e-4


def test_parity_with_transformers_full_vit_large_width():
    """ViT-L width, heads, MLP, decoder and the official 896x448 grid; depth cut to 4 for CPU."""
    model = build_seggpt("vit_large", depth=4, out_indices=(3,), drop_path_rate=0.0).eval()
    _randomise(model, std=0.03)
    assert _ours_vs_hf(model, batch=1) < 1e-4


def test_patchify_roundtrip():
    model = build_seggpt("vit_micro")
    x = torch.randn(3, 3, *model.cfg.img_size)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


def test_loss_is_masked_and_weighted_by_valid():
    model = build_seggpt("vit_micro").eval()
    h, w = model.cfg.img_size
    imgs, tgts = torch.randn(2, 3, h, w), torch.randn(2, 3, h, w)
    mask = query_half_mask(model.cfg.grid, 2)
    with torch.no_grad():
        loss, pred, _ = model(imgs, tgts, mask)
        full = model.unpatchify(pred)
        per_pix = torch.nn.functional.smooth_l1_loss(full, tgts, reduction="none", beta=0.01)
        expect = per_pix[:, :, h // 2 :].mean()
        assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
        # weights on the query half change the average
        valid = torch.ones_like(tgts)
        valid[:, :, h // 2 :, : w // 2] = 5.0
        wloss, _, _ = model(imgs, tgts, mask, valid)
        wq = torch.ones_like(per_pix[:, :, h // 2 :])
        wq[..., : w // 2] = 5.0
        assert wloss.item() == pytest.approx(((per_pix[:, :, h // 2 :] * wq).sum() / wq.sum()).item(), rel=1e-5)


# ------------------------------------------------------------------------------------------
# feature ensemble against an independent slow reference written from the architecture description
# ------------------------------------------------------------------------------------------
def _reference_ensemble_forward(model, imgs, tgts, mask, start: int):
    """Prompts of one query in the batch; loops over samples, no shared helpers."""
    cfg = model.cfg
    n = imgs.shape[0]
    hp, wp = cfg.grid
    x = model.patch_embed(imgs)
    y = model.patch_embed(tgts)
    m = mask.reshape(n, hp, wp, 1).float()
    y = y * (1 - m) + model.mask_token * m
    from seggpt_lib.model.seggpt import resize_abs_pos

    pos = resize_abs_pos(model.pos_embed, (hp, wp))
    x = x + model.segment_token_x + pos + model.type_token_cls
    y = y + model.segment_token_y + pos + model.type_token_cls
    streams = [list(x.unbind(0)), list(y.unbind(0))]  # image stream, label stream
    merged = None
    feats = []
    for i, blk in enumerate(model.blocks):
        if merged is None:
            for s in streams:
                att = [blk.attn(blk.norm1(t[None]))[0] for t in s]
                if i >= start:
                    q_mean = sum(a[hp // 2 :] for a in att) / len(att)
                    att = [torch.cat([a[: hp // 2], q_mean], 0) for a in att]
                for j in range(len(s)):
                    t = s[j] + att[j]
                    s[j] = t + blk.mlp(blk.norm2(t))
            if i == cfg.merge_index:
                merged = [(a + b) / 2 for a, b in zip(*streams)]
        else:
            att = [blk.attn(blk.norm1(t[None]))[0] for t in merged]
            if i >= start:
                q_mean = sum(a[hp // 2 :] for a in att) / len(att)
                att = [torch.cat([a[: hp // 2], q_mean], 0) for a in att]
            merged = [t + a for t, a in zip(merged, att)]
            merged = [t + blk.mlp(blk.norm2(t)) for t in merged]
        if i in cfg.out_indices:
            feats.append(model.norm(torch.stack(merged)))
    return model.forward_decoder(feats)


@pytest.mark.parametrize("start", [0, 2, 3])
def test_feature_ensemble_matches_slow_reference(start):
    model = build_seggpt("vit_tiny", depth=5, out_indices=(3, 4), embed_dim=64, num_heads=2, drop_path_rate=0.0).eval()
    _randomise(model, std=0.2)
    n = 3
    h, w = model.cfg.img_size
    g = torch.Generator().manual_seed(3)
    query = torch.randn(1, 3, h // 2, w, generator=g).expand(n, -1, -1, -1)
    prompts = torch.randn(n, 3, h // 2, w, generator=g)
    pmasks = torch.randn(n, 3, h // 2, w, generator=g)
    imgs, tgts = torch.cat([prompts, query], 2), torch.cat([pmasks, pmasks], 2)
    mask = query_half_mask(model.cfg.grid, n)
    with torch.no_grad():
        _, pred, _ = model(imgs, tgts, mask, merge_between_batch=start)
        ours = model.unpatchify(pred)
        ref = _reference_ensemble_forward(model, imgs, tgts, mask, start)
        plain = model.unpatchify(model(imgs, tgts, mask)[1])
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() < 1e-5 * max(1.0, scale)
    # the ensemble really does something: query halves agree across prompts (but for the first
    # pixel row, which the decoder's 3x3 conv mixes with the prompt half), and differ from no-ensemble
    # (from block 0 on only: a later start keeps the per-prompt residuals of earlier blocks)
    q = ours[:, :, h // 2 + 1 :]
    if start == 0:
        assert (q - q[:1]).abs().max().item() < 1e-5 * max(1.0, scale)
    assert (ours - plain).abs().max().item() > 1e-3 * scale


def test_activation_checkpointing_same_gradients():
    model = build_seggpt("vit_micro").train()
    h, w = model.cfg.img_size
    x, t = torch.randn(2, 3, h, w), torch.randn(2, 3, h, w)
    mask = random_patch_mask(model.cfg.grid, 0.75, 2, generator=torch.Generator().manual_seed(0))
    loss, _, _ = model(x, t, mask)
    loss.backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.cfg.use_act_checkpoint = True
    loss2, _, _ = model(x, t, mask)
    loss2.backward()
    assert loss.item() == pytest.approx(loss2.item(), rel=1e-6)
    for a, p in zip(g1, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


@pytest.mark.parametrize("merge", [-1, 0])
def test_predict_query_equals_bottom_half_of_full_decoding(merge):
    """Query-half decoding (what inference runs) gives exactly the bottom half of the full one."""
    model = build_seggpt("vit_tiny", depth=5, out_indices=(3, 4), embed_dim=64, num_heads=2, drop_path_rate=0.0).eval()
    _randomise(model, std=0.2)
    prompt, query, pmask = _pair_inputs(model.cfg, 3, seed=5)
    imgs, tgts = torch.cat([prompt, query], 2), torch.cat([pmask, pmask], 2)
    h = model.cfg.image_size[0]
    with torch.no_grad():
        full = model.unpatchify(model(imgs, tgts, query_half_mask(model.cfg.grid, 3), merge_between_batch=merge)[1])
        half = model.predict_query(imgs, tgts, merge_between_batch=merge)
    assert half.shape == (3, 3, h, model.cfg.image_size[1])
    # the first query pixel row depends on the prompt half through the 3x3 conv: it must match too
    assert (half - full[:, :, h:]).abs().max().item() <= 1e-6 * max(1.0, full.abs().max().item())
    # and the decoder's top-row context really matters (decoding without it differs)
    with torch.no_grad():
        feats = model.forward_encoder(imgs, tgts, query_half_mask(model.cfg.grid, 3), torch.zeros(3, dtype=torch.long), merge)
        no_context = model.forward_decoder([f[:, model.cfg.grid[0] // 2 :] for f in feats])
    assert (no_context[:, :, 0] - full[:, :, h]).abs().max().item() > 1e-4


def test_forward_decoder_rejects_bad_first_row():
    model = build_seggpt("vit_micro").eval()
    feats = [torch.zeros(1, *model.cfg.grid, model.cfg.embed_dim) for _ in model.cfg.out_indices]
    with pytest.raises(ValueError, match="first_row"):
        model.forward_decoder(feats, first_row=model.cfg.grid[0])


@pytest.mark.timeout(300)
def test_compile_blocks_matches_eager_inference_and_training(needs_compiler):
    """Regional compilation: same outputs, same gradients, same parameter names."""
    from seggpt_lib.model.attention import attention_impl

    torch.manual_seed(0)
    eager = build_seggpt("vit_micro", depth=3, out_indices=(2,))
    _randomise(eager, std=0.1)
    compiled = build_seggpt("vit_micro", depth=3, out_indices=(2,))
    compiled.load_state_dict(eager.state_dict())
    assert compiled.compile_blocks() is compiled
    assert list(compiled.state_dict()) == list(eager.state_dict())
    cfg = eager.cfg
    g = torch.Generator().manual_seed(2)
    imgs, tgts = torch.randn(2, 3, *cfg.img_size, generator=g), torch.randn(2, 3, *cfg.img_size, generator=g)
    for model in (eager, compiled):
        model.eval()
    with torch.no_grad():
        ref = eager.predict_query(imgs, tgts)
        torch.testing.assert_close(compiled.predict_query(imgs, tgts), ref, atol=1e-5, rtol=1e-5)
        with attention_impl("flex"):  # flex inside a compiled block (on CPU: its own graph)
            torch.testing.assert_close(compiled.predict_query(imgs, tgts), ref, atol=1e-5, rtol=1e-5)
    mask = random_patch_mask(cfg.grid, 0.75, 2, generator=g)
    grads = []
    for model in (eager, compiled):
        model.train()
        model.zero_grad(set_to_none=True)
        loss = model(imgs, tgts, mask)[0]
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_forward_first_row_scores_only_those_rows():
    """Decoding from the query half gives the full loss when the prompt half weighs nothing."""
    model = build_seggpt("vit_micro").eval()
    _randomise(model, std=0.1)
    cfg = model.cfg
    g = torch.Generator().manual_seed(6)
    imgs, tgts = torch.randn(2, 3, *cfg.img_size, generator=g), torch.randn(2, 3, *cfg.img_size, generator=g)
    mask = random_patch_mask(cfg.grid, 0.6, 2, generator=g)
    valid = torch.rand(2, 3, *cfg.img_size, generator=g) + 0.5
    h, hp = cfg.img_size[0] // 2, cfg.grid[0] // 2
    with torch.no_grad():
        full_loss, full_pred, _ = model(imgs, tgts, mask, valid)
        valid0 = valid.clone()
        valid0[:, :, :h] = 0
        want = model(imgs, tgts, mask, valid0)[0]
        got, pred, returned_mask = model(imgs, tgts, mask, valid0, first_row=hp)
    assert torch.equal(returned_mask, mask.flatten(1))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert abs(got.item() - full_loss.item()) > 1e-4  # the prompt half did count in the full loss
    n_query = (cfg.grid[0] - hp) * cfg.grid[1]
    assert pred.shape == (2, n_query, full_pred.shape[-1])
    torch.testing.assert_close(pred, full_pred[:, -n_query:], atol=1e-6, rtol=1e-6)
