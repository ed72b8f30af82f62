"""Contact sheet of a dataset: per class a few samples, each shown plain and with its mask
overlaid (red), optionally also at the low resolution a small model sees."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .common import DataPrepError, check_output, output_file, read_image, scan_dataset


def _overlay(img: Image.Image, mask: np.ndarray) -> Image.Image:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    m = mask > 0
    arr[m] = 0.45 * arr[m] + 0.55 * np.array([255.0, 0.0, 0.0])
    return Image.fromarray(arr.astype(np.uint8))


def contact_sheet(root, out_png, per_class: int = 4, cell: int = 128, low_res: int | None = 64,
                  overwrite: bool = False) -> Path:
    """Write a PNG with one row per class: for each of ``per_class`` samples the image, the
    image with its mask in red, and (with ``low_res``) the image downsized to ``low_res`` px
    and blown up again (what a model at that input size sees). Returns the PNG path. Never
    written inside ``root``; an existing PNG is replaced only with ``overwrite``."""
    root, out_png = Path(root), Path(out_png)
    check_output(out_png, [root], overwrite, folder=False)
    samples = scan_dataset(root, verify=False)
    by_class: dict[str, list] = {}
    for s in samples:
        by_class.setdefault(s.cls, []).append(s)
    if not by_class:
        raise DataPrepError(f"{root}: no samples")
    panels = 3 if low_res else 2
    label_w = 110
    W = label_w + per_class * panels * cell + (per_class - 1) * 8
    H = len(by_class) * (cell + 6)
    sheet = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (cls, items) in enumerate(sorted(by_class.items())):
        y = r * (cell + 6)
        draw.text((4, y + cell // 2 - 6), cls, fill=(0, 0, 0))
        for c, s in enumerate(items[:per_class]):
            img = read_image(s.image, "RGB")
            mask = np.asarray(read_image(s.label, "L"))
            x = label_w + c * (panels * cell + 8)
            tiles = [img, _overlay(img, mask)]
            if low_res:
                tiles.append(img.resize((low_res, low_res), Image.BILINEAR))
            for t, tile in enumerate(tiles):
                sheet.paste(tile.resize((cell, cell), Image.NEAREST if t == 2 else Image.BILINEAR),
                            (x + t * cell, y))
    with output_file(out_png, [root], overwrite) as tmp:
        sheet.save(tmp, format="PNG")
    return out_png
