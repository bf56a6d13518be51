"""The scene world's objects: sampling a scene graph and drawing it with PIL.

A scene is a plain-coloured canvas with a few filled shapes (circle, square, triangle) in
a few colours and two size classes. Perception difficulty has knobs: how many objects,
how small, how much they may overlap, grey clutter marks drawn behind them, and how far
their colours fade toward the background. All geometry is integral, so a rendered object
is exactly its colour (no anti-aliasing) and the pixels can be checked against the graph.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (230, 190, 20),
    "purple": (140, 60, 190),
    "orange": (240, 130, 20),
}
BACKGROUND = (240, 240, 240)
# Radius ranges as fractions of the image side; the gap between them keeps "small" and
# "large" visibly different at 64 pixels (4-5 vs 8-9 pixels).
SIZES = {"small": (0.065, 0.085), "large": (0.12, 0.15)}
_MIN_RADIUS = 3
_GAP = 2  # pixels kept free between non-overlapping objects (so they never touch)
# Half the side of a square, and its circumscribed radius, per unit radius.
_SQUARE_HALF = 0.8
_EXTENT = {"circle": 1.0, "square": _SQUARE_HALF * math.sqrt(2.0), "triangle": 1.0}


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Knobs of the generated world. `max_*` knobs are upper bounds: each scene draws its
    own value uniformly in [0, max], so one data set spans easy to hard scenes."""

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 6
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    size_scale: float = 1.0       # multiplies radii; below 1 objects get smaller (harder)
    max_overlap: float = 0.0      # objects may overlap by this fraction of their radius sum
    max_clutter: int = 0          # grey marks drawn behind the objects
    max_low_contrast: float = 0.0  # blend of object colours toward the background, < 1
    # 0: objects anywhere; g > 0: at most one object per cell of a g x g grid, each inside its
    # cell (a 64-pixel image with g = 4 has 16-pixel cells: one merged vision token of a
    # patch-8 model each), so a small model from scratch can learn to count them
    grid: int = 0
    question_types: tuple[str, ...] = ("count", "exist", "color_of", "sum", "difference",
                                       "compare", "multi_step")

    def __post_init__(self):
        unknown = [c for c in self.colors if c not in PALETTE] + [
            s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown colours/shapes {unknown}; known: {list(PALETTE)}, {SHAPES}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, "
                             f"{self.max_objects}")
        reasoning = {"sum", "difference", "compare", "multi_step"} & set(self.question_types)
        if reasoning and len(self.colors) * len(self.shapes) < 3:
            raise ValueError(f"reasoning questions {sorted(reasoning)} need at least 3 "
                             "(colour, shape) combinations")
        if not 0.0 <= self.max_low_contrast < 1.0 or not 0.0 <= self.max_overlap <= 1.0:
            raise ValueError("max_low_contrast must be in [0, 1) and max_overlap in [0, 1]")
        if self.grid < 0 or self.grid and self.max_objects > self.grid ** 2:
            raise ValueError(f"grid={self.grid} has {self.grid ** 2} cells for up to {self.max_objects} "
                             "objects; use grid >= 0 with max_objects <= grid ** 2")
        if self.grid and self.image_size // self.grid < 2 * _MIN_RADIUS + 3:
            raise ValueError(f"grid={self.grid} cells of a {self.image_size}-pixel image are too small "
                             f"for an object (at least {2 * _MIN_RADIUS + 3} pixels); use a smaller grid")


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: int        # centre, pixels from the left
    y: int        # centre, pixels from the top
    radius: int   # pixels; a square's half side is 0.8 radius, a triangle is inscribed
    rgb: tuple[int, int, int]  # the colour drawn (the named colour, faded by low contrast)

    @property
    def extent(self) -> float:
        """Radius of the circle that contains the drawn shape."""
        return self.radius * _EXTENT[self.shape]


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene graph: what is where, and how it was made hard to see."""

    image_size: int
    objects: tuple[SceneObject, ...]
    clutter: tuple[tuple[int, int, int, int, int], ...] = ()  # lines (x0, y0, x1, y1, grey)
    low_contrast: float = 0.0
    overlap: float = 0.0  # the largest overlap of any two objects (fraction of radius sum)

    def count(self, color: str | None = None, shape: str | None = None,
              size: str | None = None) -> int:
        """Number of objects matching every given attribute."""
        return sum((color is None or o.color == color) and (shape is None or o.shape == shape)
                   and (size is None or o.size == size) for o in self.objects)

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "low_contrast": self.low_contrast,
                "overlap": self.overlap, "clutter": [list(c) for c in self.clutter],
                "objects": [dataclasses.asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Scene":
        objects = tuple(SceneObject(**{**o, "rgb": tuple(o["rgb"])}) for o in data["objects"])
        return cls(image_size=int(data["image_size"]), objects=objects,
                   clutter=tuple(tuple(c) for c in data.get("clutter", ())),
                   low_contrast=float(data.get("low_contrast", 0.0)),
                   overlap=float(data.get("overlap", 0.0)))


def _faded(rgb: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    return tuple(int(round((1 - amount) * c + amount * b)) for c, b in zip(rgb, BACKGROUND))


def _pair_overlap(a: SceneObject, b: SceneObject) -> float:
    reach = a.extent + b.extent
    return max(0.0, 1.0 - math.hypot(a.x - b.x, a.y - b.y) / reach)


def _draw_object(rng, config: SceneConfig, side: int, low_contrast: float,
                 max_radius: float | None = None):
    """(shape, colour, size, radius, rgb) of one new object."""
    shape = config.shapes[rng.integers(len(config.shapes))]
    color = config.colors[rng.integers(len(config.colors))]
    size = ("small", "large")[rng.integers(2)]
    low, high = SIZES[size]
    radius = max(_MIN_RADIUS, int(round(rng.uniform(low, high) * side * config.size_scale)))
    if max_radius is not None:
        radius = max(_MIN_RADIUS, min(radius, int(max_radius / _EXTENT[shape])))
    return shape, color, size, radius, _faded(PALETTE[color], low_contrast)


def _grid_objects(rng, config: SceneConfig, target: int, low_contrast: float) -> list[SceneObject]:
    """`target` objects in distinct cells of the config.grid x config.grid grid, each drawn
    inside its cell with a pixel to spare (a random position within the cell)."""
    side, g = config.image_size, config.grid
    cell = side // g
    objects = []
    for index in rng.choice(g * g, size=target, replace=False):
        row, col = divmod(int(index), g)
        shape, color, size, radius, rgb = _draw_object(rng, config, side, low_contrast,
                                                       max_radius=cell / 2 - 1.5)
        margin = int(math.ceil(radius * _EXTENT[shape])) + 1
        x0, y0 = col * cell, row * cell
        x = int(rng.integers(x0 + margin, max(x0 + margin, x0 + cell - margin) + 1))
        y = int(rng.integers(y0 + margin, max(y0 + margin, y0 + cell - margin) + 1))
        objects.append(SceneObject(shape, color, size, x, y, radius, rgb))
    return objects


def sample_scene(rng: np.random.Generator, config: SceneConfig) -> Scene:
    """Draws a scene graph; objects that find no free place after many tries are left out."""
    side = config.image_size
    max_overlap = rng.uniform(0.0, config.max_overlap)
    low_contrast = rng.uniform(0.0, config.max_low_contrast)
    target = int(rng.integers(config.min_objects, config.max_objects + 1))
    objects: list[SceneObject] = []
    if config.grid:
        objects = _grid_objects(rng, config, target, low_contrast)
    for _ in range(0 if config.grid else 200 * target):
        if len(objects) == target:
            break
        shape, color, size, radius, rgb = _draw_object(rng, config, side, low_contrast)
        margin = int(math.ceil(radius * _EXTENT[shape])) + 1
        if 2 * margin >= side:
            continue
        x, y = (int(v) for v in rng.integers(margin, side - margin, size=2))
        candidate = SceneObject(shape, color, size, x, y, radius, rgb)
        if all(_fits(candidate, other, max_overlap) for other in objects):
            objects.append(candidate)
    clutter = []
    for _ in range(int(rng.integers(0, config.max_clutter + 1))):
        x0, y0 = (int(v) for v in rng.integers(0, side, size=2))
        dx, dy = (int(v) for v in rng.integers(-side // 8, side // 8 + 1, size=2))
        clutter.append((x0, y0, x0 + dx, y0 + dy, int(rng.integers(110, 200))))
    overlap = max((_pair_overlap(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]),
                  default=0.0)
    return Scene(side, tuple(objects), tuple(clutter), float(low_contrast), float(overlap))


def _fits(candidate: SceneObject, other: SceneObject, max_overlap: float) -> bool:
    distance = math.hypot(candidate.x - other.x, candidate.y - other.y)
    reach = candidate.extent + other.extent
    if max_overlap <= 0.0:
        return distance >= reach + _GAP
    return distance >= reach * (1.0 - max_overlap)


def render_scene(scene: Scene) -> Image.Image:
    """Draws the scene: clutter first (behind), then objects in order (later ones on top)."""
    side = scene.image_size
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for x0, y0, x1, y1, grey in scene.clutter:
        draw.line((x0, y0, x1, y1), fill=(grey, grey, grey), width=1)
    for obj in scene.objects:
        x, y, r = obj.x, obj.y, obj.radius
        if obj.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=obj.rgb)
        elif obj.shape == "square":
            half = int(round(_SQUARE_HALF * r))
            draw.rectangle((x - half, y - half, x + half, y + half), fill=obj.rgb)
        else:
            dx, dy = int(round(r * math.sqrt(3.0) / 2.0)), int(round(r / 2.0))
            draw.polygon([(x, y - r), (x + dx, y + dy), (x - dx, y + dy)], fill=obj.rgb)
    return image


def perception_difficulty(scene: Scene) -> dict[str, float]:
    """Difficulty of seeing the scene right, per knob and combined, each in [0, 1]."""
    side = scene.image_size
    radii = [o.radius / side for o in scene.objects] or [SIZES["large"][1]]
    parts = {
        "crowding": min(1.0, (len(scene.objects) - 1) / 9.0),
        "smallness": float(np.clip(1.0 - np.mean(radii) / SIZES["large"][1], 0.0, 1.0)),
        "overlap": min(1.0, 2.0 * scene.overlap),
        "clutter": min(1.0, len(scene.clutter) / 20.0),
        "low_contrast": min(1.0, scene.low_contrast / 0.8),
    }
    weights = {"crowding": 0.3, "smallness": 0.2, "overlap": 0.2, "clutter": 0.1,
               "low_contrast": 0.2}
    parts["perception"] = sum(weights[k] * parts[k] for k in weights)
    return parts
