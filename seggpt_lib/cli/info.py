"""`seggpt info`: presets with parameter counts, and the checkpoint formats understood."""
from __future__ import annotations

import argparse
import sys

import torch

from seggpt_lib.model.seggpt import PRESETS, build_seggpt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", help="also describe this checkpoint (any format load_weights reads)")


def run(args: argparse.Namespace) -> int:
    print(f"{'preset':<10} {'pair size':>10} {'patch':>5} {'dim':>5} {'depth':>5} {'heads':>5} {'params':>9}")
    for name in PRESETS:
        with torch.device("meta"):
            m = build_seggpt(name)
        c = m.cfg
        n = sum(p.numel() for p in m.parameters())
        print(f"{name:<10} {c.img_size[0]:>4}x{c.img_size[1]:<5} {c.patch_size:>5} {c.embed_dim:>5} {c.depth:>5} {c.num_heads:>5} {n / 1e6:>8.1f}M")
    print("\ncheckpoints: official .pth ({'model': ...}), bare state dicts, HuggingFace folders/files, "
          "this project's .safetensors and run checkpoints (always read with weights_only=True)")
    if args.weights:
        from seggpt_lib.model.checkpoint import CheckpointError, read_state_dict

        try:
            sd, cfg = read_state_dict(args.weights)
        except (CheckpointError, FileNotFoundError) as e:  # one line naming the file, no traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"\n{args.weights}: {len(sd)} tensors, {sum(t.numel() for t in sd.values()) / 1e6:.1f}M parameters")
        print(f"architecture: {cfg.to_json() if cfg else 'not recorded (pass --preset where asked)'}")
    return 0
