"""The demo world: coloured shapes on a light background, with captions whose truth is known exactly.

One palette, one renderer and one set of caption rules serve everything that needs synthetic images: the training
data of the demo model (``dsdkit world train``), its benchmark and few-shot split (``dsdkit demo-data``), the
``dsdkit tiny-data`` task for random-weight models, and the export's parity images.

A scene holds one object ("a red circle") or two objects of different colours side by side ("a red circle left of
a blue square", or the same scene as "a blue square right of a red circle"). Geometry is stored as fractions of the
image side, so a scene renders at any size; the world's own resolution is :data:`RESOLUTION` (the demo model's).

Everything is a pure function of a seed. Three colour-shape combinations (:data:`HELD_OUT`) never appear in any
training or few-shot image or caption, so the benchmark can measure generalisation to unseen combinations; and no
(caption, layout) of a benchmark item occurs in the training data (enforced by construction, checked by
:func:`check_disjoint`).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.errors import ConfigError
from ..runtime.files import atomic_write_bytes, atomic_write_text, output_error

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "SHAPES",
    "RELATIONS",
    "HELD_OUT",
    "RESOLUTION",
    "TRAINING_SEED",
    "TRAINING_SCENES",
    "Thing",
    "Scene",
    "render",
    "sample_scene",
    "vocabulary",
    "truth",
    "gallery",
    "training_scenes",
    "layout_key",
    "BENCHMARK_SUBSETS",
    "benchmark_items",
    "few_shot_items",
    "check_disjoint",
    "write_demo_data",
    "write_examples",
    "colour_shape_image",
    "write_colour_shapes",
]

RESOLUTION = 64
BACKGROUND = (245, 245, 245)
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 40, 170),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of")
#: Colour-shape combinations that no training or few-shot image or caption contains (one per shape, three colours).
HELD_OUT = frozenset({("red", "triangle"), ("green", "square"), ("blue", "circle")})

# Object sides as fractions of the image side: one object 30-60%, two objects 28-45% (one in each half).
ONE_SIDE = (0.30, 0.60)
TWO_SIDE = (0.28, 0.45)
#: Fraction of training scenes with one object (the rest have two).
ONE_OBJECT_FRACTION = 0.4
#: The demo model's training data: :func:`training_scenes` of this seed and count (the benchmark avoids its layouts).
TRAINING_SEED = 0
TRAINING_SCENES = 20000

Combo = tuple[str, str]
ALL_COMBOS: tuple[Combo, ...] = tuple((c, s) for s in SHAPES for c in COLOURS)
SEEN_COMBOS: tuple[Combo, ...] = tuple(c for c in ALL_COMBOS if c not in HELD_OUT)


@dataclass(frozen=True)
class Thing:
    """One object: colour, shape and its bounding square (left, top, side) as fractions of the image side."""

    colour: str
    shape: str
    x: float
    y: float
    side: float

    @property
    def combo(self) -> Combo:
        return (self.colour, self.shape)

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One or two things; with two, ``things[0]`` is the left one."""

    things: tuple[Thing, ...]

    @property
    def combos(self) -> tuple[Combo, ...]:
        return tuple(t.combo for t in self.things)

    def caption(self, form: int = 0) -> str:
        """The scene's caption: with two things, form 0 is "LEFT left of RIGHT", form 1 "RIGHT right of LEFT"."""
        if len(self.things) == 1:
            return self.things[0].phrase
        left, right = self.things
        return f"{left.phrase} left of {right.phrase}" if form == 0 else f"{right.phrase} right of {left.phrase}"

    def true_captions(self) -> frozenset[str]:
        """Every caption that describes the scene (a relation and its converse are both true)."""
        return frozenset(self.caption(form) for form in range(1 if len(self.things) == 1 else 2))


def two_thing_caption(first: Combo, relation: str, second: Combo) -> str:
    return f"a {first[0]} {first[1]} {relation} a {second[0]} {second[1]}"


