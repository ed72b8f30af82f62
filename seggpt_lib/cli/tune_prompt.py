"""`seggpt tune-prompt`: command-line arguments -> library call."""
from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from pathlib import Path

from PIL import Image

from seggpt_lib.cli import parse_triple
from seggpt_lib.data.layout import DatasetError
from seggpt_lib.engine.prompt_tuning import (
    DEFAULT_DEFECT_COLOR,
    INITS,
    MASKS,
    PRECISIONS,
    PromptTuningConfig,
    save_learned_prompt,
    tune_prompt,
)
from seggpt_lib.model.checkpoint import CheckpointError, build_from_checkpoint
from seggpt_lib.utils.colors import IMAGENET_MEAN, IMAGENET_STD
from seggpt_lib.utils.device import resolve_device
from seggpt_lib.utils.outputs import OutputError, check_output, output_file, real_path


def _parse_triple(kind=float):
    return lambda text: parse_triple(text, kind)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Writes FILE.safetensors (the prompt image and label, with the model config, palette, "
                     "normalisation and losses in its metadata). Use it in Python with "
                     "seggpt_lib.engine.prompt_tuning.load_learned_prompt / to_prompt_pairs.")
    g = parser.add_argument_group("model")
    g.add_argument("--weights", required=True, metavar="PATH", help="SegGPT checkpoint (kept frozen)")
    g.add_argument("--preset", help="architecture preset when the checkpoint does not record it (e.g. vit_large)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--precision", default="auto", choices=("auto",) + PRECISIONS,
                   help="autocast precision (default: bf16 on CUDA, else fp32)")
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="DIR", help="dataset root (images/, labels/, classes.csv)")
    g.add_argument("--class", dest="class_name", required=True, metavar="NAME", help="the defect class to learn a prompt for")
    g.add_argument("--negative-share", type=float, default=0.0, metavar="F",
                   help="share of each batch drawn from other classes / defect-free images, target empty (default 0)")
    g.add_argument("--mean", type=_parse_triple(), default=IMAGENET_MEAN, metavar="R,G,B", help="normalisation mean (default ImageNet)")
    g.add_argument("--std", type=_parse_triple(), default=IMAGENET_STD, metavar="R,G,B", help="normalisation std (default ImageNet)")
    g.add_argument("--defect-color", type=_parse_triple(int), default=DEFAULT_DEFECT_COLOR, metavar="R,G,B",
                   help="defect colour of the prompt label (default 255,255,255, the predictor's)")
    g = parser.add_argument_group("tuning")
    g.add_argument("--steps", type=int, default=100, help="optimisation steps (default 100)")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate, cosine to 0 (default 0.1)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on the prompt (default 0)")
    g.add_argument("--batch-size", type=int, default=4, help="queries per step (default 4)")
    g.add_argument("--init", default="real", choices=INITS, help="start from a real image+mask of the class, or noise")
    g.add_argument("--init-file", metavar="FILE", help="the image to start from with --init real (default: drawn with --seed)")
    g.add_argument("--mask", default="query", choices=MASKS,
                   help="hide the query half, or also random prompt-label patches (default query)")
    g.add_argument("--prompt-mask-ratio", type=float, default=0.25, help="with --mask query+random: share of prompt patches hidden")
    g.add_argument("--fg-weight", type=float, default=1.0, help="loss weight of the queries' defect pixels (default 1)")
    g.add_argument("--no-flip", action="store_true", help="no random flips of the queries")
    g.add_argument("--no-clamp", action="store_true", help="let the prompt leave the range of real pixels")
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="FILE.safetensors", help="where to write the learned prompt "
                                                                            "(not inside --data)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out / --history / --preview")
    g.add_argument("--history", metavar="CSV", help="write the per-step loss / lr / seconds here")
    g.add_argument("--preview", metavar="PNG", help="write image | label | snapped mask of the learned prompt here")
    g.add_argument("--no-eval", action="store_true", help="skip measuring the loss over all images before and after")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def tuning_config(args: argparse.Namespace) -> PromptTuningConfig:
    """The recipe the arguments ask for (precision ``auto`` is resolved on the device)."""
    return PromptTuningConfig(
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, init=args.init, init_file=args.init_file,
        seed=args.seed, mask=args.mask, prompt_mask_ratio=args.prompt_mask_ratio, fg_weight=args.fg_weight,
        flip=not args.no_flip, negative_share=args.negative_share, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, clamp=not args.no_clamp, precision=args.precision,
        defect_color=args.defect_color, mean=args.mean, std=args.std, evaluate=not args.no_eval,
    )


def _outputs(args: argparse.Namespace) -> dict[str, Path]:
    """The files this command writes, by option."""
    outs = {"--out": Path(args.out)}
    for flag, value in (("--history", args.history), ("--preview", args.preview)):
        if value:
            outs[flag] = Path(value)
    return outs


def run(args: argparse.Namespace) -> int:
    """Every output follows :mod:`seggpt_lib.utils.outputs`: never inside (or equal to) ``--data``,
    ``--weights`` or ``--init-file``; never over an existing file without ``--overwrite``; each
    written aside and renamed into place only after the tuning succeeded."""
    out = Path(args.out)
    inputs = {"--data": args.data, "--weights": args.weights, "--init-file": args.init_file}
    outs = _outputs(args)
    try:
        if out.suffix != ".safetensors":
            raise ValueError(f"--out must end in .safetensors, got {out}")
        for flag, path in outs.items():
            check_output(path, inputs, what=flag, overwrite=args.overwrite, folder=False)
        paths = list(outs.items())
        for i, (flag, path) in enumerate(paths):
            for other, path2 in paths[i + 1:]:
                if real_path(path) == real_path(path2):
                    raise ValueError(f"{flag} and {other} are the same file: {path}")
        data = Path(args.data)
        if not data.is_dir():
            raise FileNotFoundError(f"--data not found: {data}")
        device = resolve_device(args.device)
        cfg = tuning_config(args)
        model = build_from_checkpoint(args.weights, preset=args.preset)
        prompt, history = tune_prompt(model, data, args.class_name, cfg, device=device, progress=not args.no_progress)
        prompt.info["weights"] = Path(args.weights).name
        with contextlib.ExitStack() as stack:  # every file complete before any is renamed into place
            tmp = {flag: stack.enter_context(output_file(path, inputs, what=flag, overwrite=args.overwrite))
                   for flag, path in outs.items()}
            save_learned_prompt(prompt, tmp["--out"])
            if "--history" in tmp:
                with open(tmp["--history"], "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "seconds"])
                    w.writeheader()
                    w.writerows(history)
            if "--preview" in tmp:
                Image.fromarray(prompt.preview()).save(tmp["--preview"], format="PNG")
    except (OutputError, ValueError, FileNotFoundError, FileExistsError, FloatingPointError, CheckpointError,
            DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_loss = prompt.info.get("initial_loss")
    loss_txt = (f"loss {init_loss:.4f} -> {prompt.final_loss:.4f} over {prompt.info['n_images']} images"
                if init_loss is not None else f"last batch loss {prompt.final_loss:.4f}")
    print(f"learned prompt for {args.class_name!r}: {loss_txt}; {args.steps} steps, "
          f"{prompt.info['seconds_per_step']:.3f} s/step; wrote {out}")
    return 0
