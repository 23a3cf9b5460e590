import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibrl.data import format_prompt, load_examples
from calibrl.data.synthetic import (
    BACKGROUND,
    CELL_PX,
    COLORS,
    LEVELS,
    PLURAL,
    generate_examples,
    generate_problems,
    write_splits,
)

FORMAT = re.compile(r"^<think>.*?</think>.*?<answer>.*?</answer>$", re.DOTALL)  # the verifier's format rule


def test_same_seed_same_bytes_other_seed_other_examples(tmp_path):
    a = write_splits(tmp_path / "a", n_train=12, n_val=4, n_test=4, seed=5)
    b = write_splits(tmp_path / "b", n_train=12, n_val=4, n_test=4, seed=5)
    for split in ("train", "val", "test"):
        assert Path(a[split]).read_bytes() == Path(b[split]).read_bytes()
    assert generate_examples(8, seed=5, split="train") == generate_examples(8, seed=5, split="train")
    assert generate_examples(8, seed=5, split="train") != generate_examples(8, seed=6, split="train")
    assert generate_examples(8, seed=5, split="train") != generate_examples(8, seed=5, split="val")
    assert generate_examples(3, seed=5, split="train") == generate_examples(8, seed=5, split="train")[:3]


def _cell_colors(png_bytes, grid):
    """Set of non-background colours drawn in each grid cell, read back from the image pixels."""
    pixels = np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB"))
    out = []
    for cell in range(grid * grid):
        r, c = divmod(cell, grid)
        block = pixels[r * CELL_PX:(r + 1) * CELL_PX, c * CELL_PX:(c + 1) * CELL_PX].reshape(-1, 3)
        out.append({tuple(int(v) for v in p) for p in block} - {BACKGROUND})
    return out


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_image_answers_are_correct(difficulty):
    problems = generate_problems(24, seed=0, split="train", difficulty=difficulty)
    assert {p.task for p in problems} == {"count-color", "count-shape", "count-total", "compare-shapes"}
    level = LEVELS[difficulty]
    for p in problems:
        ex, scene = p.example, p.scene
        # the image shows the scene: each cell holds exactly the colour of its shape, or nothing
        drawn = _cell_colors(ex.images[0], grid=3)
        expected = [set() for _ in range(9)]
        for s in scene:
            expected[s.cell] = {COLORS[s.color]}
        assert drawn == expected
        assert level.min_objects <= len(scene) <= level.max_objects
        assert {s.color for s in scene} <= set(level.colors) and {s.kind for s in scene} <= set(level.kinds)
        # the answer follows from the scene
        question = ex.prompt[len("<image> "):ex.prompt.index("?") + 1]
        assert ex.prompt == format_prompt(question, 1)
        if p.task == "count-color":
            color = re.match(r"How many (\w+) shapes", question).group(1)
            assert int(ex.answer) == sum(s.color == color for s in scene)
        elif p.task == "count-shape":
            kind = {v: k for k, v in PLURAL.items()}[re.match(r"How many (\w+) are", question).group(1)]
            assert int(ex.answer) == sum(s.kind == kind for s in scene)
        elif p.task == "count-total":
            assert int(ex.answer) == len(scene)
        else:
            circles, squares = sum(s.kind == "circle" for s in scene), sum(s.kind == "square" for s in scene)
            assert circles != squares and ex.answer == ("circles" if circles > squares else "squares")
        (expert,) = ex.experts
        assert FORMAT.match(expert) and expert.endswith(f"<answer>{ex.answer}</answer>") and len(expert) <= 64


@pytest.mark.parametrize("levels", [(0,), (1, 2, 3)])
def test_text_only_answers_are_correct(levels):
    problems = generate_problems(40, seed=1, split="test", difficulty=levels, multimodal=False)
    assert {p.example.data_source for p in problems} == {"synthetic/arith-add", "synthetic/arith-sub"}
    for p in problems:
        ex = p.example
        assert ex.images == () and "<image>" not in ex.prompt
        expr = re.match(r"What is ([\d +-]+)\?", ex.prompt).group(1)
        assert int(ex.answer) == eval(expr) >= 0
        assert FORMAT.match(ex.experts[0]) and ex.experts[0].endswith(f"<answer>{ex.answer}</answer>")


def test_text_level_0_is_a_table_of_45_facts_and_has_no_image_version():
    problems = generate_problems(2000, seed=0, split="train", difficulty=0, multimodal=False)
    facts = {(p.task, p.operands) for p in problems}
    assert len(facts) == 45  # 5 x 5 sums of 0..4, and a - b for 1 <= a <= 5, 0 <= b <= a
    assert max(max(f) for _, f in facts) == 5 and min(min(f) for _, f in facts) == 0
    with pytest.raises(ValueError, match="difficulty=0"):
        generate_problems(1, seed=0, split="train", difficulty=0, multimodal=True)


def test_written_splits_load_cleanly(tmp_path):
    paths = write_splits(tmp_path, n_train=16, n_val=4, n_test=4, seed=0, difficulty=(1, 2, 3))
    examples, report = load_examples([paths["train"]], max_images=1)
    assert report.rows_skipped == 0 and [e.id for e in examples] == [f"train-{i}" for i in range(16)]
    assert len({e.data_source for e in examples}) >= 3
