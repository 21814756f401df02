"""The built-in image-caption set: procedural shapes with captions that describe them.

Each image holds one to ``max_shapes`` shapes of several kinds, colours, sizes and positions, and its caption says
what they are and where they stand relative to each other ("a small red circle above a large blue square"). The set
is a deterministic function of its seed. Some (colour, shape) combinations are held out: they appear only in the
test split, so zero-shot figures on the test split measure composition, not memorisation.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from contrast.config import SyntheticConfig

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
SIZES = {"small": 0.3, "large": 0.46}
BACKGROUND = (40, 40, 40)
# (colour, shape) pairs that occur only in the test split
HELD_OUT = {("red", "triangle"), ("green", "star"), ("blue", "cross"), ("yellow", "circle"), ("purple", "square"),
            ("white", "diamond")}


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    size: str
    x: float  # centre, fraction of the width
    y: float  # centre, fraction of the height


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        t = r / 3
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    if shape == "star":
        import math

        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(shape)


def render(items: list[Item], size: int) -> Image.Image:
    scale = 4  # draw large, then downsample: anti-aliased edges
    S = size * scale
    img = Image.new("RGB", (S, S), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for it in items:
        r = SIZES[it.size] * S / 2
        cx, cy = it.x * S, it.y * S
        if it.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[it.colour])
        else:
            draw.polygon(_polygon(it.shape, cx, cy, r), fill=COLOURS[it.colour])
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _relation(a: Item, b: Item) -> str:
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dy) >= abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


def describe(items: list[Item]) -> str:
    def phrase(it: Item) -> str:
        return f"a {it.size} {it.colour} {it.shape}"

    if len(items) == 1:
        return phrase(items[0])
    text = f"{phrase(items[0])} {_relation(items[0], items[1])} {phrase(items[1])}"
    if len(items) == 3:
        text += f" and {phrase(items[2])}"
    return text


def _layout(n: int, rng: random.Random) -> list[tuple[float, float]]:
    """Centres for n shapes in distinct cells of a 2x2 grid, jittered, so shapes never overlap."""
    cells = [(0.28, 0.28), (0.72, 0.28), (0.28, 0.72), (0.72, 0.72)]
    if n == 1:
        return [(0.5 + rng.uniform(-0.12, 0.12), 0.5 + rng.uniform(-0.12, 0.12))]
    chosen = rng.sample(cells, n)
    return [(x + rng.uniform(-0.04, 0.04), y + rng.uniform(-0.04, 0.04)) for x, y in chosen]


def sample_items(rng: random.Random, max_shapes: int, split: str) -> list[Item]:
    n = rng.randint(1, max_shapes)
    centres = _layout(n, rng)
    items = []
    for k, (x, y) in enumerate(centres):
        while True:
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            held = (colour, shape) in HELD_OUT
            # the test split draws its first shape from the held-out pairs half of the time
            if split == "test" and k == 0 and n == 1 and rng.random() < 0.5 and not held:
                colour, shape = rng.choice(sorted(HELD_OUT))
                held = True
            if held and split != "test":
                continue
            break
        size = rng.choice(list(SIZES)) if n == 1 else "small"
        items.append(Item(shape, colour, size, x, y))
    return items


_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_029}


def generate(cfg: SyntheticConfig, split: str, image_size: int):
    """Yield rows (image PNG bytes, caption, attributes of the first shape) for one split, drawn at ``image_size``."""
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"the synthetic set has splits train, val and test; got '{split}'")
    n = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}[split]
    rng = random.Random(cfg.seed * 7919 + _SPLIT_OFFSET[split])
    for _ in range(n):
        items = sample_items(rng, cfg.max_shapes, split)
        buf = io.BytesIO()
        render(items, image_size).save(buf, format="PNG")
        first = items[0]
        yield {
            "image": {"bytes": buf.getvalue(), "path": None},
            "caption": describe(items),
            "shape": first.shape,
            "colour": first.colour,
            "size": first.size,
            "n_shapes": len(items),
        }