def render(scene: Scene, size: int = RESOLUTION):
    """The scene as an RGB PIL image of ``size`` x ``size`` pixels (flat colours, no anti-aliasing)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for thing in scene.things:
        x, y = round(thing.x * size), round(thing.y * size)
        side = max(1, round(thing.side * size))
        fill = COLOURS[thing.colour]
        if thing.shape == "circle":
            draw.ellipse((x, y, x + side - 1, y + side - 1), fill=fill)
        elif thing.shape == "square":
            draw.rectangle((x, y, x + side - 1, y + side - 1), fill=fill)
        else:
            draw.polygon([(x + (side - 1) / 2, y), (x + side - 1, y + side - 1), (x, y + side - 1)], fill=fill)
    return image


def layout_key(scene: Scene, caption: str, size: int = RESOLUTION) -> tuple:
    """What makes two items the same at the world's resolution: the caption and every object's pixel geometry."""
    geometry = tuple(
        (t.colour, t.shape, round(t.x * size), round(t.y * size), round(t.side * size)) for t in scene.things
    )
    return (caption, geometry)


def _place(rng: np.random.Generator, low: float, high: float, x_range: tuple[float, float], size: int):
    """A side in [low, high] and a position inside ``x_range`` horizontally, anywhere vertically (pixel grid)."""
    side_px = int(rng.integers(math.ceil(low * size), math.floor(high * size) + 1))
    x0, x1 = round(x_range[0] * size), round(x_range[1] * size) - side_px
    x = int(rng.integers(x0, max(x0, x1) + 1))
    y = int(rng.integers(0, size - side_px + 1))
    return x / size, y / size, side_px / size


def sample_scene(
    rng: np.random.Generator,
    objects: int,
    combos: tuple[Combo, ...] = SEEN_COMBOS,
    size: int = RESOLUTION,
    fixed: tuple[Combo, ...] | None = None,
) -> Scene:
    """A random scene with ``objects`` (1 or 2) things drawn from ``combos`` (or exactly ``fixed``, left first)."""
    if objects == 1:
        colour, shape = fixed[0] if fixed else combos[int(rng.integers(len(combos)))]
        x, y, side = _place(rng, *ONE_SIDE, (0.0, 1.0), size)
        return Scene((Thing(colour, shape, x, y, side),))
    if fixed:
        left, right = fixed
    else:
        while True:
            left = combos[int(rng.integers(len(combos)))]
            right = combos[int(rng.integers(len(combos)))]
            if left[0] != right[0]:
                break
    things = []
    for combo, half in ((left, (0.0, 0.5)), (right, (0.5, 1.0))):
        x, y, side = _place(rng, *TWO_SIDE, half, size)
        things.append(Thing(combo[0], combo[1], x, y, side))
    return Scene(tuple(things))


def training_scenes(seed: int, count: int, size: int = RESOLUTION) -> Iterator[tuple[Scene, str]]:
    """The demo model's training data: ``count`` (scene, caption) pairs of seen combinations, a pure function of
    ``seed``. Two-object captions use either form at random, so the model learns both relation words."""
    rng = np.random.default_rng([seed, 1])
    for _ in range(count):
        objects = 1 if rng.random() < ONE_OBJECT_FRACTION else 2
        scene = sample_scene(rng, objects, SEEN_COMBOS, size)
        yield scene, scene.caption(int(rng.integers(2)))


# -- benchmark -------------------------------------------------------------------------------------------------

#: Benchmark subsets: name -> what the distractor changes. ``heldout-*`` subsets use scenes with at least one
#: held-out colour-shape combination; ``group-*`` are 2 images x 2 captions (Winoground's scores); ``rank-K`` are
#: the true caption among K.
BENCHMARK_SUBSETS = {
    "colour": "one object; the distractor names another colour",
    "shape": "one object; the distractor names another shape",
    "binding": "two objects of different shapes; the distractor swaps their colours",
    "relation": "two objects; the distractor swaps the relation word (left of <-> right of)",
    "order": "two objects; the distractor swaps the two objects around the same relation word",
    "group-binding": "two images x two captions that differ by a colour swap (Winoground text/image/group)",
    "group-relation": "two images x two captions that differ by the objects' order (Winoground text/image/group)",
    "heldout-colour": "as colour, on held-out combinations",
    "heldout-shape": "as shape, on held-out combinations",
    "heldout-binding": "as binding, with at least one held-out combination",
    "heldout-relation": "as relation, with at least one held-out combination",
    "heldout-order": "as order, with at least one held-out combination",
    "rank-8": "the true caption among 8 (up to half one-edit neighbours, the rest random world captions)",
    "rank-32": "the true caption among 32 (up to half one-edit neighbours, the rest random world captions)",
}


@dataclass(frozen=True)
class Item:
    """One benchmark or few-shot item: scenes (images) and captions, and which caption belongs to which image.

    ``positive`` indexes ``captions`` for an image-to-text item (one scene); for a group (two scenes, two
    captions) caption i belongs to scene i and ``positive`` is ``None``.
    """

    subset: str
    scenes: tuple[Scene, ...]
    captions: tuple[str, ...]
    positive: int | None

    def layout_keys(self) -> set[tuple]:
        return {layout_key(scene, caption) for scene in self.scenes for caption in scene.true_captions()}


def _other(rng: np.random.Generator, options: Iterable[str], not_this: str) -> str:
    choices = [o for o in options if o != not_this]
    return choices[int(rng.integers(len(choices)))]


def _pair_item(subset: str, rng: np.random.Generator, combos: tuple[Combo, ...], heldout: bool) -> Item | None:
    """One two-candidate item of ``subset`` (colour / shape / binding / relation / order), or None to redraw."""
    kind = subset.removeprefix("heldout-")
    distractor_pool = ALL_COMBOS if heldout else SEEN_COMBOS
    if kind in ("colour", "shape"):
        scene = sample_scene(rng, 1, combos)
        thing = scene.things[0]
        if heldout and thing.combo not in HELD_OUT:
            return None
        if kind == "colour":
            wrong = (_other(rng, COLOURS, thing.colour), thing.shape)
        else:
            wrong = (thing.colour, _other(rng, SHAPES, thing.shape))
        if wrong not in distractor_pool:
            return None
        true, false = thing.phrase, f"a {wrong[0]} {wrong[1]}"
    else:
        scene = sample_scene(rng, 2, combos)
        left, right = scene.combos
        if heldout and not (set(scene.combos) & HELD_OUT):
            return None
        form = int(rng.integers(2))
        true = scene.caption(form)
        first, second = (left, right) if form == 0 else (right, left)
        relation = RELATIONS[form]
        if kind == "binding":
            if left[1] == right[1]:
                return None
            swapped = ((second[0], first[1]), (first[0], second[1]))
            if not all(c in distractor_pool for c in swapped):
                return None
            false = two_thing_caption(swapped[0], relation, swapped[1])
        elif kind == "relation":
            false = two_thing_caption(first, RELATIONS[1 - form], second)
        else:  # order
            false = two_thing_caption(second, relation, first)
    if false in scene.true_captions():
        return None
    order = int(rng.integers(2))
    captions = (true, false) if order == 0 else (false, true)
    return Item(subset, (scene,), captions, order)


def _group_item(subset: str, rng: np.random.Generator) -> Item | None:
    first = sample_scene(rng, 2, SEEN_COMBOS)
    left, right = first.combos
    if subset == "group-binding":
        if left[1] == right[1]:
            return None
        other = ((right[0], left[1]), (left[0], right[1]))
    else:
        other = (right, left)
    if not all(c in SEEN_COMBOS for c in other):
        return None
    second = sample_scene(rng, 2, fixed=other)
    form = int(rng.integers(2))
    return Item(subset, (first, second), (first.caption(form), second.caption(form)), None)


def _world_captions() -> list[str]:
    """Every caption of the world over seen combinations (one-object phrases and both relation forms)."""
    out = [f"a {c} {s}" for c, s in SEEN_COMBOS]
    for a in SEEN_COMBOS:
        for b in SEEN_COMBOS:
            if a[0] != b[0]:
                out += [two_thing_caption(a, r, b) for r in RELATIONS]
    return out


def _neighbours(scene: Scene) -> list[str]:
    """Captions one edit away from the scene's truth (colour, shape, relation word, order, colour swap)."""
    out: list[str] = []
    if len(scene.things) == 1:
        colour, shape = scene.combos[0]
        out += [f"a {c} {shape}" for c in COLOURS if c != colour and (c, shape) in SEEN_COMBOS]
        out += [f"a {colour} {s}" for s in SHAPES if s != shape and (colour, s) in SEEN_COMBOS]
        return out
    left, right = scene.combos
    for first, relation, second in ((left, "left of", right), (right, "right of", left)):
        out.append(two_thing_caption(first, RELATIONS[1 - RELATIONS.index(relation)], second))
        out.append(two_thing_caption(second, relation, first))
        swapped = ((second[0], first[1]), (first[0], second[1]))
        if all(c in SEEN_COMBOS for c in swapped):
            out.append(two_thing_caption(swapped[0], relation, swapped[1]))
        for index, (colour, shape) in enumerate((first, second)):
            for c in COLOURS:
                changed = (c, shape)
                other = second if index == 0 else first
                if c != colour and c != other[0] and changed in SEEN_COMBOS:
                    pair = (changed, second) if index == 0 else (first, changed)
                    out.append(two_thing_caption(pair[0], relation, pair[1]))
    return sorted(set(out) - scene.true_captions())


