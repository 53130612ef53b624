"""PNG grids of samples with their captions (Pillow only)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["to_uint8", "image_grid", "video_grid", "save_png", "pyplot", "save_figure"]


def to_uint8(x: Tensor) -> Tensor:
    """``[C, S, S]`` in [-1, 1] -> ``[S, S, C]`` uint8."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)


def _grid(rows: Sequence[Sequence[Tensor]], labels: Optional[Sequence[str]], zoom: int,
          label_side: str) -> "object":
    from PIL import Image, ImageDraw

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    S = rows[0][0].shape[-1] * zoom
    pad = 4
    wrap = 20 if label_side == "below" else 40
    lines = [textwrap.wrap(lbl, wrap) for lbl in labels] if labels else [[] for _ in rows]
    text_h = 11 * max(len(ln) for ln in lines) if labels and label_side == "below" else 0
    text_w = 6 * wrap + pad if labels and label_side == "left" else 0
    if label_side == "below":  # one image per label: lay the images out in a row
        cell_w, cell_h = S + pad, S + text_h + pad
        canvas = Image.new("RGB", (n_cols * cell_w + pad, n_rows * cell_h + pad), (255, 255, 255))
    else:
        cell_w, cell_h = S + pad, S + pad
        canvas = Image.new("RGB", (text_w + n_cols * cell_w + pad, n_rows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            tile = Image.fromarray(to_uint8(img).numpy()).resize((S, S), Image.NEAREST)
            x0 = pad + c * cell_w + (text_w if label_side == "left" else 0)
            y0 = pad + r * cell_h
            canvas.paste(tile, (x0, y0))
            if label_side == "below":
                for i, ln in enumerate(lines[r * n_cols + c] if len(lines) > 1 else []):
                    draw.text((x0, y0 + S + 1 + 11 * i), ln, fill=(0, 0, 0))
        if label_side == "left":
            for i, ln in enumerate(lines[r]):
                draw.text((pad, pad + r * cell_h + 11 * i), ln, fill=(0, 0, 0))
    return canvas


def image_grid(images: Tensor, captions: Optional[Sequence[str]] = None, cols: int = 4, zoom: int = 0):
    """Images ``[B, 3, S, S]`` in [-1, 1] -> a PIL image, ``cols`` per row, each captioned below."""
    zoom = zoom or max(1, 128 // images.shape[-1])
    rows = [list(images[i: i + cols]) for i in range(0, images.shape[0], cols)]
    if captions is not None:
        captions = list(captions) + [""] * (len(rows) * cols - len(captions))
        rows = [r + [torch.full_like(images[0], 1.0)] * (cols - len(r)) for r in rows]
    return _grid(rows, captions, zoom, "below")


def video_grid(videos: Tensor, captions: Optional[Sequence[str]] = None, frames: Sequence[int] = (0, 5, 10, 15),
               zoom: int = 0):
    """Videos ``[B, 3, F, S, S]`` -> a PIL image: one row per video (chosen frames), caption on the left."""
    zoom = zoom or max(1, 128 // videos.shape[-1])
    rows = [[videos[b, :, f] for f in frames if f < videos.shape[2]] for b in range(videos.shape[0])]
    return _grid(rows, captions, zoom, "left")


def save_png(img, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend, or None (with a note) when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return None
    return plt


def save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
