"""Procedural captioned shapes: images and short videos rendered on the fly, on any device, from a seed.

A scene holds 1-3 shapes. Each shape has a kind (circle, square, triangle), a colour, a texture
(solid, striped, checkered), a cell of a 3x3 grid (its position word) and, in videos, a motion
(still or moving up/down/left/right). The caption lists the shapes in drawing order, one group of
words per shape::

    colour texture shape position [motion]        e.g. "red striped circle top-left moving-right"

so what the caption says must be read through text-to-image attention, while edges, textures and
motion make spatial and temporal locality matter. Sizes and small offsets inside the cell are random
and not described. Position words name where the shape is in the *middle* frame of a clip; a shape
moves at 1.0-1.5 pixels per frame, so clips of any length share one meaning of the words.

Shape legend: ``B`` batch, ``K = 3`` shape slots, ``F`` frames, ``S`` image side, ``L`` caption tokens.
Pixels are in ``[-1, 1]``; images are ``[B, 3, S, S]`` and videos ``[B, 3, F, S, S]``.
Everything random comes from the ``torch.Generator`` passed in, so a seed fixes the data on a device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "VOCAB", "VOCAB_SIZE", "PAD", "TEXT_LEN", "SHAPES", "COLOURS", "TEXTURES", "POSITIONS", "MOTIONS",
    "Scenes", "sample_scenes", "render", "captions", "sample_batch", "tokenize", "detokenize",
    "make_generator", "IMAGE_PROMPTS", "VIDEO_PROMPTS",
]

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (0.90, 0.15, 0.15), "green": (0.15, 0.80, 0.20), "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.90, 0.15), "cyan": (0.10, 0.85, 0.90), "magenta": (0.90, 0.20, 0.85),
    "white": (0.95, 0.95, 0.95), "orange": (1.00, 0.55, 0.10),
}
TEXTURES = ("solid", "striped", "checkered")
POSITIONS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom",
             "bottom-right")  # cell index = row * 3 + col
MOTIONS = ("still", "moving-up", "moving-down", "moving-left", "moving-right")
_MOTION_DIR = ((0.0, 0.0), (0.0, -1.0), (0.0, 1.0), (-1.0, 0.0), (1.0, 0.0))  # (dx, dy), y points down

PAD = 0
VOCAB = ("<pad>",) + SHAPES + tuple(COLOURS) + TEXTURES + POSITIONS + MOTIONS
VOCAB_SIZE = len(VOCAB)
TEXT_LEN = 16  # 3 shapes x 5 words fit
MAX_SHAPES = 3
BACKGROUND = 0.12  # grey level in [0, 1]

_OFF_SHAPE, _OFF_COLOUR = 1, 1 + len(SHAPES)
_OFF_TEXTURE = _OFF_COLOUR + len(COLOURS)
_OFF_POSITION = _OFF_TEXTURE + len(TEXTURES)
_OFF_MOTION = _OFF_POSITION + len(POSITIONS)
_INDEX = {w: i for i, w in enumerate(VOCAB)}

# Fixed prompts for sample grids and the quality benchmark (no randomness in what they ask for).
IMAGE_PROMPTS = (
    "red solid circle center",
    "blue striped square top-left",
    "yellow checkered triangle bottom-right",
    "green solid square left magenta striped circle right",
    "white solid triangle top orange checkered circle bottom",
    "cyan striped circle top-right red solid triangle bottom-left blue checkered square center",
    "magenta checkered square bottom orange solid triangle top-left green striped circle right",
    "yellow solid circle left white striped square top-right cyan solid triangle bottom",
)
VIDEO_PROMPTS = (
    "red solid circle center moving-right",
    "blue striped square top-left moving-down yellow solid triangle bottom-right moving-left",
    "green checkered triangle left moving-up white solid circle right still",
    "orange solid square top moving-left cyan striped circle bottom moving-right "
    "magenta solid triangle center still",
)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (data and noise draw from it)."""
    return torch.Generator(device=device).manual_seed(int(seed))