def _rank_item(subset: str, rng: np.random.Generator, everything: list[str]) -> Item:
    k = int(subset.removeprefix("rank-"))
    scene = sample_scene(rng, 1 if rng.random() < ONE_OBJECT_FRACTION else 2, SEEN_COMBOS)
    true = scene.caption(int(rng.integers(2)))
    # A one-object caption naming one of two objects ("a red circle" for red circle + blue square) is true too.
    truths = scene.true_captions() | {t.phrase for t in scene.things}
    near = [c for c in _neighbours(scene) if c not in truths]
    rng.shuffle(near)
    chosen = near[: (k - 1) // 2]
    rest = [c for c in everything if c not in truths and c not in chosen]
    picks = rng.choice(len(rest), size=k - 1 - len(chosen), replace=False)
    candidates = chosen + [rest[int(i)] for i in picks]
    position = int(rng.integers(k))
    candidates.insert(position, true)
    return Item(subset, (scene,), tuple(candidates), position)


def _items(seed: int, subsets: Iterable[str], per_subset: int, salt: int, exclude: set[tuple]) -> list[Item]:
    everything = _world_captions()
    items: list[Item] = []
    for subset in subsets:
        if subset not in BENCHMARK_SUBSETS:
            raise ConfigError(f"unknown world subset {subset!r}; choose from {', '.join(BENCHMARK_SUBSETS)}")
        # Seeded by the subset's name (its place in BENCHMARK_SUBSETS), so a subset's items are the same whichever
        # other subsets are asked for with it.
        rng = np.random.default_rng([seed, salt, list(BENCHMARK_SUBSETS).index(subset)])
        heldout = subset.startswith("heldout-")
        combos = ALL_COMBOS if heldout else SEEN_COMBOS
        made, seen_here = 0, set()
        while made < per_subset:
            if subset.startswith("group-"):
                item = _group_item(subset, rng)
            elif subset.startswith("rank-"):
                item = _rank_item(subset, rng, everything)
            else:
                item = _pair_item(subset, rng, combos, heldout)
            if item is None:
                continue
            keys = item.layout_keys()
            if keys & exclude or keys & seen_here:
                continue
            seen_here |= keys
            items.append(item)
            made += 1
    return items


def vocabulary() -> list[str]:
    """Every caption the world can say, in one phrasing per meaning: the 15 one-object captions and the 180 "A left
    of B" captions over every pair of colour-shape combinations of different colours (held-out ones included)."""
    one = [f"a {colour} {shape}" for colour, shape in ALL_COMBOS]
    two = [two_thing_caption(a, "left of", b) for a in ALL_COMBOS for b in ALL_COMBOS if a[0] != b[0]]
    return one + two


def truth(scene: Scene) -> str:
    """The scene's caption in :func:`vocabulary`'s phrasing (its one meaning there)."""
    return scene.caption(0)


def gallery(
    seed: int,
    count: int,
    one_object_fraction: float = ONE_OBJECT_FRACTION,
    combos: tuple[Combo, ...] = ALL_COMBOS,
    training_seed: int = TRAINING_SEED,
    training_count: int = TRAINING_SCENES,
) -> list[Scene]:
    """``count`` scenes of ``combos`` (default: every colour-shape combination, the held-out ones included; one
    object with probability ``one_object_fraction``), none of whose layouts occurs in the training data: a gallery
    to search and rank against :func:`vocabulary`."""
    exclude = training_layouts(training_seed, training_count)
    rng = np.random.default_rng([seed, 4])
    scenes: list[Scene] = []
    seen: set[tuple] = set()
    while len(scenes) < count:
        scene = sample_scene(rng, 1 if rng.random() < one_object_fraction else 2, combos)
        key = layout_key(scene, truth(scene))
        if key in exclude or key in seen:
            continue
        seen.add(key)
        scenes.append(scene)
    return scenes


def training_layouts(seed: int, count: int) -> set[tuple]:
    """Layout keys of every training pair (see :func:`layout_key`), for keeping test items out of training."""
    return {layout_key(scene, caption) for scene, caption in training_scenes(seed, count)}


def benchmark_items(
    seed: int = 0,
    per_subset: int = 200,
    subsets: Iterable[str] = tuple(BENCHMARK_SUBSETS),
    training_seed: int = TRAINING_SEED,
    training_count: int = TRAINING_SCENES,
) -> list[Item]:
    """The world benchmark: ``per_subset`` items of each subset, none of whose (caption, layout) occurs in the
    training data of ``training_seed``/``training_count`` (the demo model's: seed 0, 20,000 scenes)."""
    exclude = training_layouts(training_seed, training_count)
    return _items(seed, subsets, per_subset, 2, exclude)


FEW_SHOT_SUBSETS = ("relation", "order", "binding", "colour", "shape")


def few_shot_items(seed: int = 0, per_subset: int = 64, exclude: set[tuple] | None = None) -> list[Item]:
    """A few-shot training split for adapters: two-candidate items of seen combinations only (held-out
    combinations never appear), disjoint from the benchmark's layouts when ``exclude`` holds them."""
    return _items(seed, FEW_SHOT_SUBSETS, per_subset, 3, exclude or set())


def check_disjoint(test: list[Item], training: set[tuple], few_shot: list[Item] | None = None) -> None:
    """Raise ``AssertionError`` if a test item's (caption, layout) occurs in training or in the few-shot split, or
    if a held-out combination appears in the few-shot split."""
    test_keys = set().union(*(item.layout_keys() for item in test)) if test else set()
    overlap = test_keys & training
    if overlap:
        raise AssertionError(f"{len(overlap)} test layouts occur in the training data, e.g. {next(iter(overlap))}")
    if few_shot:
        shot_keys = set().union(*(item.layout_keys() for item in few_shot))
        if test_keys & shot_keys:
            raise AssertionError("a test layout occurs in the few-shot split")
        for item in few_shot:
            for scene in item.scenes:
                if set(scene.combos) & HELD_OUT:
                    raise AssertionError(f"held-out combination in few-shot item {item.captions}")
            for caption in item.captions:
                if any(f"{c} {s}" in caption for c, s in HELD_OUT):
                    raise AssertionError(f"held-out combination in few-shot caption {caption!r}")


# -- files -----------------------------------------------------------------------------------------------------

#: The example images ``dsdkit demo-data`` writes for ``dsdkit match``: one caption each, all different. Two of them
#: are the same objects with left and right swapped, so the job needs the relation, not only the words.
EXAMPLE_SCENES: tuple[tuple[Combo, ...], ...] = (
    (("red", "circle"),),
    (("blue", "square"),),
    (("green", "triangle"),),
    (("yellow", "circle"),),
    (("purple", "square"),),
    (("red", "square"), ("blue", "triangle")),
    (("blue", "triangle"), ("red", "square")),
    (("green", "circle"), ("red", "square")),
)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_examples(folder: str | os.PathLike, seed: int = 0, size: int = RESOLUTION) -> Path:
    """The eight :data:`EXAMPLE_SCENES` as ``NN-<caption>.png`` plus ``captions.txt`` (their captions, one per
    line, in file order) in ``folder``: the README's try-it job (``examples/demo`` in the repository is this)."""

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc) from None
    rng = np.random.default_rng([seed, 4])
    captions = []
    for number, combos in enumerate(EXAMPLE_SCENES):
        scene = sample_scene(rng, len(combos), fixed=combos)
        caption = scene.caption(0)
        captions.append(caption)
        atomic_write_bytes(folder / f"{number:02d}-{caption.replace(' ', '-')}.png", _png(render(scene, size)))
    atomic_write_text(folder / "captions.txt", "\n".join(captions) + "\n")
    return folder


