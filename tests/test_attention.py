"""Attention implementations against the reference, the impl switch, and the model with each impl.

Tolerances: fp32 forward and every gradient (q, k, v, rel_pos_h, rel_pos_w) within 1e-4 of the
``"math"`` reference (absolute, on inputs of unit scale; relative to the largest value when that
is above 1). bf16: within 5 % of the largest value of the float64 reference, and never more
than twice the error of the bf16 reference itself (+1e-3), forward and backward.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seggpt_lib import build_seggpt
from seggpt_lib.model import attention as A
from seggpt_lib.model.attention import (
    ATTENTION_IMPLS,
    attention_impl,
    auto_impl,
    folded_head_dim,
    get_attention_impl,
    rel_pos_attention,
    resolve_impl,
    set_attention_impl,
)
from seggpt_lib.utils.masking import random_patch_mask

FAST = [i for i in ATTENTION_IMPLS if i != "math"] + ["sdpa_folded_v"]  # flex: forward only on CPU (below)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _no_forcing(monkeypatch):
    """Each test starts and ends with no forced implementation, whatever the environment says."""
    monkeypatch.delenv("SEGGPT_ATTN", raising=False)
    previous = set_attention_impl(None)
    yield
    A._FORCED = previous


def _inputs(b, n, grid, d, seed=0, table_len=None, strided=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    length = grid[0] * grid[1]
    if strided:  # the model's layout: views into one (B, L, 3, n, d) qkv projection
        qkv = torch.randn(b, length, 3, n, d, generator=g).permute(2, 0, 3, 1, 4)
    else:
        qkv = torch.randn(3, b, n, length, d, generator=g)
    th, tw = table_len or (2 * grid[0] - 1, 2 * grid[1] - 1)
    rh = torch.randn(th, d, generator=g) * 0.3
    rw = torch.randn(tw, d, generator=g) * 0.3
    return qkv.to(device), rh.to(device), rw.to(device)


def _run(impl, qkv, rh, rw, grid, dtype):
    """Output and the gradients of (qkv, rel_pos_h, rel_pos_w) for a fixed upstream gradient."""
    x = qkv.detach().to(dtype).requires_grad_()
    h = rh.detach().to(dtype).requires_grad_()
    w = rw.detach().to(dtype).requires_grad_()
    q, k, v = x.unbind(0)
    out = A._IMPLS[impl](q, k, v, h, w, grid, q.shape[-1] ** -0.5)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, dtype)
    out.backward(up)
    return [t.float().cpu() for t in (out, x.grad, h.grad, w.grad)]


def _assert_fp32_close(got, ref, what):
    for name, a, b in zip(("out", "d_qkv", "d_rel_pos_h", "d_rel_pos_w"), got, ref):
        tol = 1e-4 * max(1.0, b.abs().max().item())
        err = (a - b).abs().max().item()
        assert err <= tol, f"{what} {name}: max |diff| {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize(
    "b,n,grid,d,strided",
    [(2, 3, (8, 4), 16, True), (1, 2, (6, 6), 32, False), (2, 1, (28, 14), 64, True), (1, 2, (3, 5), 12, True)],
)
def test_fp32_matches_reference_forward_and_backward(device, impl, b, n, grid, d, strided):
    qkv, rh, rw = _inputs(b, n, grid, d, strided=strided, device=device)
    _assert_fp32_close(_run(impl, qkv, rh, rw, grid, torch.float32), _run("math", qkv, rh, rw, grid, torch.float32),
                       f"{impl} {grid} d={d}")


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    n=st.integers(1, 3),
    hp=st.integers(1, 7),
    wp=st.integers(1, 7),
    d=st.sampled_from([4, 8, 12, 16, 24]),
    seed=st.integers(0, 2**16),
    impl=st.sampled_from(FAST),
)
def test_fp32_matches_reference_hypothesis(b, n, hp, wp, d, seed, impl):
    qkv, rh, rw = _inputs(b, n, (hp, wp), d, seed=seed)
    _assert_fp32_close(_run(impl, qkv, rh, rw, (hp, wp), torch.float32),
                       _run("math", qkv, rh, rw, (hp, wp), torch.float32), f"{impl} {(hp, wp)} d={d}")


@pytest.mark.parametrize("impl", FAST)
def test_fp32_resized_tables(impl):
    """Tables of another length (a model loaded at a new resolution) are resized the same way."""
    grid = (6, 4)
    qkv, rh, rw = _inputs(1, 2, grid, 8, table_len=(15, 5))
    _assert_fp32_close(_run(impl, qkv, rh, rw, grid, torch.float32), _run("math", qkv, rh, rw, grid, torch.float32), impl)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("grid,d", [((8, 4), 16), ((14, 7), 32)])
def test_bf16_within_tolerance(device, impl, grid, d):
    qkv, rh, rw = _inputs(2, 2, grid, d, device=device)
    exact = _run("math", qkv.double(), rh.double(), rw.double(), grid, torch.float64)
    ref16 = _run("math", qkv, rh, rw, grid, torch.bfloat16)
    got = _run(impl, qkv, rh, rw, grid, torch.bfloat16)
    for name, a, r, e in zip(("out", "d_qkv", "d_rel_pos_h", "d_rel_pos_w"), got, ref16, exact):
        scale = e.abs().max().item()
        err, ref_err = (a - e).abs().max().item(), (r - e).abs().max().item()
        assert err <= 0.05 * scale, f"{impl} {name}: bf16 error {err:.3g} > 5 % of {scale:.3g}"
        assert err <= 2 * ref_err + 1e-3, f"{impl} {name}: bf16 error {err:.3g} vs the bf16 reference's {ref_err:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,backend", [(torch.bfloat16, "FLASH_ATTENTION"), (torch.float16, "FLASH_ATTENTION"),
                                           (torch.float32, "EFFICIENT_ATTENTION"), (torch.bfloat16, "EFFICIENT_ATTENTION")])
def test_cuda_folded_runs_in_fused_kernels_at_vit_large_shape(dtype, backend):
    """ViT-L: grid 56x28, head dim 64 -> folded 152; the fused kernels must accept it (fwd + bwd)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    grid, d = (56, 28), 64
    qkv, rh, rw = _inputs(2, 4, grid, d, device="cuda")
    qkv, rh, rw = qkv * 0.5, rh * 0.1, rw * 0.1
    exact = _run("math", qkv.double(), rh.double(), rw.double(), grid, torch.float64)
    with sdpa_kernel([getattr(SDPBackend, backend)]):  # raises if that kernel cannot run the shape
        got = _run("sdpa_folded", qkv, rh, rw, grid, dtype)
    tol = 1e-4 if dtype == torch.float32 else 0.05
    for name, a, e in zip(("out", "d_qkv", "d_rel_pos_h", "d_rel_pos_w"), got, exact):
        scale = max(1.0, e.abs().max().item()) if dtype == torch.float32 else e.abs().max().item()
        assert (a - e).abs().max().item() <= tol * scale, f"{backend} {dtype} {name}"


