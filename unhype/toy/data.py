"""The toy world's data: shapes, colours, their synonyms, caption templates and a renderer.

Everything here is plain data or a pure function of an explicit `numpy.random.Generator`, so
the trainer, the evaluation and the tests import the same vocabulary. Images are drawn 4x
supersampled with PIL and box-filtered down to RESOLUTION, as float32 RGB in [0, 1].
"""

from __future__ import annotations

import math
import re

import numpy as np

RESOLUTION = 16
SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring", "star",
                           "heart", "crescent", "arrow")
# First entry is the canonical name; the rest are the synonyms a concept's generality is tested on.
SYNONYMS: dict[str, list[str]] = {
    "circle": ["circle", "disk", "round shape", "dot"],
    "square": ["square", "box", "block", "tile"],
    "triangle": ["triangle", "pyramid", "three-sided shape", "wedge"],
    "diamond": ["diamond", "rhombus", "lozenge", "rhomb"],
    "cross": ["cross", "plus sign", "plus", "cross shape"],
    "ring": ["ring", "donut", "hoop", "loop"],
    "star": ["star", "pentagram", "five-pointed star", "starburst"],
    "heart": ["heart", "love heart", "valentine", "heart shape"],
    "crescent": ["crescent", "moon", "crescent moon", "sickle"],
    "arrow": ["arrow", "pointer", "right arrow", "arrow sign"],
}
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
COLOUR_SYNONYMS: dict[str, list[str]] = {
    "red": ["red", "crimson", "scarlet", "ruby"],
    "orange": ["orange", "amber", "tangerine", "apricot"],
    "yellow": ["yellow", "golden", "lemon", "gold"],
    "green": ["green", "emerald", "jade", "leafy"],
    "blue": ["blue", "azure", "sapphire", "cobalt"],
    "purple": ["purple", "violet", "amethyst", "lavender"],
}
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.10, 0.10), "orange": (1.00, 0.55, 0.05), "yellow": (0.98, 0.92, 0.12),
    "green": (0.10, 0.78, 0.20), "blue": (0.12, 0.30, 1.00), "purple": (0.62, 0.15, 0.88),
}

# Caption templates: "a" is turned into "an" before a vowel by `fill`.
FULL_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}", "{colour} {shape}", "a {shape} that is {colour}",
    "a picture of a {colour} {shape}", "a {colour} {shape} on a dark background",
    "a drawing of a {shape}, colored {colour}", "the {shape} is {colour}",
)
SHAPE_TEMPLATES: tuple[str, ...] = ("a {shape}", "a picture of a {shape}", "{shape}")
COLOUR_TEMPLATES: tuple[str, ...] = ("something {colour}", "a {colour} thing")
# Probabilities of a training caption naming both, only the shape, only the colour.
CAPTION_KIND_P = {"full": 0.75, "shape": 0.20, "colour": 0.05}

_ARTICLE = re.compile(r"\b([aA]) (?=[aeiouAEIOU])")


def fill(template: str, shape_word: str | None = None, colour_word: str | None = None) -> str:
    text = template.format(shape=shape_word or "", colour=colour_word or "")
    return _ARTICLE.sub(lambda m: m.group(1) + "n ", text)


def caption(shape: str | None, colour: str | None, rng: np.random.Generator | None = None,
            template: str | None = None, synonyms: bool = True) -> str:
    """A caption naming `shape` and/or `colour` (None leaves one out).

    Without `rng` the canonical words and the first fitting template are used; with it the
    template and (if `synonyms`) each word's synonym are drawn uniformly.
    """
    if shape is None and colour is None:
        return ""
    pool = FULL_TEMPLATES if shape and colour else SHAPE_TEMPLATES if shape else COLOUR_TEMPLATES
    if template is None:
        template = pool[0] if rng is None else pool[rng.integers(len(pool))]

    def word(options: list[str]) -> str:
        if rng is None or not synonyms:
            return options[0]
        return options[rng.integers(len(options))]

    return fill(template, word(SYNONYMS[shape]) if shape else None,
                word(COLOUR_SYNONYMS[colour]) if colour else None)


def training_caption(shape: str, colour: str, rng: np.random.Generator) -> str:
    """A caption for an image of `shape` in `colour`, as the text encoder and denoiser see them."""
    kind = rng.choice(list(CAPTION_KIND_P), p=list(CAPTION_KIND_P.values()))
    return caption(shape if kind != "colour" else None, colour if kind != "shape" else None, rng)


