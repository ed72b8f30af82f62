"""`seggpt bench`: command-line arguments -> library call."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import torch

from seggpt_lib.experiments.bench import (
    CPU_DEFAULT,
    CUDA_DEFAULT,
    attention_parity,
    bench_attention,
    format_attention,
    format_parity,
    format_table,
    run_benchmark,
)
from seggpt_lib.utils.device import resolve_device_name, resolve_precision


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"override {text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--preset", default=None,
                        help=f"model preset (default: {CUDA_DEFAULT[0]} on cuda, {CPU_DEFAULT[0]} with "
                             f"{CPU_DEFAULT[1]} on cpu)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], type=_parse_override,
                        metavar="KEY=VALUE", help="config override, JSON value (e.g. depth=4 out_indices=[3]); repeatable")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="autocast precision for both models (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--compile", nargs="?", const="blocks", default=False, choices=("blocks", "full"),
                        help="torch.compile ours: 'blocks' (the default when given alone: each transformer block, "
                             "one graph reused, seconds to compile) or 'full' (the whole model, minutes on ViT-L)")
    parser.add_argument("--act-ckpt", action="store_true", help="activation checkpointing for ours in the training step")
    parser.add_argument("--no-ckpt-extra", action="store_true",
                        help="skip the extra act-ckpt training measurement of ours (done by default on cuda)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per job (default 10 cuda, 5 cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations per job (default 3 cuda, 2 cpu)")
    parser.add_argument("--batch-infer", type=int, default=8)
    parser.add_argument("--batch-train", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (both models; fp32 runs)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    parser.add_argument("--parity", action="store_true",
                        help="check every attention implementation against float64 on --device (fp32, bf16; "
                             "forward and backward) and exit 1 on a failure")
    parser.add_argument("--attention", action="store_true",
                        help="benchmark the attention implementations alone (the model's shape for --preset, "
                             "batch 2 x --batch-infer streams) instead of the two models")


def run(args: argparse.Namespace) -> int:
    device = resolve_device_name(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.device(device).type == "cuda"
    iters = args.iters if args.iters is not None else (10 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    overrides = dict(args.overrides)
    log = lambda s: print(s, file=sys.stderr if args.json else sys.stdout, flush=True)  # noqa: E731
    if args.parity:
        res = attention_parity(device)
        print(format_parity(res), flush=True)
        if args.json:
            print(json.dumps(res, sort_keys=True), flush=True)
        return 0 if res["ok"] else 1
    if args.attention:
        from seggpt_lib.model.seggpt import preset_config

        preset, default_over = (args.preset, {}) if args.preset else (CUDA_DEFAULT if cuda else CPU_DEFAULT)
        cfg = preset_config(preset, **{**default_over, **overrides})
        precision = resolve_precision(args.precision, device, ("fp32", "bf16"))
        res = bench_attention(device, torch.bfloat16 if precision == "bf16" else torch.float32,
                              batch=2 * args.batch_infer, heads=cfg.num_heads, grid=cfg.grid,
                              head_dim=cfg.embed_dim // cfg.num_heads, iters=iters, warmup=warmup)
        res["preset"] = preset
        print(format_attention(res), flush=True)
        if args.json:
            print(json.dumps(res, sort_keys=True), flush=True)
        return 0
    res = run_benchmark(
        device=device, preset=args.preset, overrides=overrides or None, precision=args.precision,
        compile=args.compile, act_ckpt=args.act_ckpt, iters=iters, warmup=warmup,
        batch_infer=args.batch_infer, batch_train=args.batch_train,
        ckpt_extra=False if args.no_ckpt_extra else None, tf32=args.tf32, log=log,
    )
    print(format_table(res), flush=True)
    if args.json:
        print(json.dumps(res, sort_keys=True), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_model", description="Benchmark this SegGPT against transformers' SegGptForImageSegmentation."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