def test_folded_head_dim():
    assert folded_head_dim(64, (56, 28)) == 152  # ViT-L: 64 + 56 + 28 = 148 -> 152 (flash: <= 256)
    assert folded_head_dim(64, (28, 14)) == 112
    assert folded_head_dim(32, (16, 8)) == 56
    assert all(folded_head_dim(d, (h, w)) % 8 == 0 for d in (4, 12, 64) for h in (1, 5) for w in (2, 7))


def test_folded_scores_are_the_biased_scores():
    """The identity behind the folded paths: q' k'^T == scale q k^T + rel_h + rel_w."""
    grid, d = (5, 3), 8
    qkv, rh, rw = _inputs(1, 2, grid, d, strided=False)
    q, k, _ = qkv.double()
    qf, kf = A.fold_rel_pos(q, k, rh.double(), rw.double(), grid, d**-0.5)
    rel_h, rel_w = A.rel_pos_terms(q, rh.double(), rw.double(), grid)
    want = (q * d**-0.5) @ k.transpose(-2, -1)
    want = (want.view(1, 2, *grid, *grid) + rel_h[..., :, None] + rel_w[..., None, :]).view(1, 2, 15, 15)
    torch.testing.assert_close(qf @ kf.transpose(-2, -1), want, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# choosing the implementation
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "cuda", "mps", "meta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", [False, True])
def test_auto_picks_a_valid_impl(device, dtype, grad):
    assert auto_impl(device, dtype, grad) in ATTENTION_IMPLS
    assert resolve_impl("auto", device, dtype, grad) == auto_impl(device, dtype, grad)
    assert resolve_impl("math", device, dtype, grad) == "math"


