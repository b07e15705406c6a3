"""Labelled image grids of toy samples (nearest-neighbour upscaled, one label under each)."""

from __future__ import annotations

from pathlib import Path

import torch

from unhype.atomic import atomic_path


def make_grid(images: torch.Tensor, labels: list[str] | None = None, title: str | None = None,
              columns: int = 8, scale: int = 6):
    """A PIL image: `images` [N, 3, H, W] in [0, 1] upscaled `scale`x, `labels` under each."""
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    cell_w, cell_h = w * scale + 8, h * scale + (14 if labels else 0) + 8
    top = 18 if title else 0
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h + top), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill=(0, 0, 0))
    pixels = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for i in range(n):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4 + top
        tile = Image.fromarray(pixels[i]).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (x, y))
        if labels:
            draw.text((x, y + h * scale + 1), labels[i][:16], fill=(0, 0, 0))
    return canvas


def save_image_atomic(image, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
