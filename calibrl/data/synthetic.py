"""A synthetic verifiable task: questions about coloured shapes drawn with PIL, or small arithmetic.

Multi-modal problems put up to one shape in each 28x28 px cell of a small grid image (84x84 px:
a 3x3 grid, which a Qwen2.5-VL processor turns into 9 merged visual tokens, one per cell) and ask

- `synthetic/count-color`    "How many red shapes are there?"      -> an integer
- `synthetic/count-shape`    "How many circles are there?"         -> an integer
- `synthetic/count-total`    "How many shapes are there in total?" -> an integer
- `synthetic/compare-shapes` "Are there more circles or squares?"  -> `circles` or `squares` (never a tie)

The text-only variant asks `synthetic/arith-add` "What is 12 + 7?" and `synthetic/arith-sub`
"What is 45 - 23?". Difficulty 1..3 sets the number of objects, colours and kinds (or the size
and number of operands), so a tiny model learns the easy part first and not all of it at once.

Expert trajectories are short (the tiny tokenizer spends one token per byte), name the grid cells
they read (1..9, row-major), and end with the answer: `<think>red at 1,5 -> 2</think><answer>2</answer>`.

Generation is deterministic: example i of a split draws from `default_rng([seed, crc32(split), i])`,
so the same arguments give byte-identical examples, and a longer split starts with a shorter one.

    python -m calibrl.data.synthetic OUT_DIR [--n-train 512 --n-val 64 --n-test 64 --seed 0 --text-only]
"""

from __future__ import annotations

import argparse
import io
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from calibrl.data.prompts import format_prompt
from calibrl.data.schema import Example, write_examples

CELL_PX = 28
"""Side of one grid cell: one Qwen2.5-VL merged visual token (14 px patches, 2x2 merge)."""
COLORS = {"red": (220, 38, 38), "blue": (37, 99, 235), "green": (22, 163, 74), "yellow": (234, 179, 8)}
KINDS = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
BACKGROUND = (255, 255, 255)

IMAGE_TASKS = ("count-color", "count-shape", "count-total", "compare-shapes")
EXTRA_IMAGE_TASKS = ("color-of",)
"""Image tasks outside the default mix (ask for them with `tasks=`)."""
TEXT_TASKS = ("arith-add", "arith-sub")
TEXT_LEVEL_0 = 0
"""Arithmetic only: operands 0..4 (+) and 1..5 minus 0..itself (-), a table of 45 facts."""


@dataclass(frozen=True)
class Level:
    min_objects: int
    max_objects: int
    colors: tuple[str, ...]
    kinds: tuple[str, ...]


LEVELS = {
    1: Level(1, 3, ("red", "blue"), ("circle", "square")),
    2: Level(2, 5, ("red", "blue", "green"), KINDS),
    3: Level(4, 8, tuple(COLORS), KINDS),
}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cell: int
    """0-based, row-major grid cell; expert trajectories print cell + 1."""
    box: tuple[int, int, int, int]
    """(x0, y0, x1, y1) pixel bounds, inclusive, inside the cell."""


@dataclass(frozen=True)
class Problem:
    """One generated problem: the example plus what it was made from (for checks and analysis)."""

    example: Example
    task: str
    difficulty: int
    scene: tuple[Shape, ...]
    """The shapes drawn in the image; empty for text-only problems."""
    operands: tuple[int, ...]
    """The numbers of an arithmetic problem; empty for image problems."""


# ---------------------------------------------------------------------------------------------
# Scenes


def sample_scene(rng: np.random.Generator, level: Level, grid: int) -> tuple[Shape, ...]:
    n = int(rng.integers(level.min_objects, min(level.max_objects, grid * grid) + 1))
    cells = sorted(int(c) for c in rng.choice(grid * grid, size=n, replace=False))
    shapes = []
    for cell in cells:
        kind = level.kinds[int(rng.integers(len(level.kinds)))]
        color = level.colors[int(rng.integers(len(level.colors)))]
        size = int(rng.integers(14, 23))  # 2 px margin at least on each side of a 28 px cell
        row, col = divmod(cell, grid)
        x0 = col * CELL_PX + int(rng.integers(2, CELL_PX - size - 1))
        y0 = row * CELL_PX + int(rng.integers(2, CELL_PX - size - 1))
        shapes.append(Shape(kind, color, cell, (x0, y0, x0 + size - 1, y0 + size - 1)))
    return tuple(shapes)