def _item_record(item: Item, names: list[str], split: str, ident: str) -> dict:
    record: dict = {"id": ident, "split": split, "subset": item.subset}
    if item.positive is None:
        record.update(images=names, captions=list(item.captions))
    else:
        record.update(image=names[0], captions=list(item.captions), positive=item.positive)
    return record


def write_demo_data(
    folder: str | os.PathLike, per_subset: int = 200, shots: int = 64, seed: int = 0, size: int = RESOLUTION
) -> dict[str, Path]:
    """Write the demo world's files for ``dsdkit match``, ``dsdkit eval`` and ``dsdkit train``.

    - ``examples/``: :func:`write_examples` (eight scenes and ``captions.txt``, for ``dsdkit match``);
    - ``benchmark.jsonl``: :func:`benchmark_items` (split ``test``, a ``subset`` per line), images in ``images/``;
    - ``fewshot.jsonl``: :func:`few_shot_items` (split ``train``) plus 40 held-out items per few-shot subset
      (split ``val``) for the trainer's periodic evaluation.

    Every file is written atomically, the JSONL files last. Returns the paths by name.
    """

    if per_subset < 1 or shots < 1:
        raise ConfigError("demo data needs `per_subset` >= 1 and `shots` >= 1", field="per_subset")
    folder = Path(folder)
    try:
        (folder / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc) from None
    write_examples(folder / "examples", seed=seed, size=size)

    training = training_layouts(TRAINING_SEED, TRAINING_SCENES)
    test = _items(seed, BENCHMARK_SUBSETS, per_subset, 2, training)
    test_keys = set().union(*(item.layout_keys() for item in test))
    shots_train = _items(seed, FEW_SHOT_SUBSETS, shots, 3, training | test_keys)
    shot_keys = set().union(*(item.layout_keys() for item in shots_train))
    shots_val = _items(seed, FEW_SHOT_SUBSETS, 40, 5, training | test_keys | shot_keys)
    check_disjoint(test, training, shots_train + shots_val)

    paths = {"examples": folder / "examples", "captions": folder / "examples" / "captions.txt"}
    for name, groups in (("benchmark", [("test", test)]), ("fewshot", [("train", shots_train), ("val", shots_val)])):
        lines = []
        for split, items in groups:
            for number, item in enumerate(items):
                ident = f"{name}-{split}-{number:05d}"
                names = []
                for k, scene in enumerate(item.scenes):
                    relative = f"images/{ident}-{k}.png"
                    atomic_write_bytes(folder / relative, _png(render(scene, size)))
                    names.append(relative)
                lines.append(json.dumps(_item_record(item, names, split, ident)))
        path = folder / f"{name}.jsonl"
        atomic_write_text(path, "\n".join(lines) + "\n")
        paths[name] = path
    return paths


