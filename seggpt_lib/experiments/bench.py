"""``seggpt bench``: this SegGPT against ``transformers.SegGptForImageSegmentation``.

Both networks are built in one process, on one device, with the same weights (ours mapped by
:func:`seggpt_lib.model.checkpoint.official_to_hf`; HF with ``attn_implementation="eager"`` and
``embedding_type="semantic"``), and measured on

* inference: one prompt/query pair per sample, batch 8 (``--batch-infer``). Ours runs
  :meth:`SegGPT.predict_query` (what :class:`~seggpt_lib.predict.predictor.SegGPTPredictor` runs: only
  the query half is decoded, the same pixels as the bottom half of a full decoding); the whole
  pair decoded (``forward``, like transformers) is measured and reported as well;
* a training step: forward + backward + AdamW step, batch 4 (``--batch-train``), 75 % of the
  label patches hidden; HF gets ``labels`` and computes the same masked smooth-L1 loss.

The timed iterations alternate ours / theirs so both see the same machine load (which matters
on a shared CPU); throughput comes from the fastest iteration (the ``timeit`` convention: other
work on the machine only ever adds time), the median is reported too. Achieved TFLOP/s divides the
*model* FLOPs (counted once with ``FlopCounterMode`` on the HF eager network, batch 1, scaled)
by the time, so the two figures are directly comparable: an effective rate (extra FLOPs of the
folded attention are not credited; decoder FLOPs that query-half decoding skips are). Peak memory (CUDA) is ``max_memory_allocated`` during each model's warm-up steps,
less what the other model holds.

The implementation lives here so that ``seggpt bench`` works from any directory;
``benchmarks/bench_model.py`` is the script form.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from seggpt_lib.model.attention import _IMPLS, ATTENTION_IMPLS, OPTIONAL_IMPLS, resolve_impl
from seggpt_lib.model.checkpoint import hf_config_kwargs, official_to_hf
from seggpt_lib.model.seggpt import build_seggpt
from seggpt_lib.utils.device import autocast, resolve_precision
from seggpt_lib.utils.masking import query_half_mask, random_patch_mask

GiB = 1024**3

# The CPU default: the vit_tiny widths (192-d, 3 heads, 28x14 grid) at depth 4; one run with
# the default iterations takes well under a minute on 2 cores.
CPU_DEFAULT = ("vit_tiny", {"depth": 4, "out_indices": [3]})
CUDA_DEFAULT = ("vit_large", {})


# ------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------
@dataclass
class Setup:
    device: torch.device
    precision: str
    preset: str
    overrides: dict[str, Any]
    ours: torch.nn.Module
    theirs: torch.nn.Module
    step_ours: dict[str, Callable[[], Any]] = field(default_factory=dict)
    step_theirs: dict[str, Callable[[], Any]] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_models(preset: str, overrides: dict[str, Any], device: torch.device, seed: int = 0):
    """Ours and the HF twin with identical weights, on ``device``."""
    import transformers  # heavy and optional (tests and benchmarks only): imported when a benchmark runs

    torch.manual_seed(seed)
    with torch.device(device):
        ours = build_seggpt(preset, **overrides)
        with torch.no_grad():  # non-zero relative-position tables, so the bias is exercised
            for name, p in ours.named_parameters():
                if "rel_pos" in name:
                    p.normal_(0.0, 0.02)
        config = transformers.SegGptConfig(**hf_config_kwargs(ours.cfg), attn_implementation="eager")
        theirs = transformers.SegGptForImageSegmentation(config)
    theirs.load_state_dict(official_to_hf(ours.state_dict()), strict=True)
    return ours.to(device), theirs.to(device)


def _inputs(cfg, batch: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.image_size
    prompt, query, pmask, label = (torch.randn(batch, 3, h, w, generator=g).to(device) for _ in range(4))
    return prompt, query, pmask, label


def _resident_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> int:
    """Bytes held by a model's parameters, gradients and optimizer state."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p)
        add(p.grad)
    for b in model.buffers():
        add(b)
    if opt is not None:
        for state in opt.state.values():
            for t in state.values():
                add(t)
    return total


# ------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------
@dataclass
class Job:
    name: str
    step: Callable[[], Any]
    batch: int
    model: torch.nn.Module
    opt: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None