def test_auto_choices():
    assert auto_impl("cuda", torch.bfloat16) == auto_impl("cuda", torch.bfloat16, grad=True) == "sdpa_folded"
    assert auto_impl("cuda", torch.float16) == "sdpa_folded"
    assert auto_impl("cuda", torch.float32) == auto_impl("cuda", torch.float32, grad=True) == "math"
    assert auto_impl("cpu", torch.float32) == "sdpa_bias"
    assert auto_impl("cpu", torch.float32, grad=True) == "math"
    assert auto_impl("cpu", torch.bfloat16) == auto_impl("cpu", torch.bfloat16, grad=True) == "matmul_folded"


def _spy(monkeypatch):
    calls = []
    for name, fn in list(A._IMPLS.items()):
        monkeypatch.setitem(A._IMPLS, name, lambda *a, _n=name, _f=fn: (calls.append(_n), _f(*a))[1])
    return calls


def test_switch_forces_every_call(monkeypatch):
    calls = _spy(monkeypatch)
    qkv, rh, rw = _inputs(1, 1, (4, 2), 8)
    q, k, v = qkv.unbind(0)
    rel_pos_attention(q, k, v, rh, rw, (4, 2), 0.3, impl="sdpa_folded")
    assert calls[-1] == "sdpa_folded"
    assert set_attention_impl("math") is None
    assert get_attention_impl() == "math"
    rel_pos_attention(q, k, v, rh, rw, (4, 2), 0.3, impl="sdpa_folded")
    assert calls[-1] == "math"
    with attention_impl("matmul_folded"):
        rel_pos_attention(q, k, v, rh, rw, (4, 2), 0.3)
        assert calls[-1] == "matmul_folded"
    assert get_attention_impl() == "math"  # restored
    set_attention_impl("auto")  # forces nothing: back to each call's argument
    rel_pos_attention(q, k, v, rh, rw, (4, 2), 0.3, impl="sdpa_bias")
    assert calls[-1] == "sdpa_bias"
    rel_pos_attention(q, k, v, rh, rw, (4, 2), 0.3)
    assert calls[-1] == auto_impl("cpu", torch.float32, grad=False)  # these inputs need no gradient
    q.requires_grad_()
    rel_pos_attention(q, k, v, rh, rw, (4, 2), 0.3)
    assert calls[-1] == auto_impl("cpu", torch.float32, grad=True)


def test_env_var(monkeypatch):
    monkeypatch.setenv("SEGGPT_ATTN", "matmul_folded")
    set_attention_impl(None)  # re-reads the environment
    assert get_attention_impl() == "matmul_folded"
    assert resolve_impl("sdpa_bias", "cpu", torch.float32) == "matmul_folded"
    set_attention_impl("math")  # the function beats the environment
    assert resolve_impl("auto", "cpu", torch.float32) == "math"
    monkeypatch.setenv("SEGGPT_ATTN", "nonsense")
    with pytest.raises(ValueError, match="unknown attention impl"):
        set_attention_impl(None)


def test_bad_names_and_shapes():
    qkv, rh, rw = _inputs(1, 1, (4, 2), 8)
    q, k, v = qkv.unbind(0)
    with pytest.raises(ValueError, match="unknown attention impl"):
        rel_pos_attention(q, k, v, rh, rw, (4, 2), 0.3, impl="flash")
    with pytest.raises(ValueError, match="unknown attention impl"):
        set_attention_impl("flash")
    with pytest.raises(ValueError, match="grid"):
        rel_pos_attention(q, k, v, rh, rw, (3, 2), 0.3)


# ------------------------------------------------------------------------------------------
# the model with each implementation
# ------------------------------------------------------------------------------------------
def _micro():
    torch.manual_seed(0)
    model = build_seggpt("vit_micro", depth=3, out_indices=(2,))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _model_run(model, impl):
    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(2, 3, *cfg.img_size, generator=g)
    tgts = torch.randn(2, 3, *cfg.img_size, generator=g)
    mask = random_patch_mask(cfg.grid, 0.75, 2, generator=g)
    model.zero_grad(set_to_none=True)
    with attention_impl(impl):
        loss, pred, _ = model(imgs, tgts, mask)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), pred.detach(), grads