def draw_scene(scene: Sequence[Shape], image_px: int) -> bytes:
    """PNG bytes of the scene (no antialiasing: every shape pixel has its palette colour exactly)."""
    img = Image.new("RGB", (image_px, image_px), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene:
        x0, y0, x1, y1 = s.box
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(s.box, fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _cells(shapes: Sequence[Shape]) -> str:
    return ",".join(str(s.cell + 1) for s in shapes) or "none"


def _image_problem(rng: np.random.Generator, task: str, level: Level, grid: int):
    """(scene, question, answer, thought) for one image task."""
    scene = sample_scene(rng, level, grid)
    if task == "count-color":
        color = level.colors[int(rng.integers(len(level.colors)))]
        hits = [s for s in scene if s.color == color]
        question = f"How many {color} shapes are there?"
        return scene, question, str(len(hits)), f"{color} at {_cells(hits)} -> {len(hits)}"
    if task == "count-shape":
        kind = level.kinds[int(rng.integers(len(level.kinds)))]
        hits = [s for s in scene if s.kind == kind]
        plural = PLURAL[kind]
        question = f"How many {plural} are there?"
        return scene, question, str(len(hits)), f"{plural} at {_cells(hits)} -> {len(hits)}"
    if task == "count-total":
        counts = [(c, sum(s.color == c for s in scene)) for c in COLORS]
        terms = "+".join(f"{n} {c}" for c, n in counts if n)
        return scene, "How many shapes are there in total?", str(len(scene)), f"{terms}={len(scene)}"
    if task == "color-of":  # one shape: its colour (perception without counting)
        scene = sample_scene(rng, Level(1, 1, level.colors, level.kinds), grid)
        shape = scene[0]
        return (scene, "What color is the shape?", shape.color,
                f"{shape.kind} at {shape.cell + 1} is {shape.color}")
    if task == "compare-shapes":
        while True:  # redraw until there is no tie (seeded: still deterministic)
            circles = sum(s.kind == "circle" for s in scene)
            squares = sum(s.kind == "square" for s in scene)
            if circles != squares:
                break
            scene = sample_scene(rng, level, grid)
        answer = "circles" if circles > squares else "squares"
        sign = ">" if circles > squares else "<"
        return (scene, "Are there more circles or squares?", answer,
                f"circles {circles}, squares {squares}: {circles}{sign}{squares}")
    raise ValueError(f"unknown image task {task!r}")


def _text_problem(rng: np.random.Generator, task: str, difficulty: int):
    """(operands, question, answer, thought) for one arithmetic task."""
    if task == "arith-add":
        low, high, count = {0: (0, 4, 2), 1: (0, 9, 2), 2: (10, 49, 2), 3: (1, 30, 3)}[difficulty]
        operands = [int(x) for x in rng.integers(low, high + 1, size=count)]
        op = "+"
    elif task == "arith-sub":
        first = int(rng.integers(*{0: (1, 6), 1: (1, 10), 2: (10, 100), 3: (20, 100)}[difficulty]))
        operands, left = [first], first
        for _ in range(2 if difficulty == 3 else 1):
            operands.append(int(rng.integers(0, left + 1)))
            left -= operands[-1]
        op = "-"
    else:
        raise ValueError(f"unknown text task {task!r}")
    steps, total = [], operands[0]
    for x in operands[1:]:
        new = total + x if op == "+" else total - x
        steps.append(f"{total}{op}{x}={new}")
        total = new
    question = "What is " + f" {op} ".join(map(str, operands)) + "?"
    return tuple(operands), question, str(total), ", ".join(steps)


# ---------------------------------------------------------------------------------------------
# Public API


def _levels(difficulty: int | Sequence[int], multimodal: bool) -> tuple[int, ...]:
    levels = (difficulty,) if isinstance(difficulty, int) else tuple(difficulty)
    known = sorted(LEVELS) if multimodal else [TEXT_LEVEL_0, *sorted(LEVELS)]
    if not levels or any(d not in known for d in levels):
        raise ValueError(f"difficulty={difficulty!r}: give levels among {known}")
    return levels


def generate_problems(n: int, *, seed: int, split: str, difficulty: int | Sequence[int] = (1, 2),
                      multimodal: bool = True, image_px: int = 84,
                      tasks: Sequence[str] | None = None) -> list[Problem]:
    """`n` problems; `difficulty` lists the levels drawn from (uniformly, per problem); `tasks` the
    task mix (default: IMAGE_TASKS, or TEXT_TASKS when not multimodal)."""
    levels = _levels(difficulty, multimodal)
    if image_px % CELL_PX or image_px < CELL_PX:
        raise ValueError(f"image_px={image_px} must be a positive multiple of {CELL_PX}")
    grid = image_px // CELL_PX
    tasks = tuple(tasks) if tasks else IMAGE_TASKS if multimodal else TEXT_TASKS
    known = IMAGE_TASKS + EXTRA_IMAGE_TASKS if multimodal else TEXT_TASKS
    if any(t not in known for t in tasks):
        raise ValueError(f"tasks={tasks!r}: choose among {known}")
    split_code = zlib.crc32(split.encode())
    problems = []
    for i in range(n):
        rng = np.random.default_rng([seed, split_code, i])
        task = tasks[int(rng.integers(len(tasks)))]
        level = levels[int(rng.integers(len(levels)))]
        if multimodal:
            scene, question, answer, thought = _image_problem(rng, task, LEVELS[level], grid)
            operands, images = (), (draw_scene(scene, image_px),)
        else:
            operands, question, answer, thought = _text_problem(rng, task, level)
            scene, images = (), ()
        example = Example(id=f"{split}-{i}", prompt=format_prompt(question, len(images)), images=images,
                          answer=answer, experts=(f"<think>{thought}</think><answer>{answer}</answer>",),
                          data_source=f"synthetic/{task}")
        problems.append(Problem(example, task, level, scene, operands))
    return problems


def generate_examples(n: int, *, seed: int, split: str, difficulty: int | Sequence[int] = (1, 2),
                      multimodal: bool = True, image_px: int = 84,
                      tasks: Sequence[str] | None = None) -> list[Example]:
    """`n` examples with ids `{split}-{i}`; same arguments, byte-identical examples."""
    return [p.example for p in generate_problems(n, seed=seed, split=split, difficulty=difficulty,
                                                 multimodal=multimodal, image_px=image_px, tasks=tasks)]


def write_splits(out_dir: str | os.PathLike, *, n_train: int, n_val: int, n_test: int, seed: int,
                 multimodal: bool = True, difficulty: int | Sequence[int] = (1, 2),
                 image_px: int = 84, tasks: Sequence[str] | None = None) -> dict[str, str]:
    """Write `{out_dir}/{train,val,test}.parquet` in the calibrl schema; returns {split: path}."""
    paths = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        examples = generate_examples(n, seed=seed, split=split, difficulty=difficulty, multimodal=multimodal,
                                     image_px=image_px, tasks=tasks)
        paths[split] = write_examples(os.path.join(os.fspath(out_dir), f"{split}.parquet"), examples)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--image-px", type=int, default=84)
    parser.add_argument("--text-only", action="store_true", help="arithmetic questions without images")
    args = parser.parse_args(argv)
    paths = write_splits(args.out_dir, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                         seed=args.seed, multimodal=not args.text_only, difficulty=args.difficulty,
                         image_px=args.image_px)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
