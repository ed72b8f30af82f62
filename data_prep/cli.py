"""``seggpt prepare``: build datasets in the project's layout.

    seggpt prepare synthetic     --out DIR [--seed S] [--per-class N] [--size PX] [--free N] [--overwrite]
    seggpt prepare coco          --src DIR --out DIR [--multiclass | --per-category-copies] [--[no-]keep-splits]
                                 [--boxes-as-masks] [--crowd-as-defect] [--skip-bad] [--overwrite]
    seggpt prepare magnetic-tile --src DIR --out DIR [--limit-per-class N] [--skip-bad] [--overwrite]
    seggpt prepare split         --src DIR --out DIR [--seed S] [--val F] [--test F]
                                 [--holdout-classes a,b | --holdout-n K] [--no-dedup] [--dedup-distance D]
                                 [--allow-incomplete-classes] [--class-names a,b,c] [--skip-bad] [--overwrite]
    seggpt prepare stats         --src DIR [--out FILE] [--overwrite]
    seggpt prepare preview       --src DIR --out FILE.png [--per-class N] [--overwrite]

Bad input prints ``error: ...`` (naming the file and the problem) and exits with status 2.
Outputs follow :mod:`seggpt_lib.utils.outputs`: never inside (or equal to, or containing) --src,
never over an existing output without --overwrite, and built aside then moved into place.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from .common import DataPrepError, DataPrepWarning, DatasetError


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {v}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="prepare_command", metavar="WHAT")
    sub.required = True

    p = sub.add_parser("synthetic", help="generate the synthetic PCB / metal defect dataset")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (default 0)")
    p.add_argument("--per-class", type=_nonneg_int, default=40, help="images per defect class (default 40)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--free", type=_nonneg_int, default=None, help="defect-free images (default: --per-class)")
    p.add_argument("--classes", default=None, help="comma-separated subset of defect classes (default: all)")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: automatic)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")

    p = sub.add_parser(
        "coco", help="convert COCO segmentation (VISION Datasets, Roboflow exports)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert COCO instance segmentation into our layout; masks are decoded by pycocotools.",
        epilog="Annotation files: every _annotations.coco.json under --src (SRC/<Sub>/<split>/, SRC/<split>/ as\n"
               "Roboflow's train/ valid/ test/, or SRC/ itself).\n"
               "Images (nothing is moved): each file_name is looked for beside its annotation file, then in\n"
               "images/ beside it (Roboflow's <split>/images/), then in ../images/; also by its bare name.\n"
               "Bad annotations are handled alone: a degenerate polygon (< 3 points) is skipped with a warning\n"
               "and the image kept; a malformed or missing segmentation is an error (--skip-bad: that annotation\n"
               "is skipped). Crowd regions (iscrowd=1) go to labels_ignore/<stem>.png unless --crowd-as-defect.\n"
               "Several classes (the default): each image written once, its mask holding label value k for the\n"
               "k-th class (names sorted) as named in OUT/labels.txt; where classes overlap the smaller one (fewer\n"
               "pixels in that image) wins; classes.csv: class = the class with most pixels, classes = all.\n"
               "One class: binary masks (255). --per-category-copies: binary masks, one copy per category.\n"
               "EXIF orientation is applied when reading images.")
    p.add_argument("--src", required=True,
                   help="export folder: <Sub>/<split>/, <split>/ or . holding _annotations.coco.json; images "
                        "beside it, in images/ beside it, or in ../images/")
    p.add_argument("--out", required=True,
                   help="output dataset folder (with kept splits: OUT/train, OUT/val, OUT/test)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--multiclass", dest="multiclass", action="store_const", const=True, default=None,
                   help="class-index masks + labels.txt even for a single-category export (default: when the "
                        "export has more than one class)")
    g.add_argument("--per-category-copies", dest="multiclass", action="store_const", const=False,
                   help="binary masks (255): an image with several categories written once per category, each "
                        "copy holding one category (the old behaviour; copies share the group column)")
    p.add_argument("--keep-splits", action=argparse.BooleanOptionalAction, default=None,
                   help="write the export's own train/valid/test split as OUT/train, OUT/val, OUT/test "
                        "(usable in place: make reproduce DATA=folder:OUT); default: on when every annotation "
                        "file is in a train/valid/test folder and train and test exist, else one merged dataset")
    p.add_argument("--boxes-as-masks", action="store_true",
                   help="fill the bbox of an annotation without a segmentation (detection-only exports are "
                        "an error otherwise)")
    p.add_argument("--crowd-as-defect", action="store_true",
                   help="count crowd regions (iscrowd=1) as defect pixels "
                        "(default: an ignore mask, labels_ignore/<stem>.png)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad files and bad annotations (alone) with a warning instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")

    p = sub.add_parser("magnetic-tile", help="convert the magnetic-tile defect dataset")
    p.add_argument("--src", required=True, help="folder with MT_<Class>/Imgs/")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--limit-per-class", type=_nonneg_int, default=None, help="keep the first N photos per class")
    p.add_argument("--skip-bad", action="store_true", help="skip bad files with a warning instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")

    p = sub.add_parser(
        "split", help="seeded class-stratified train/val/test split (leak-free: groups, near-duplicates)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Split a dataset ROOT into OUT/train, OUT/val, OUT/test (copies) and OUT/split.json.",
        epilog="Groups, never single images, are split: images sharing the 'group' column of classes.csv (the\n"
               "copies of one COCO photo) and near-duplicates (rotated, mirrored, re-encoded or\n"
               "rescaled copies, found by a rotation/flip-invariant perceptual hash) stay in one split.\n"
               "Refused: a class left without val or test images (it has fewer than 3 groups) while --val/--test\n"
               "are > 0 (held-out classes excepted), and an empty val or test split.")
    p.add_argument("--src", required=True, help="dataset ROOT to split")
    p.add_argument("--out", required=True, help="output folder (gets train/, val/, test/, split.json)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (default 0)")
    p.add_argument("--val", type=_fraction, default=0.15, help="validation fraction (default 0.15)")
    p.add_argument("--test", type=_fraction, default=0.15, help="test fraction (default 0.15)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--holdout-classes", default=None, help="comma-separated defect classes only in test")
    g.add_argument("--holdout-n", type=_nonneg_int, default=None, help="hold out K random defect classes")
    p.add_argument("--no-dedup", dest="dedup", action="store_false",
                   help="do not merge near-duplicate images into one group")
    p.add_argument("--dedup-distance", type=_nonneg_int, default=None,
                   help="near-duplicates: images whose hashes differ in at most this many of 256 bits "
                        "(counted over the bits reliable in both; default 24)")
    p.add_argument("--allow-incomplete-classes", action="store_true",
                   help="split even when a class gets no val or test image (warn instead of refusing)")
    p.add_argument("--class-names", default=None, metavar="a,b,c",
                   help="class-index masks without labels.txt: the names of label values 1..K (must match the "
                        "values the masks hold); written as labels.txt into each split")
    p.add_argument("--skip-bad", action="store_true", help="skip bad files with a warning instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")

    p = sub.add_parser("stats", help="per-channel mean/std and class counts (JSON on stdout)")
    p.add_argument("--src", required=True, help="dataset ROOT or split folder")
    p.add_argument("--out", default=None, help="also write the JSON to this file (not inside --src)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad files with a warning instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    p = sub.add_parser("preview", help="contact sheet PNG: samples, mask overlays, 64 px view")
    p.add_argument("--src", required=True, help="dataset ROOT")
    p.add_argument("--out", required=True, help="PNG file to write (not inside --src)")
    p.add_argument("--per-class", type=int, default=4, help="samples per class (default 4)")
    p.add_argument("--low-res", type=int, default=64, help="also show images at this size (0: off)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def split_report(plan: dict) -> str:
    """The lines ``seggpt prepare split`` prints: per split the images and groups, the held-out
    classes, the groups of several images and the near-duplicates merged (a few examples)."""
    n = {sp: len(v) for sp, v in plan["files"].items()}
    g = plan.get("groups", {})
    gc = g.get("counts", {})
    lines = [f"{plan['protocol']} split (seed {plan['seed']}): "
             + ", ".join(f"{sp} {n[sp]} images in {gc.get(sp, n[sp])} groups" for sp in ("train", "val", "test"))
             + (f"; held out: {', '.join(plan['holdout_classes'])}" if plan["holdout_classes"] else "")]
    shared = g.get("shared", {})
    if shared:
        lines.append(f"groups: {g.get('total')} in all, {len(shared)} of several images "
                     f"({sum(len(v['files']) for v in shared.values())} images), each kept in one split")
    nd = plan.get("near_duplicates", {})
    if nd.get("enabled"):
        lines.append(f"near-duplicates (distance <= {nd['max_distance']}): {nd['merged']} group(s) merged "
                     f"({nd['images']} images)" + (":" if nd["merged"] else ""))
        for ex in nd.get("examples", []):
            lines.append("  " + ", ".join(ex[:6]) + (f", ... ({len(ex)} images)" if len(ex) > 6 else ""))
        if nd["merged"] > len(nd.get("examples", [])):
            lines.append(f"  ... and {nd['merged'] - len(nd['examples'])} more (split.json: groups.shared)")
    elif nd:
        lines.append("near-duplicates: not searched (--no-dedup)")
    return "\n".join(lines)


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.prepare_command
    t0 = time.perf_counter()
    if cmd == "synthetic":
        from .synthetic import generate_synthetic
        out = generate_synthetic(args.out, seed=args.seed, per_class=args.per_class, size=args.size,
                                 n_free=args.free, overwrite=args.overwrite,
                                 classes=_split_list(args.classes), workers=args.workers)
    elif cmd == "coco":
        from .vision_coco import convert_vision_coco
        out = convert_vision_coco(args.src, args.out, multiclass=args.multiclass,
                                  skip_bad=args.skip_bad, overwrite=args.overwrite, keep_splits=args.keep_splits,
                                  boxes_as_masks=args.boxes_as_masks, crowd_as_defect=args.crowd_as_defect)
        if (out / "split.json").is_file() and not (out / "images").is_dir():  # the export's own split kept
            from .common import read_classes_csv
            parts = []
            for sp in ("train", "val", "test"):
                rows = read_classes_csv(out / sp) or [] if (out / sp).is_dir() else []
                parts.append(f"{sp} {len(rows)}")
            print(f"wrote {out} (the export's split: {', '.join(parts)} images) in {time.perf_counter() - t0:.1f} s")
            return 0
    elif cmd == "magnetic-tile":
        from .magnetic_tile import convert_magnetic_tile
        out = convert_magnetic_tile(args.src, args.out, limit_per_class=args.limit_per_class,
                                    skip_bad=args.skip_bad, overwrite=args.overwrite)
    elif cmd == "split":
        from .near_duplicates import DEFAULT_DISTANCE
        from .split import split_dataset
        out = split_dataset(args.src, args.out, seed=args.seed, val=args.val, test=args.test,
                            holdout_classes=_split_list(args.holdout_classes), holdout_n=args.holdout_n,
                            skip_bad=args.skip_bad, overwrite=args.overwrite, dedup=args.dedup,
                            dedup_distance=DEFAULT_DISTANCE if args.dedup_distance is None else args.dedup_distance,
                            allow_incomplete=args.allow_incomplete_classes, class_names=args.class_names)
        plan = json.loads((out / "split.json").read_text())
        print(split_report(plan))
        print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
        return 0
    elif cmd == "stats":
        from .stats import check_stats_output, dataset_stats, write_stats
        if args.out:
            check_stats_output(args.out, args.src, args.overwrite)
        stats = dataset_stats(args.src, skip_bad=args.skip_bad)
        print(json.dumps(stats, indent=2))
        if args.out:
            write_stats(stats, args.out, args.src, overwrite=args.overwrite)
        return 0
    elif cmd == "preview":
        from .preview import contact_sheet
        out = contact_sheet(args.src, args.out, per_class=args.per_class, low_res=args.low_res or None,
                            overwrite=args.overwrite)
        print(f"wrote {out}")
        return 0
    else:  # pragma: no cover - argparse rejects unknown choices
        raise DataPrepError(f"unknown prepare command {cmd!r}")
    from .common import read_classes_csv
    rows = read_classes_csv(out) or []
    classes = sorted({r["class"] for r in rows})
    print(f"wrote {out}: {len(rows)} images, {len(classes)} classes ({', '.join(classes)}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataPrepWarning)
        try:
            code = _dispatch(args)
        except DatasetError as e:  # DataPrepError, or the layout's (a bad classes.csv, an unreadable image)
            code = 2
            err = e
        else:
            err = None
    for w in caught:
        if issubclass(w.category, DataPrepWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if err is not None:
        print(f"error: {err}", file=sys.stderr)
    return code