@dataclass(frozen=True)
class Scenes:
    """A batch of scenes. Integer fields ``[B, K]`` (``count`` is ``[B]``), float fields as noted.

    Attributes:
        count: shapes present per scene (1..3); slots ``k >= count`` are empty.
        shape, colour, texture, cell, motion: indices into SHAPES, COLOURS, TEXTURES, POSITIONS, MOTIONS.
        radius: ``[B, K]`` size in pixels at ``S = 64`` (scaled with ``S``).
        offset: ``[B, K, 2]`` offset of the centre from the cell centre, pixels at ``S = 64``.
        speed: ``[B, K]`` pixels per frame at ``S = 64``.
    """

    count: Tensor
    shape: Tensor
    colour: Tensor
    texture: Tensor
    cell: Tensor
    motion: Tensor
    radius: Tensor
    offset: Tensor
    speed: Tensor


def sample_scenes(batch: int, generator: torch.Generator, video: bool = False) -> Scenes:
    """Draw ``batch`` random scenes on ``generator``'s device (``video``: shapes get a motion)."""
    g, dev = generator, generator.device
    B, K = batch, MAX_SHAPES

    def randint(high, *shape):
        return torch.randint(0, high, shape, generator=g, device=dev)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(shape, generator=g, device=dev)

    count = randint(K, B) + 1
    cell = torch.rand(B, len(POSITIONS), generator=g, device=dev).argsort(dim=1)[:, :K]  # distinct cells
    motion = randint(len(MOTIONS), B, K) if video else torch.zeros(B, K, dtype=torch.long, device=dev)
    return Scenes(count=count, shape=randint(len(SHAPES), B, K), colour=randint(len(COLOURS), B, K),
                  texture=randint(len(TEXTURES), B, K), cell=cell, motion=motion,
                  radius=uniform(5.5, 8.5, B, K), offset=uniform(-2.5, 2.5, B, K, 2),
                  speed=uniform(1.0, 1.5, B, K))


def _signed_distance(kind: Tensor, px: Tensor, py: Tensor, r: Tensor) -> Tensor:
    """Approximate signed distance (pixels, < 0 inside) of circle / square / up-pointing triangle.

    ``px, py``: offsets of pixel centres from the shape centre; ``kind, r`` broadcast against them.
    """
    circle = torch.sqrt(px * px + py * py) - r
    square = torch.maximum(px.abs(), py.abs()) - 0.85 * r
    # Equilateral triangle of circumradius 1.3 r: max over its three edges' outward half-planes.
    R = 1.3 * r
    c30 = math.cos(math.pi / 6)
    tri = torch.maximum(torch.maximum(py, -c30 * px - 0.5 * py), c30 * px - 0.5 * py) - 0.5 * R
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, tri))


def _texture(kind: Tensor, px: Tensor, py: Tensor, scale: float) -> Tensor:
    """1 on the bright part of the texture, 0 on the dark part (pattern anchored to the shape centre)."""
    period = 6.0 * scale
    stripes = torch.remainder(torch.floor((px + py) / (period / 2)), 2.0)
    checks = torch.remainder(torch.floor(px / (period / 2)) + torch.floor(py / (period / 2)), 2.0)
    return torch.where(kind == 0, torch.ones_like(px), torch.where(kind == 1, stripes, checks))