# -- views for random-weight models and export parity -----------------------------------------------------------


def colour_shape_image(colour: str, shape: str, rng: np.random.Generator, size: int = 128):
    """One large object (55-95% of the side) at a random place: the ``tiny-data`` task's and parity's images."""
    side_px = int(rng.integers(int(0.55 * size), int(0.95 * size)))
    x, y = (int(v) for v in rng.integers(0, size - side_px + 1, 2))
    return render(Scene((Thing(colour, shape, x / size, y / size, side_px / size),)), size)


def write_colour_shapes(folder: str | os.PathLike, train: int = 256, test: int = 100, seed: int = 0) -> Path:
    """The ``dsdkit tiny-data`` task: which of four colour captions ("a red shape", ...) fits each large shape.

    The four colours are the first four of the world's palette (red, green, blue, yellow); chance is 25%.

    Writes ``images/`` and ``data.jsonl`` (splits ``train`` and ``test``) to ``folder``; returns the JSONL path.
    Every file is written atomically and ``data.jsonl`` last, so an interrupted run or a full disk (an
    ``OutputError``) never leaves a dataset file that lists missing or half-written images.
    """

    if train < 1 or test < 0:
        raise ConfigError("tiny-data needs at least one training example")
    folder = Path(folder)
    try:
        (folder / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder / "images", exc) from None
    rng = np.random.default_rng(seed)
    names = list(COLOURS)[:4]
    captions = [f"a {colour} shape" for colour in names]
    lines = []
    for split, count in (("train", train), ("test", test)):
        for index in range(count):
            colour = names[int(rng.integers(len(names)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            relative = f"images/{split}_{index:04d}_{colour}_{shape}.png"
            atomic_write_bytes(folder / relative, _png(colour_shape_image(colour, shape, rng)))
            record = {"image": relative, "captions": captions, "positive": names.index(colour), "split": split}
            lines.append(json.dumps(record))
    path = folder / "data.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
