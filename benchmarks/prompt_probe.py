"""Does a checkpoint read its prompt? Three probes on a run's validation pairs (no training).

    python benchmarks/prompt_probe.py --run runs/pretrain --weights pretrained/vit_micro_shapes.safetensors [--pairs 64]

``--run``: a training run folder (its ``config.json`` gives the data, model and pairs; the
pretraining run of ``make pretrained`` is ``runs/pretrain``). Prints, for the query halves of the
first ``--pairs`` validation pairs:

* the painted share (defect score > 0.5) with the true prompts, with every prompt's mask emptied,
  and with each pair given the next pair's prompt; the mean absolute change of the pixel scores
  under that swap (a model that ignores its prompt changes nothing);
* the IoU of what it paints with the query's pixels of the prompt's class (its target), with all of
  the query's defects or shapes, and with the prompt's own mask at the same place (copying);
* ``val_prompt_auroc`` as the trainer's validation computes it (0.5: the prompt changes nothing).
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

from seggpt_lib import data as D
from seggpt_lib.engine.trainer import Trainer, TrainConfig, query_defect_score, query_rgb


def query_scores(model, imgs, tgts, masked, palette, mean, std) -> torch.Tensor:
    """Per-pixel defect score of the query half (B, H, W)."""
    with torch.no_grad():
        _, pred, _ = model(imgs=imgs, tgts=tgts, bool_masked_pos=masked)
    return query_defect_score(query_rgb(model.unpatchify(pred.float()), mean, std), palette)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    inter = (a & b).sum((1, 2)).float()
    union = (a | b).sum((1, 2)).float().clamp(min=1)
    return float((inter / union).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a training run folder (config.json)")
    ap.add_argument("--weights", required=True, help="the checkpoint to probe")
    ap.add_argument("--pairs", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = TrainConfig.from_dict({**json.loads((Path(args.run) / "config.json").read_text()), "init_weights": args.weights,
                                 "device": "cpu", "log_dir": "/tmp/prompt_probe", "run_id": "probe"})
    trainer = Trainer(cfg)
    model = trainer.model.eval()
    b = D.collate([trainer.val_ds[i] for i in range(min(args.pairs, len(trainer.val_ds)))])
    x = D.model_inputs(b, "cpu")
    h = x["imgs"].shape[-2] // 2
    mean, std = cfg.image_mean, cfg.image_std
    s_true = query_scores(model, x["imgs"], x["tgts"], x["bool_masked_pos"], b["palette"], mean, std)
    empty = x["tgts"].clone()
    empty[:, :, :h] = x["tgts"][:, :, h:].amin(dim=(1, 2, 3), keepdim=True)  # the background colour
    s_empty = query_scores(model, x["imgs"], empty, x["bool_masked_pos"], b["palette"], mean, std)
    imgs, tgts = x["imgs"].clone(), x["tgts"].clone()
    imgs[:, :, :h], tgts[:, :, :h] = torch.roll(imgs[:, :, :h], 1, 0), torch.roll(tgts[:, :, :h], 1, 0)
    s_swap = query_scores(model, imgs, tgts, x["bool_masked_pos"], b["palette"], mean, std)
    painted = s_true > 0.5
    pos = torch.tensor([k == "positive" for k in b["kind"]])
    print(f"{args.weights}: {len(b['kind'])} validation pairs ({int(pos.sum())} positive)")
    print(f"painted share: true prompts {painted.float().mean():.4f}, masks emptied {(s_empty > 0.5).float().mean():.4f}, "
          f"swapped prompts {(s_swap > 0.5).float().mean():.4f}; mean |score change| under the swap "
          f"{(s_true - s_swap).abs().mean():.3f} (mean score {s_true.mean():.3f})")
    target = b["query_label"][pos] > 0
    print(f"positives: IoU with the target {iou(painted[pos], target):.3f}, with all the query's defects "
          f"{iou(painted[pos], b['query_defects'][pos] > 0):.3f}, with the prompt's mask at the same place "
          f"{iou(painted[pos], b['labels'][pos, :h] > 0):.3f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(f"val_prompt_auroc (all {len(trainer.val_ds)} validation pairs): {trainer.evaluate()['val_prompt_auroc']:.3f}")


if __name__ == "__main__":
    main()