def _poly(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * k / n),
             radius * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star() -> list[tuple[float, float]]:
    outer, inner = _poly(5, 1.0), _poly(5, 0.42, -math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, inner) for p in pair]


def _heart() -> list[tuple[float, float]]:
    pts = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 16.5, -(y + 2.5) / 15.5))
    return pts


# Each shape: list of (polygon in unit coordinates, fill) painted in order; fill 0 cuts holes.
_CIRCLE = _poly(48)
_SHAPE_LAYERS: dict[str, list[tuple[list[tuple[float, float]], int]]] = {
    "circle": [(_CIRCLE, 255)],
    "square": [([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)], 255)],
    "triangle": [([(0.0, -0.95), (0.98, 0.8), (-0.98, 0.8)], 255)],
    "diamond": [([(0.0, -1.0), (0.78, 0.0), (0.0, 1.0), (-0.78, 0.0)], 255)],
    "cross": [([(-0.3, -0.95), (0.3, -0.95), (0.3, -0.3), (0.95, -0.3), (0.95, 0.3), (0.3, 0.3),
                (0.3, 0.95), (-0.3, 0.95), (-0.3, 0.3), (-0.95, 0.3), (-0.95, -0.3),
                (-0.3, -0.3)], 255)],
    "ring": [(_CIRCLE, 255), (_poly(48, 0.52), 0)],
    "star": [(_star(), 255)],
    "heart": [(_heart(), 255)],
    "crescent": [(_CIRCLE, 255), ([(x + 0.45, y - 0.2) for x, y in _poly(48, 0.85)], 0)],
    "arrow": [([(-0.95, -0.22), (0.1, -0.22), (0.1, -0.7), (0.95, 0.0), (0.1, 0.7), (0.1, 0.22),
                (-0.95, 0.22)], 255)],
}


def shape_mask(shape: str, cx: float, cy: float, radius: float, angle: float,
               resolution: int = RESOLUTION) -> np.ndarray:
    """Anti-aliased coverage mask [H, W] in [0, 1] of `shape` centred at (cx, cy) pixels."""
    from PIL import Image, ImageDraw

    size = resolution * SUPERSAMPLE
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cos, sin = math.cos(angle), math.sin(angle)
    for points, value in _SHAPE_LAYERS[shape]:
        xy = [((cx + radius * (x * cos - y * sin)) * SUPERSAMPLE,
               (cy + radius * (x * sin + y * cos)) * SUPERSAMPLE) for x, y in points]
        draw.polygon(xy, fill=value)
    mask = np.asarray(canvas, dtype=np.float32) / 255.0
    return mask.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))


def render(shape: str, colour: str, rng: np.random.Generator,
           resolution: int = RESOLUTION) -> np.ndarray:
    """One image [H, W, 3] float32 in [0, 1]: `shape` in `colour` with random size, position,
    rotation, colour jitter and a random dark, slightly tinted background."""
    radius = rng.uniform(0.26, 0.44) * resolution
    slack = max(0.0, min(resolution / 2 - radius - 0.5, 0.14 * resolution))
    cx = resolution / 2 + rng.uniform(-slack, slack)
    cy = resolution / 2 + rng.uniform(-slack, slack)
    angle = math.radians(rng.uniform(-12, 12))
    mask = shape_mask(shape, cx, cy, radius, angle, resolution)[..., None]
    fg = np.clip(np.array(COLOUR_RGB[colour]) + rng.uniform(-0.06, 0.06, 3), 0, 1)
    bg = np.clip(rng.uniform(0.0, 0.3) + rng.uniform(-0.04, 0.04, 3), 0, 1)
    return (mask * fg + (1 - mask) * bg).astype(np.float32)


def render_batch(n: int, rng: np.random.Generator, shapes: tuple[str, ...] = SHAPES,
                 colours: tuple[str, ...] = COLOURS):
    """`n` random images as a float32 array [n, 3, H, W] with shape and colour index arrays
    (indices into SHAPES / COLOURS)."""
    s_idx = rng.integers(len(shapes), size=n)
    c_idx = rng.integers(len(colours), size=n)
    images = np.stack([render(shapes[s], colours[c], rng) for s, c in zip(s_idx, c_idx)])
    return (images.transpose(0, 3, 1, 2).copy(),
            np.array([SHAPES.index(shapes[s]) for s in s_idx]),
            np.array([COLOURS.index(colours[c]) for c in c_idx]))