def render(scenes: Scenes, size: int = 64, frames: Optional[int] = None) -> Tensor:
    """Render scenes: ``[B, 3, S, S]`` when ``frames`` is None, else ``[B, 3, F, S, S]``; values in [-1, 1]."""
    dev = scenes.shape.device
    B, K = scenes.shape.shape
    F = 1 if frames is None else frames
    scale = size / 64.0
    palette = torch.tensor(list(COLOURS.values()), device=dev)  # [C, 3]
    dirs = torch.tensor(_MOTION_DIR, device=dev)  # [M, 2]

    cell_xy = torch.stack([(scenes.cell % 3).float(), (scenes.cell // 3).float()], -1)  # [B, K, 2]
    centre = (cell_xy * 2.0 + 1.0) * (size / 6.0) + scenes.offset * scale  # [B, K, 2], middle frame
    t = torch.arange(F, device=dev, dtype=torch.float32) - (F - 1) / 2.0  # frames around the middle
    velocity = dirs[scenes.motion] * (scenes.speed * scale)[..., None]  # [B, K, 2]
    centre = centre[:, :, None, :] + velocity[:, :, None, :] * t[None, None, :, None]  # [B, K, F, 2]

    coord = torch.arange(size, device=dev, dtype=torch.float32) + 0.5
    # [B, K, F, S, S] offsets of every pixel from every shape centre
    px = coord[None, None, None, None, :] - centre[..., 0, None, None]
    py = coord[None, None, None, :, None] - centre[..., 1, None, None]
    per_shape = lambda v: v[:, :, None, None, None]  # noqa: E731  [B, K] -> [B, K, 1, 1, 1]
    dist = _signed_distance(per_shape(scenes.shape), px, py, per_shape(scenes.radius * scale))
    alpha = (0.5 - dist).clamp(0.0, 1.0)  # one pixel of anti-aliasing
    present = torch.arange(K, device=dev)[None, :] < scenes.count[:, None]  # [B, K]
    alpha = alpha * per_shape(present.float())
    bright = _texture(per_shape(scenes.texture), px, py, scale)
    shade = 0.35 + 0.65 * bright  # dark part of a texture keeps 35% of the colour

    img = torch.full((B, 3, F, size, size), BACKGROUND, device=dev)
    colour = palette[scenes.colour]  # [B, K, 3]
    for k in range(K):  # painter's order: later shapes on top
        a = alpha[:, k, None]  # [B, 1, F, S, S]
        img = img * (1.0 - a) + colour[:, k, :, None, None, None] * shade[:, k, None] * a
    img = img * 2.0 - 1.0
    return img[:, :, 0] if frames is None else img


def captions(scenes: Scenes, video: bool = False) -> Tensor:
    """Token ids ``[B, TEXT_LEN]`` (int64) describing the scenes; padded with ``PAD`` at the end."""
    words = [scenes.colour + _OFF_COLOUR, scenes.texture + _OFF_TEXTURE, scenes.shape + _OFF_SHAPE,
             scenes.cell + _OFF_POSITION]
    if video:
        words.append(scenes.motion + _OFF_MOTION)
    tok = torch.stack(words, -1)  # [B, K, W]
    B, K, _ = tok.shape
    present = torch.arange(K, device=tok.device)[None, :] < scenes.count[:, None]
    tok = torch.where(present[:, :, None], tok, torch.full_like(tok, PAD)).reshape(B, -1)
    out = torch.full((B, TEXT_LEN), PAD, dtype=torch.long, device=tok.device)
    out[:, : tok.shape[1]] = tok
    return out


def sample_batch(batch: int, generator: torch.Generator, size: int = 64,
                 frames: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """``(pixels, caption_ids)`` for ``batch`` random scenes: images if ``frames`` is None, else videos."""
    scenes = sample_scenes(batch, generator, video=frames is not None)
    return render(scenes, size, frames), captions(scenes, video=frames is not None)


def tokenize(texts: Sequence[str], device: torch.device | str = "cpu") -> Tensor:
    """Captions (words from ``VOCAB`` separated by spaces) -> ids ``[len(texts), TEXT_LEN]``."""
    out = torch.full((len(texts), TEXT_LEN), PAD, dtype=torch.long)
    for i, text in enumerate(texts):
        words = text.split()
        unknown = [w for w in words if w not in _INDEX]
        if unknown:
            raise ValueError(f"caption {text!r}: unknown words {unknown}; the vocabulary is {VOCAB[1:]}")
        if len(words) > TEXT_LEN:
            raise ValueError(f"caption {text!r} has {len(words)} words; at most {TEXT_LEN}")
        out[i, : len(words)] = torch.tensor([_INDEX[w] for w in words], dtype=torch.long)
    return out.to(device)


def detokenize(ids: Tensor) -> list[str]:
    """Ids ``[B, L]`` -> captions (padding dropped)."""
    return [" ".join(VOCAB[i] for i in row.tolist() if i != PAD) for row in ids]