def _warm(job: Job, warmup: int, device: torch.device) -> None:
    """Warm-up steps, alone; on CUDA they also give the job's peak memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        _sync(device)
        other = torch.cuda.memory_allocated(device) - _resident_bytes(job.model, job.opt)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(max(1, warmup)):
        job.step()
    _sync(device)
    if device.type == "cuda":
        job.peak_bytes = torch.cuda.max_memory_allocated(device) - other


def _timed(jobs: Sequence[Job], iters: int, device: torch.device) -> None:
    """``iters`` rounds, each timing one step of every job in turn."""
    for _ in range(iters):
        for job in jobs:
            _sync(device)
            t0 = time.perf_counter()
            job.step()
            _sync(device)
            job.times.append(time.perf_counter() - t0)


def _rate(job: Job) -> float:
    return job.batch / min(job.times)


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def run_benchmark(
    device: str | torch.device = "cpu",
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    precision: str | None = None,
    compile: bool | str = False,
    act_ckpt: bool = False,
    iters: int = 5,
    warmup: int = 2,
    batch_infer: int = 8,
    batch_train: int = 4,
    lr: float = 1e-4,
    ckpt_extra: bool | None = None,
    tf32: bool = False,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the comparison and return the raw numbers and ratios (see the module doc)."""
    import transformers  # heavy and optional (tests and benchmarks only): imported when a benchmark runs

    say = log or (lambda s: None)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for but torch.cuda.is_available() is False")
    if preset is None:
        preset, default_over = CUDA_DEFAULT if dev.type == "cuda" else CPU_DEFAULT
        overrides = {**default_over, **(overrides or {})}
    overrides = dict(overrides or {})
    precision = resolve_precision(precision, dev, ("fp32", "bf16"))
    if ckpt_extra is None:
        ckpt_extra = dev.type == "cuda" and not act_ckpt
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32  # both models; matters for fp32 only

    t_build = time.perf_counter()
    ours, theirs = build_models(preset, overrides, dev, seed)
    cfg = ours.cfg
    say(f"built {preset} {overrides or ''} on {dev} in {time.perf_counter() - t_build:.1f} s "
        f"({sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M parameters each)")
    amp = lambda: autocast(dev, precision)  # noqa: E731
    if compile not in (False, True, "blocks", "full"):
        raise ValueError(f"compile must be False, 'blocks' or 'full', got {compile!r}")
    full_compile = compile is True or compile == "full"
    if compile == "blocks":
        ours.compile_blocks()  # regional: each block compiled in place, one graph reused
    ours_fwd = torch.compile(ours) if full_compile else ours
    ours_query = torch.compile(ours.predict_query) if full_compile else ours.predict_query

    # -- inference ------------------------------------------------------------------------
    bi = batch_infer
    prompt, query, pmask, _ = _inputs(cfg, bi, dev, seed)
    imgs, tgts = torch.cat([prompt, query], 2), torch.cat([pmask, pmask], 2)
    half = query_half_mask(cfg.grid, bi, device=dev)

    def infer_ours():  # what SegGPTPredictor runs: only the query half is decoded
        with torch.inference_mode(), amp():
            return ours_query(imgs, tgts)

    def infer_ours_full():  # the whole pair decoded, as transformers does
        with torch.inference_mode(), amp():
            return ours_fwd(imgs, tgts, half)[1]

    def infer_theirs():
        with torch.inference_mode(), amp():
            return theirs(pixel_values=query, prompt_pixel_values=prompt, prompt_masks=pmask,
                          embedding_type="semantic").pred_masks

    ours.eval()
    theirs.eval()
    with torch.inference_mode():
        full_theirs = infer_theirs().float()
        diff = (ours.unpatchify(infer_ours_full()).float() - full_theirs).abs().max().item()
        diff_query = (infer_ours().float() - full_theirs[:, :, full_theirs.shape[2] // 2 :]).abs().max().item()
        del full_theirs
    diff = max(diff, diff_query)
    say(f"same network check: max |ours - theirs| = {diff:.3g} ({precision}; whole pair and query-half decoding)")

    g1 = lambda x: x[:1]  # noqa: E731
    with torch.inference_mode():  # counted in fp32 (FlopCounterMode and CPU autocast do not mix)
        flops_infer = count_flops(lambda: theirs(
            pixel_values=g1(query), prompt_pixel_values=g1(prompt), prompt_masks=g1(pmask), embedding_type="semantic"))

    jobs_inf = [Job("ours", infer_ours, bi, ours), Job("ours_full", infer_ours_full, bi, ours),
                Job("theirs", infer_theirs, bi, theirs)]
    for job in jobs_inf:
        _warm(job, warmup + (2 if compile and job.name.startswith("ours") else 0), dev)
    _timed(jobs_inf, iters, dev)
    say(f"inference, {len(jobs_inf[0].times)} timed rounds: ours {_rate(jobs_inf[0]):.2f} samples/s "
        f"({_rate(jobs_inf[1]):.2f} decoding the whole pair), transformers {_rate(jobs_inf[2]):.2f} "
        f"({_rate(jobs_inf[0]) / _rate(jobs_inf[2]):.2f}x; {_rate(jobs_inf[1]) / _rate(jobs_inf[2]):.2f}x)")

    # -- training -------------------------------------------------------------------------
    bt = batch_train
    prompt_t, query_t, pmask_t, label_t = _inputs(cfg, bt, dev, seed + 1)
    imgs_t, tgts_t = torch.cat([prompt_t, query_t], 2), torch.cat([pmask_t, label_t], 2)
    mask_t = random_patch_mask(cfg.grid, 0.75, bt, generator=torch.Generator().manual_seed(seed), device=dev)
    fused = dev.type == "cuda"
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=lr, weight_decay=0.05, fused=fused)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=lr, weight_decay=0.05)
    ours.train()
    theirs.train()

    def train_ours():
        with amp():
            loss = ours_fwd(imgs_t, tgts_t, mask_t)[0]
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss

    def theirs_loss(n: int | None = None, autocast: bool = True):
        sl = slice(None) if n is None else slice(0, n)
        with amp() if autocast else contextlib.nullcontext():
            return theirs(pixel_values=query_t[sl], prompt_pixel_values=prompt_t[sl], prompt_masks=pmask_t[sl],
                          labels=label_t[sl], bool_masked_pos=mask_t[sl], embedding_type="semantic").loss

    def train_theirs():
        loss = theirs_loss()
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        return loss

    def fwd_bwd_theirs_1():
        theirs_loss(1, autocast=False).backward()

    flops_train = count_flops(fwd_bwd_theirs_1)
    theirs.zero_grad(set_to_none=True)

    ours.cfg.use_act_checkpoint = act_ckpt
    jobs_tr = [Job("ours", train_ours, bt, ours, opt_ours), Job("theirs", train_theirs, bt, theirs, opt_theirs)]
    for job in jobs_tr:
        _warm(job, warmup + (2 if compile and job.name == "ours" else 0), dev)
    _timed(jobs_tr, iters, dev)
    say(f"training, {len(jobs_tr[0].times)} timed rounds: ours {_rate(jobs_tr[0]):.2f} samples/s, "
        f"transformers {_rate(jobs_tr[1]):.2f} ({_rate(jobs_tr[0]) / _rate(jobs_tr[1]):.2f}x)")

    ckpt: Job | None = None
    if ckpt_extra:
        ours.cfg.use_act_checkpoint = True
        ckpt = Job("ours_ckpt", train_ours, bt, ours, opt_ours)
        _warm(ckpt, 1 + (2 if compile else 0), dev)
        _timed([ckpt], max(1, iters // 2), dev)
    ours.cfg.use_act_checkpoint = False

    # -- report ---------------------------------------------------------------------------
    act_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    res: dict[str, Any] = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config": {"preset": preset, "overrides": overrides, "img_size": list(cfg.img_size), "grid": list(cfg.grid),
                   "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads},
        "precision": precision,
        "compile": compile,
        "act_ckpt": act_ckpt,
        "tf32": tf32 and dev.type == "cuda",
        "attn_impl_infer": resolve_impl(cfg.attn_impl, dev, act_dtype, grad=False),
        "attn_impl_train": resolve_impl(cfg.attn_impl, dev, act_dtype, grad=True),
        "iters": iters,
        "warmup": warmup,
        "batch_infer": bi,
        "batch_train": bt,
        "max_abs_diff": diff,
        "model_flops_infer_per_sample": flops_infer,
        "model_flops_train_per_sample": flops_train,
    }
    for kind, jobs, flops in (("infer", jobs_inf, flops_infer), ("train", jobs_tr, flops_train)):
        for job in jobs:
            rate = _rate(job)
            res[f"{job.name}_{kind}_samples_per_s"] = rate
            res[f"{job.name}_{kind}_step_s"] = min(job.times)
            res[f"{job.name}_{kind}_step_s_median"] = statistics.median(job.times)
            res[f"{job.name}_{kind}_tflops"] = rate * flops / 1e12
            res[f"{job.name}_{kind}_peak_gib"] = job.peak_bytes / GiB if job.peak_bytes is not None else None
    res["inference_speedup"] = res["ours_infer_samples_per_s"] / res["theirs_infer_samples_per_s"]
    res["inference_speedup_full_decode"] = res["ours_full_infer_samples_per_s"] / res["theirs_infer_samples_per_s"]
    res["train_speedup"] = res["ours_train_samples_per_s"] / res["theirs_train_samples_per_s"]
    for kind in ("infer", "train"):
        a, b = res[f"ours_{kind}_peak_gib"], res[f"theirs_{kind}_peak_gib"]
        res[f"{kind}_memory_ratio"] = a / b if a is not None and b else None
    if ckpt is not None:
        res["ours_train_ckpt_samples_per_s"] = _rate(ckpt)
        res["ours_train_ckpt_peak_gib"] = ckpt.peak_bytes / GiB if ckpt.peak_bytes is not None else None
    if dev.type == "cpu":
        res["process_max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    return res


# ------------------------------------------------------------------------------------------
# attention alone
# ------------------------------------------------------------------------------------------
def _with_backend(fn: Callable[..., torch.Tensor], backend: str) -> Callable[..., torch.Tensor]:
    def run(*args: Any) -> torch.Tensor:
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return fn(*args)

    return run


def bench_attention(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch: int = 16,
    heads: int = 3,
    grid: tuple[int, int] = (28, 14),
    head_dim: int = 64,
    iters: int = 5,
    warmup: int = 2,
    impls: Sequence[str] | None = None,
    variants: bool | None = None,
) -> dict[str, Any]:
    """Forward and forward+backward time of every attention implementation on one shape.

    ``q, k, v`` are views into one ``(B, L, 3, heads, d)`` projection, as in the model. Times
    are the fastest of ``iters`` (ms); CUDA adds the peak memory of the forward+backward.
    ``variants`` (default: on CUDA) adds the folded path pinned to each SDPA backend (flash,
    cuDNN, memory-efficient) and the experimental FlexAttention path; each entry also gets its
    largest forward deviation from the reference (computed in float32).
    """
    dev = torch.device(device)
    length = grid[0] * grid[1]
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, length, 3, heads, head_dim, generator=g).to(dev, dtype)
    rh = (torch.randn(2 * grid[0] - 1, head_dim, generator=g) * 0.02).to(dev, dtype)
    rw = (torch.randn(2 * grid[1] - 1, head_dim, generator=g) * 0.02).to(dev, dtype)
    scale = head_dim**-0.5
    out: dict[str, Any] = {"device": str(dev), "dtype": str(dtype).replace("torch.", ""), "batch": batch,
                           "heads": heads, "grid": list(grid), "head_dim": head_dim, "impls": {}}
    leaves = [t.clone().requires_grad_() for t in (qkv, rh, rw)]
    with torch.no_grad():
        q32, k32, v32 = qkv.float().permute(2, 0, 3, 1, 4).unbind(0)
        ref = _IMPLS["math"](q32, k32, v32, rh.float(), rw.float(), grid, scale)

    fns: dict[str, Callable[..., torch.Tensor]] = {name: _IMPLS[name] for name in (impls or ATTENTION_IMPLS)}
    if variants if variants is not None else dev.type == "cuda":
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            fns[f"sdpa_folded[{backend.split('_')[0].lower()}]"] = _with_backend(_IMPLS["sdpa_folded"], backend)
        for backend in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):  # v unpadded: flash needs equal head dims
            fns[f"sdpa_folded_v[{backend.split('_')[0].lower()}]"] = _with_backend(_IMPLS["sdpa_folded_v"], backend)
        fns["sdpa_folded_v"] = _IMPLS["sdpa_folded_v"]
        fns["flex"] = _IMPLS["flex"]

    def timed(fn: Callable[[], Any]) -> tuple[float, int | None, float]:
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(max(1, warmup)):
            fn()
        _sync(dev)
        first = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        best = float("inf")
        for _ in range(iters):
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            best = min(best, time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(dev) - base if dev.type == "cuda" else None
        return best * 1e3, peak, first

    for name, fn in fns.items():

        def fwd(fn=fn):
            with torch.no_grad():
                q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
                return fn(q, k, v, rh, rw, grid, scale)

        def fwd_bwd(fn=fn):
            q, k, v = leaves[0].permute(2, 0, 3, 1, 4).unbind(0)
            fn(q, k, v, leaves[1], leaves[2], grid, scale).float().sum().backward()
            for t in leaves:
                t.grad = None

        entry: dict[str, Any] = {}
        try:
            entry["max_abs_err_vs_math_fp32"] = (fwd().float() - ref).abs().max().item()
            entry["fwd_ms"], _, entry["fwd_warmup_s"] = timed(fwd)
            entry["fwd_bwd_ms"], peak, entry["fwd_bwd_warmup_s"] = timed(fwd_bwd)
            entry["fwd_bwd_peak_gib"] = None if peak is None else peak / GiB
        except Exception as exc:  # noqa: BLE001  (a kernel refusing the shape, out of memory, no compiler...)
            entry["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            for t in leaves:
                t.grad = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        out["impls"][name] = entry
    return out


def attention_parity(
    device: str | torch.device = "cpu",
    shapes: Sequence[tuple[int, int, tuple[int, int], int]] = ((2, 3, (8, 4), 16), (2, 3, (28, 14), 64), (1, 16, (56, 28), 64)),
    fp32_tol: float = 1e-4,
    bf16_tol: float = 0.05,
) -> dict[str, Any]:
    """Every implementation against a float64 reference on ``device``, forward and backward
    (``"flex"`` too on CUDA: PyTorch has no FlexAttention backward on CPU).

    For each ``(batch, heads, grid, head_dim)``: the output and the gradients of q, k, v (one
    strided qkv tensor, as in the model), ``rel_pos_h`` and ``rel_pos_w``. fp32 passes within
    ``fp32_tol * max(1, max|ref|)``, bf16 within ``bf16_tol * max|ref|``. The same check as
    ``tests/test_attention.py``, without pytest, for a lent GPU.
    """
    dev = torch.device(device)
    rows = []
    ok = True
    for b, n, grid, d in shapes:
        length = grid[0] * grid[1]
        g = torch.Generator().manual_seed(0)
        qkv = (torch.randn(b, length, 3, n, d, generator=g) * 0.5).double().to(dev)
        rh = (torch.randn(2 * grid[0] - 1, d, generator=g) * 0.1).double().to(dev)
        rw = (torch.randn(2 * grid[1] - 1, d, generator=g) * 0.1).double().to(dev)
        up = torch.randn(b, n, length, d, generator=g).double().to(dev)

        def run(impl: str, dtype: torch.dtype) -> list[torch.Tensor]:
            x, h, w = (t.detach().to(dtype).requires_grad_() for t in (qkv, rh, rw))
            q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
            out = _IMPLS[impl](q, k, v, h, w, grid, d**-0.5)
            out.backward(up.to(dtype))
            return [t.detach().double() for t in (out, x.grad, h.grad, w.grad)]

        exact = run("math", torch.float64)
        for dtype, tol in ((torch.float32, fp32_tol), (torch.bfloat16, bf16_tol)):
            for impl in ATTENTION_IMPLS + (OPTIONAL_IMPLS if dev.type == "cuda" else ()):
                try:
                    got = run(impl, dtype)
                except Exception as exc:  # noqa: BLE001  (flex: no compiler, kernel refusing the shape)
                    ok = False
                    rows.append({"shape": [b, n, list(grid), d], "dtype": str(dtype).replace("torch.", ""),
                                 "impl": impl, "max_rel_err": {}, "pass": False,
                                 "error": f"{type(exc).__name__}: {str(exc).strip()[:200]}"})
                    continue
                errs = {}
                passed = True
                for name, a, e in zip(("out", "dq", "dk", "dv", "drel_h", "drel_w"), _split_qkv(got), _split_qkv(exact)):
                    top = e.abs().max().item()
                    scale = max(1.0, top) if dtype == torch.float32 else top
                    err = (a - e).abs().max().item()
                    errs[name] = err / max(scale, 1e-30)
                    passed &= err <= tol * scale
                ok &= passed
                rows.append({"shape": [b, n, list(grid), d], "dtype": str(dtype).replace("torch.", ""), "impl": impl,
                             "max_rel_err": errs, "pass": passed})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"device": str(dev), "ok": ok, "fp32_tol": fp32_tol, "bf16_tol": bf16_tol, "rows": rows}


def _split_qkv(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    out, dqkv, dh, dw = ts
    return [out, *dqkv.unbind(2)[:3], dh, dw] if dqkv.ndim == 5 else [out, dqkv, dh, dw]


def format_parity(res: dict[str, Any]) -> str:
    lines = [f"attention parity on {res['device']} vs a float64 reference (error / max|ref|; fp32 tol "
             f"{res['fp32_tol']:g} x max(1, max|ref|), bf16 tol {res['bf16_tol']:g}): {'PASS' if res['ok'] else 'FAIL'}"]
    for r in res["rows"]:
        b, n, grid, d = r["shape"]
        errs = " ".join(f"{k} {v:.1e}" for k, v in r["max_rel_err"].items()) or r.get("error", "")
        lines.append(f"  B{b} h{n} grid {grid[0]}x{grid[1]} d{d} {r['dtype']:8s} {r['impl']:13s} "
                     f"{'ok  ' if r['pass'] else 'FAIL'} {errs}")
    return "\n".join(lines)


def format_attention(res: dict[str, Any]) -> str:
    lines = [f"attention alone: {res['device']} {res['dtype']}, batch {res['batch']}, {res['heads']} heads, "
             f"grid {res['grid'][0]}x{res['grid'][1]}, head dim {res['head_dim']}"]
    rows = [("impl", "fwd ms", "fwd+bwd ms", "peak GiB", "max|err| fwd")]
    errors = []
    for impl, r in res["impls"].items():
        if "error" in r:
            fwd = f"{r['fwd_ms']:.2f}" if "fwd_ms" in r else "error"
            rows.append((impl, fwd, "error", "", ""))
            errors.append(f"  {impl}: {r['error']}")
        else:
            rows.append((impl, f"{r['fwd_ms']:.2f}", f"{r['fwd_bwd_ms']:.2f}", _fmt(r["fwd_bwd_peak_gib"]),
                         f"{r['max_abs_err_vs_math_fp32']:.1e}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        lines.append("  ".join(s.ljust(widths[j]) if j == 0 else s.rjust(widths[j]) for j, s in enumerate(r)))
    return "\n".join(lines + errors)


# ------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def format_table(res: dict[str, Any]) -> str:
    c = res["config"]
    head = (f"SegGPT benchmark: {c['preset']} {c['overrides'] or ''} grid {c['grid'][0]}x{c['grid'][1]}, "
            f"{res['device']} ({res['device_name']}), {res['precision']}, attention "
            f"{res['attn_impl_infer']}/{res['attn_impl_train']} (inference/training)"
            f"{', compiled (' + str(res['compile']) + ')' if res['compile'] else ''}{', act-ckpt' if res['act_ckpt'] else ''}; "
            f"torch {res['torch']}, transformers {res['transformers']}")
    rows = [("job", "ours", "transformers", "ours/theirs")]
    for kind, label in (("infer", f"inference b{res['batch_infer']}"), ("train", f"train step b{res['batch_train']}")):
        o, t = res[f"ours_{kind}_samples_per_s"], res[f"theirs_{kind}_samples_per_s"]
        rows.append((f"{label} samples/s", _fmt(o), _fmt(t), _fmt(o / t) + "x"))
        if kind == "infer" and "ours_full_infer_samples_per_s" in res:
            of = res["ours_full_infer_samples_per_s"]
            rows.append((f"{label} whole pair decoded samples/s", _fmt(of), _fmt(t), _fmt(of / t) + "x"))
        rows.append((f"{label} TFLOP/s", _fmt(res[f"ours_{kind}_tflops"], ".3f"),
                     _fmt(res[f"theirs_{kind}_tflops"], ".3f"), ""))
        po, pt = res[f"ours_{kind}_peak_gib"], res[f"theirs_{kind}_peak_gib"]
        ratio = res[f"{kind}_memory_ratio"]
        rows.append((f"{label} peak GiB", _fmt(po), _fmt(pt), "" if ratio is None else _fmt(ratio) + "x"))
    if "ours_train_ckpt_samples_per_s" in res:
        rows.append((f"train step b{res['batch_train']} act-ckpt samples/s", _fmt(res["ours_train_ckpt_samples_per_s"]), "", ""))
        rows.append((f"train step b{res['batch_train']} act-ckpt peak GiB", _fmt(res["ours_train_ckpt_peak_gib"]), "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [head]
    for i, r in enumerate(rows):
        lines.append("  ".join(s.ljust(widths[j]) if j == 0 else s.rjust(widths[j]) for j, s in enumerate(r)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(f"model FLOPs per sample (HF eager count): forward {res['model_flops_infer_per_sample'] / 1e9:.2f} G, "
                 f"training step {res['model_flops_train_per_sample'] / 1e9:.2f} G; same-network check "
                 f"max |diff| {res['max_abs_diff']:.2g}")
    if res.get("process_max_rss_gib") is not None:
        lines.append(f"peak memory on CPU: n/a per job; process max RSS {res['process_max_rss_gib']:.2f} GiB")
    return "\n".join(lines)