def test_model_matches_with_every_impl():
    model = _micro().train()
    model.cfg.drop_path_rate = 0.0
    for blk in model.blocks:
        blk.drop_path = 0.0
    loss0, pred0, grads0 = _model_run(model, "math")
    for impl in FAST + ["auto"]:
        loss, pred, grads = _model_run(model, impl)
        assert (pred - pred0).abs().max().item() < 1e-4, impl
        assert abs(loss.item() - loss0.item()) < 1e-5, impl
        for name, g in grads0.items():
            tol = 1e-4 * max(1.0, g.abs().max().item())
            assert (grads[name] - g).abs().max().item() < tol, f"{impl}: gradient of {name}"


def test_model_config_attn_impl(monkeypatch):
    calls = _spy(monkeypatch)
    model = build_seggpt("vit_micro", depth=3, out_indices=(2,), attn_impl="matmul_folded").eval()
    cfg = model.cfg
    with torch.no_grad():
        model(torch.randn(1, 3, *cfg.img_size), torch.randn(1, 3, *cfg.img_size))
    assert set(calls) == {"matmul_folded"}
    calls.clear()
    with attention_impl("math"), torch.no_grad():
        model(torch.randn(1, 3, *cfg.img_size), torch.randn(1, 3, *cfg.img_size))
    assert set(calls) == {"math"}


def test_cached_constants_survive_inference_mode():
    """Index/one-hot tensors cached during inference still work when training follows."""
    model = _micro()
    cfg = model.cfg
    x = torch.randn(1, 3, *cfg.img_size)
    A._constant_cached.cache_clear()
    with torch.inference_mode():
        for impl in ATTENTION_IMPLS:
            with attention_impl(impl):
                model.eval()(x, x)
    model.train()
    for impl in ATTENTION_IMPLS:
        with attention_impl(impl):
            model(x, x, torch.ones(1, cfg.grid[0] * cfg.grid[1], dtype=torch.bool))[0].backward()
    assert A._constant_cached.cache_info().hits > 0


def test_model_bf16_autocast_cpu():
    model = _micro().eval()
    cfg = model.cfg
    imgs, tgts = torch.randn(1, 3, *cfg.img_size), torch.randn(1, 3, *cfg.img_size)
    with torch.no_grad():
        _, ref, _ = model(imgs, tgts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, got, _ = model(imgs, tgts)
    assert torch.isfinite(got).all()
    assert (got.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


# ------------------------------------------------------------------------------------------
# FlexAttention (opt-in; compiled on first use; forward only on CPU)
# ------------------------------------------------------------------------------------------
def test_flex_forward_matches_reference_cpu(needs_compiler):
    grid, d = (7, 5), 16  # L = 35: not a multiple of any block size
    qkv, rh, rw = _inputs(2, 2, grid, d)
    q, k, v = qkv.unbind(0)
    with torch.no_grad():
        got = A._IMPLS["flex"](q, k, v, rh, rw, grid, d**-0.5)
        ref = A._IMPLS["math"](q, k, v, rh, rw, grid, d**-0.5)
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    # the bias is really applied (without it the result differs)
    with torch.no_grad():
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=d**-0.5)
    assert (plain - ref).abs().max().item() > 1e-2


def test_flex_is_opt_in_and_falls_back_for_cpu_gradients():
    assert "flex" not in ATTENTION_IMPLS and "flex" in A.OPTIONAL_IMPLS
    for dev in ("cpu", "cuda"):
        for dtype in (torch.float32, torch.bfloat16):
            for grad in (False, True):
                assert auto_impl(dev, dtype, grad) != "flex"
    assert resolve_impl("flex", "cpu", torch.float32, grad=False) == "flex"
    assert resolve_impl("flex", "cuda", torch.bfloat16, grad=True) == "flex"
    with pytest.warns(UserWarning, match="no backward on CPU"):
        A._warn_once.cache_clear()
        assert resolve_impl("flex", "cpu", torch.float32, grad=True) == auto_impl("cpu", torch.float32, grad=True)


def test_model_inference_with_flex_matches_reference(needs_compiler):
    model = _micro().eval()
    cfg = model.cfg
    g = torch.Generator().manual_seed(4)
    imgs = torch.randn(2, 3, *cfg.img_size, generator=g)
    tgts = torch.randn(2, 3, *cfg.img_size, generator=g)
    with torch.no_grad():
        with attention_impl("math"):
            ref = model.predict_query(imgs, tgts)
        with attention_impl("flex"):
            got = model.predict_query(imgs, tgts)
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
