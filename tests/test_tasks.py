"""Task data: deterministic, held out, honest (the answer is what the image shows), and the real-dataset paths
in the schemas of BUAADreamer/clevr_count_70k, hiyouga/geometry3k and lmms-lab/RefCOCO."""

import ast
import collections
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

from common import tasks

TWINS = [name for name, task in tasks.TASKS.items() if task.examples is not None]  # offline twins (MAT has none: tests/test_mat.py)


@pytest.mark.parametrize("task", TWINS)
def test_same_split_and_size_give_identical_examples(task):
    a, b = tasks.load_task(task, "train", 30), tasks.load_task(task, "train", 30)
    assert [e.image.tobytes() for e in a] == [e.image.tobytes() for e in b]
    assert [(e.question, e.answer) for e in a] == [(e.question, e.answer) for e in b]
    assert len({e.image.tobytes() for e in a}) > 25  # and they are not one image repeated


@pytest.mark.parametrize("task", TWINS)
@pytest.mark.parametrize("trained_split, n_trained", [("train", 2000), ("warmstart", 2000)])
def test_no_eval_image_appears_in_a_split_the_model_learns_from(task, trained_split, n_trained):
    trained = {e.image.tobytes() for e in tasks.load_task(task, trained_split, n_trained)}
    evals = tasks.load_task(task, "eval", 500)
    leaked = [i for i, e in enumerate(evals) if e.image.tobytes() in trained]
    assert leaked == [], f"eval examples {leaked} (answers {[evals[i].answer for i in leaked]}) are {trained_split} images"


@pytest.fixture(scope="module")
def eval_scenes():
    """500 held-out examples with the objects drawn in each: (example, [(shape, colour, radius, x, y), ...])."""
    examples = tasks.load_task("counting", "eval", 500)
    scenes = [tasks.draw_scene(e.seed, tasks.SceneSpec()) for e in examples]
    assert all(e.image.tobytes() == image.tobytes() for e, (image, _) in zip(examples, scenes))
    return [(e, objects) for e, (_, objects) in zip(examples, scenes)]


def test_eval_answer_is_the_number_of_objects_drawn(eval_scenes):
    assert all(e.answer == str(len(objects)) for e, objects in eval_scenes)


def test_eval_answers_are_spread_so_a_constant_guess_scores_low(eval_scenes):
    counts = collections.Counter(e.answer for e, _ in eval_scenes)
    assert len(counts) >= 5, counts
    assert max(counts.values()) / len(eval_scenes) <= 0.35, counts


def test_eval_scenes_mix_shapes_and_colours(eval_scenes):
    shapes = {shape for _, objects in eval_scenes for shape, *_ in objects}
    colours = {colour for _, objects in eval_scenes for _, colour, *_ in objects}
    assert len(shapes) >= 2 and len(colours) >= 2, (shapes, colours)


def assert_separate_and_inside(objects, size):
    """Every object fully inside the image, and no two bounding circles overlap (so each one is countable)."""
    for i, (_, _, r1, x1, y1) in enumerate(objects):
        assert r1 <= x1 <= size - r1 and r1 <= y1 <= size - r1, objects
        for _, _, r2, x2, y2 in objects[:i]:
            assert math.dist((x1, y1), (x2, y2)) >= r1 + r2, objects


def test_eval_objects_neither_overlap_nor_leave_the_image(eval_scenes):
    for e, objects in eval_scenes:
        assert_separate_and_inside(objects, e.image.size[0])


@pytest.mark.parametrize("cell", [0, 16])  # free placement (rejection sampling) and one object per grid cell
def test_both_layouts_keep_objects_separate_and_inside(cell):
    spec = tasks.SceneSpec(image_size=64, min_count=1, max_count=5, cell=cell)
    for seed in range(300):
        assert_separate_and_inside(tasks.draw_scene(seed, spec)[1], 64)


def test_math_answer_is_the_sum_of_the_numbers_drawn():
    examples = tasks.load_task("math", "eval", 300)
    for e in examples:
        image, numbers = tasks.draw_numbers(e.seed)
        assert image.tobytes() == e.image.tobytes() and e.answer == str(sum(numbers))
    sums = collections.Counter(e.answer for e in examples)
    assert len(sums) == 2 * tasks.MAX_ADDEND - 1, sums  # every sum occurs
    assert max(sums.values()) / len(examples) <= 0.3, sums  # a constant guess scores low


def test_math_numbers_are_drawn_inside_their_own_half():
    for seed in range(200):
        image, _ = tasks.draw_numbers(seed)
        ink = [(x, y) for x in range(64) for y in range(64) if image.getpixel((x, y)) != (128, 128, 128)]
        left, right = [x for x, _ in ink if x < 32], [x for x, _ in ink if x >= 32]
        assert len(left) > 20 and len(right) > 20, seed  # both numbers visible, neither spills into the other half


def test_grounding_answer_is_the_box_of_the_one_object_named():
    examples = tasks.load_task("grounding", "eval", 300)
    centres = set()
    for e in examples:
        image, objects = tasks.draw_scene(e.seed, tasks.GROUNDING_SCENE)
        assert image.tobytes() == e.image.tobytes()
        named = [o for o in objects if f"the {o[1]} {o[0]}." in e.question]
        assert len(named) == 1, (e.question, objects)  # the description picks out exactly one object
        shape, colour, r, x, y = named[0]
        truth = json.loads(e.answer)
        assert truth["image_size"] == [64, 64]
        assert truth["box"] == pytest.approx([x - r, y - r, x + r, y + r], abs=0.01)
        centres.add((round(x) // 16, round(y) // 16))
    assert len(centres) >= 12  # targets are all over the image


def test_grounding_scenes_follow_their_spec_with_distinct_colours_and_shaded_cells():
    spec = tasks.GROUNDING_SCENE
    examples = tasks.load_task("grounding", "eval", 200)
    counts = [len(tasks.draw_scene(e.seed, spec)[1]) for e in examples]
    assert min(counts) >= spec.min_count and max(counts) <= spec.max_count
    crowded = tasks.SceneSpec(**{**spec.__dict__, "min_count": 3, "max_count": 4})  # the knob for larger models
    for seed in range(100):
        image, objects = tasks.draw_scene(seed, crowded)
        assert len({colour for _, colour, *_ in objects}) == len(objects)  # "the red circle" names one object
    # each cell's background is a cue to where it is, one per axis: the column sets the brightness (green), the
    # row the tint (red minus blue)
    (tl, tr), (bl, br) = [[image.getpixel((x, y)) for x in (1, 62)] for y in (1, 62)]
    assert tl[1] == bl[1] != tr[1] == br[1], (tl, tr, bl, br)
    assert tl[0] - tl[2] == tr[0] - tr[2] != bl[0] - bl[2] == br[0] - br[2], (tl, tr, bl, br)


def test_unknown_task_exits_naming_the_choices():
    with pytest.raises(SystemExit, match=r"unknown task 'cnt'.*counting"):
        tasks.load_task("cnt", "train", 1)
    with pytest.raises(SystemExit, match=r"unknown task 'cnt'; choose one of: counting, math, grounding, zoom, mat-search, mat-coding$"):
        tasks.get_task("cnt")


@pytest.mark.parametrize("task", TWINS)
def test_the_ideal_response_earns_the_full_reward(task):
    """What the tiny model's warm start imitates is right: 1 (grounding: the box rounded to the 0-1000 frame, IoU ~1)."""
    record = tasks.get_task(task)
    for e in tasks.load_task(task, "warmstart", 50):
        reward = record.reward_fn()(tasks.ideal_response(task, e), e.answer)
        assert reward == (pytest.approx(1.0, abs=0.05) if record.metric == "iou" else 1.0), (e.answer, tasks.ideal_response(task, e))


def test_the_ideal_zoom_episode_looks_at_the_card_whose_digit_it_answers():
    for e in tasks.load_task("zoom", "warmstart", 20):
        call, answer = tasks.ideal_turns("zoom", e)
        face = tasks.zoom_tool(re.fullmatch(r"<tool>zoom\((\d)\)</tool>", call).group(1), e)
        assert face.tobytes() == tasks.draw_card_face(int(e.answer)).tobytes() and answer == f"<answer>{e.answer}</answer>"


def test_summarize_counts_rewards_at_success_as_right_and_logs_the_mean_as_the_metric():
    assert tasks.get_task("counting").summarize([1.0, 0.0, 1.0, 0.5], "eval") == {"eval/accuracy": 0.5}
    assert tasks.get_task("grounding").summarize([0.5, 0.49, 1.0, 0.01], "charts") == {"charts/accuracy": 0.5, "charts/iou": 0.5}
    assert tasks.get_task("mat-search").summarize([], "eval") == {"eval/accuracy": 0.0, "eval/f1": 0.0}


# ---------------------------------------------------------------------------------------------- import circles
def import_graph(folder: Path) -> dict[str, set[str]]:
    """Each module of the package `folder` -> the package's modules it imports, at module level or inside a function
    (read with ast: nothing runs). `from pkg import name` counts as importing pkg.name when that is a module."""
    modules = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                module = ".".join(p for p in (base, node.module) if p)
                imported |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as [a, b, ..., a], or None: a depth-first search that meets a module still on its path."""
    state = {}  # module -> "open" (on the current path) or "done"

    def visit(path):
        state[path[-1]] = "open"
        for nxt in sorted(graph[path[-1]]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(path + [nxt])):
                return cycle
        state[path[-1]] = "done"
        return None

    return next((cycle for module in sorted(graph) if module not in state and (cycle := visit([module]))), None)


def test_common_has_no_import_circles(repo_root):
    graph = import_graph(Path(repo_root) / "common")
    assert "common.sandbox" in graph["common.tasks"]  # an import inside a function (python_tool's) is seen
    cycle = find_cycle(graph)
    assert cycle is None, f"common/ imports in a circle: {' -> '.join(cycle)}; move the shared code to one side"


def test_the_circle_check_finds_a_circle_closed_inside_a_function(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("import os\nfrom pkg.b import f\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from . import a  # imported here: a imports this module\n")
    (tmp_path / "pkg" / "c.py").write_text("from pkg import a, b\n")
    graph = import_graph(tmp_path / "pkg")
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg", "pkg.a"}, "pkg.c": {"pkg", "pkg.a", "pkg.b"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


# ---------------------------------------------------------------------------------------------- real dataset
FEATURES = datasets.Features(
    {"images": datasets.Sequence(datasets.Image()), "problem": datasets.Value("string"), "answer": datasets.Value("string")}
)
SOLID = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90), (250, 250, 0)]


def clevr_like(n: int, first: int = 0) -> datasets.Dataset:
    """n rows in the clevr_count_70k schema; row i is a solid-colour image with answer str(first + i)."""
    return datasets.Dataset.from_dict(
        {
            "images": [[Image.new("RGB", (32, 32), SOLID[(first + i) % 5])] for i in range(n)],
            "problem": ["<image>How many items are there in the image?"] * n,
            "answer": [str(first + i) for i in range(n)],
        },
        features=FEATURES,
    )


def check_rows(examples, answers):
    question = "How many items are there in the image? Answer with <answer>N</answer>."
    assert [e.answer for e in examples] == answers
    assert all(e.question == question for e in examples)
    for e, a in zip(examples, answers):
        assert e.image.mode == "RGB" and e.image.size == (32, 32)
        assert e.image.getpixel((5, 5)) == SOLID[int(a) % 5]


def test_real_dataset_saved_with_save_to_disk_loads(tmp_path):
    clevr_like(5).save_to_disk(str(tmp_path / "ds"))
    examples = tasks.load_task("counting", "train", 3, dataset=str(tmp_path / "ds"))
    assert len(examples) == 3
    check_rows(examples, [e.answer for e in examples])  # which rows: the held-out test below


def test_real_dataset_dict_gives_train_rows_and_test_rows_for_eval(tmp_path):
    datasets.DatasetDict({"train": clevr_like(5), "test": clevr_like(3, first=10)}).save_to_disk(str(tmp_path / "dd"))
    check_rows(tasks.load_task("counting", "train", 3, dataset=str(tmp_path / "dd")), ["0", "1", "2"])
    check_rows(tasks.load_task("counting", "eval", 2, dataset=str(tmp_path / "dd")), ["10", "11"])


def test_real_dataset_without_test_split_holds_out_a_tenth_that_is_never_trained_on(tmp_path):
    datasets.DatasetDict({"train": clevr_like(30)}).save_to_disk(str(tmp_path / "dd"))

    def load(split, n):
        examples = tasks.load_task("counting", split, n, dataset=str(tmp_path / "dd"))
        check_rows(examples, [e.answer for e in examples])
        return [e.answer for e in examples]

    train, held_out = load("train", 1000), load("eval", 1000)  # more rows than there are: all of each part
    assert len(held_out) == 3 and sorted(train + held_out, key=int) == [str(i) for i in range(30)]  # 10%, disjoint
    assert load("eval", 2) == held_out[:2] and load("train", 5) == train[:5]  # the same rows whatever the sizes
    assert held_out != ["27", "28", "29"]  # drawn from the whole split, not its end (a sorted dataset's end differs)


def test_a_dataset_without_a_train_split_never_evaluates_on_the_rows_it_trains_on(tmp_path, capsys):
    # the hub's RefCOCO parquet folder has val, test, testA, testB; a DatasetDict whose first split is test once
    # trained on test and evaluated on test, the same rows
    datasets.DatasetDict({"test": clevr_like(4, first=10), "val": clevr_like(5, first=20)}).save_to_disk(str(tmp_path / "a"))
    check_rows(tasks.load_task("counting", "train", 2, dataset=str(tmp_path / "a")), ["20", "21"])
    check_rows(tasks.load_task("counting", "eval", 2, dataset=str(tmp_path / "a")), ["10", "11"])
    printed = capsys.readouterr().out
    assert "train rows from split 'val' (2 of 5)" in printed and "eval rows from split 'test' (2 of 4)" in printed
    datasets.DatasetDict({"test": clevr_like(30)}).save_to_disk(str(tmp_path / "b"))  # one split: a share held out
    trained = {e.answer for e in tasks.load_task("counting", "train", 30, dataset=str(tmp_path / "b"))}
    held_out = {e.answer for e in tasks.load_task("counting", "eval", 30, dataset=str(tmp_path / "b"))}
    assert len(trained) == 27 and len(held_out) == 3 and not trained & held_out
    assert "eval rows from a held-out 10% of split 'test' (3 of 30)" in capsys.readouterr().out


def test_too_few_rows_end_the_run_with_one_line_before_training_and_a_small_eval_split_is_named(tmp_path, capsys):
    # once: "Sample larger than population" at step 1, an IndexError, and eval on 1 row of --eval-size 8 without a word
    from common.policy import load_data

    def load(rows, check_rows=2, eval_size=8):
        path = str(tmp_path / f"ds{len(list(tmp_path.iterdir()))}")
        datasets.DatasetDict(rows).save_to_disk(path)
        return load_data("counting", path, 100, eval_size, "tiny", None, None, 512, check_rows=check_rows)

    with pytest.raises(SystemExit, match=r"has 2 training rows, fewer than --prompts-per-step 4: lower"):
        load({"train": clevr_like(2), "test": clevr_like(5, first=10)}, check_rows=4)
    with pytest.raises(SystemExit, match=r"split 'test' has no rows: drop it"):
        load({"train": clevr_like(4), "test": clevr_like(0)})
    train, held_out = load({"train": clevr_like(4), "test": clevr_like(5, first=10)})
    assert (len(train), len(held_out)) == (4, 5)
    assert "has 5 held-out rows (--eval-size 8): eval/ metrics move in steps of 1/5" in capsys.readouterr().out


def test_a_16_bit_image_keeps_its_greys_and_a_missing_answer_is_named(tmp_path):
    # once: a 16-bit greyscale PNG (I;16) became 99.5 % white through convert("RGB"); a None answer became "None"
    greys = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0..65472
    png = io.BytesIO()
    Image.fromarray(greys).save(png, "PNG")
    rows = clevr_like(2).to_dict()
    rows["images"] = [[{"bytes": png.getvalue(), "path": None}]] * 2
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=FEATURES)}).save_to_disk(str(tmp_path / "a"))
    (example,) = tasks.load_task("counting", "train", 1, dataset=str(tmp_path / "a"))
    pixels = np.asarray(example.image)
    assert pixels.shape == (32, 32, 3) and (pixels == 255).mean() < 0.01
    assert abs(int(pixels[-1, -1, 0]) - greys[-1, -1] / 257) <= 1 and pixels[0, 0, 0] == 0
    rows = clevr_like(3).to_dict()
    rows["answer"][1] = None
    rows = datasets.Dataset.from_dict(rows, features=FEATURES)
    datasets.DatasetDict({"train": rows, "test": clevr_like(1)}).save_to_disk(str(tmp_path / "b"))  # rows in order
    with pytest.raises(SystemExit, match=r"row 1: no ground truth \(None\); fix or drop the row"):
        tasks.load_task("counting", "train", 3, dataset=str(tmp_path / "b"))


def test_a_hub_id_loads_offline_from_the_hf_cache_and_so_does_one_parquet_file(tmp_path):
    # once: "ConnectionError ... OfflineModeIsEnabled" for a dataset hub id whose snapshot is in HF_HOME (a model's
    # loads), and "Couldn't find any data file" for one parquet file given as --dataset
    revision = "0" * 40
    repo = tmp_path / "hf" / "hub" / "datasets--org--clevr"
    (repo / "snapshots" / revision / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    parquet = repo / "snapshots" / revision / "data" / "train-00000-of-00001.parquet"
    clevr_like(5).to_parquet(str(parquet))
    code = (f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from common import tasks\n"
            "print([e.answer for e in tasks.load_task('counting', 'train', 3, dataset=sys.argv[1])])")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}  # a cache that holds nothing prepared
    for dataset in ("org/clevr", str(parquet)):
        out = subprocess.run([sys.executable, "-c", code, dataset], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        answers = ast.literal_eval(out.stdout.strip().splitlines()[-1])
        assert len(answers) == 3 and set(answers) <= {str(i) for i in range(5)}, (dataset, answers)


def png_bytes(size=(32, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, SOLID[0]).save(out, "PNG")
    return out.getvalue()


BAD_ROWS = {  # column: a bad value, what the line says (once each was a traceback mid-run, or none at all)
    "corrupt-bytes": ("images", [{"bytes": b"not an image", "path": None}], "an image that does not open"),
    "truncated-png": ("images", [{"bytes": png_bytes()[:-30], "path": None}], "an image that does not open"),
    "no-image": ("images", [None], "no image (None)"),
    "empty-image-list": ("images", [], "no image (an empty list)"),
    "thin-image": ("images", [{"bytes": png_bytes((800, 3)), "path": None}], "a 800x3 image"),
    "no-question": ("problem", None, "no question text (None)"),
}


@pytest.mark.parametrize("column, value, message", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_every_row_used_is_checked_before_training_and_a_bad_one_is_named(tmp_path, column, value, message):
    rows = clevr_like(24).to_dict()
    rows[column][20] = value  # row 20: past the first --prompts-per-step rows, all that were checked once
    rows = datasets.Dataset.from_dict(rows, features=FEATURES)
    datasets.DatasetDict({"train": rows, "test": clevr_like(2)}).save_to_disk(str(tmp_path / "ds"))  # rows in order
    with pytest.raises(SystemExit, match=rf"split 'train' row 20: {re.escape(message)}.*; fix or drop the row"):
        tasks.load_task("counting", "train", 24, dataset=str(tmp_path / "ds"))


@pytest.mark.parametrize("expressions, box, message", [
    ([], [1, 2, 3, 4], r"no question text \(\[\]\)"),
    (["the cat"], [20, 2, 14, 4], r"bbox \[20.0, 2.0, 14.0, 4.0\] reaches outside the 32x32 image"),  # x + w = 34 > 32 + 1
])  # fmt: skip
def test_a_refcoco_row_without_referring_expressions_or_with_a_box_outside_its_image_is_named(tmp_path, expressions, box, message):
    features = datasets.Features({"image": datasets.Image(), "answer": datasets.Sequence(datasets.Value("string")),
                                  "bbox": datasets.Sequence(datasets.Value("float32"))})  # fmt: skip
    rows = datasets.Dataset.from_dict({"image": [Image.new("RGB", (32, 32))] * 2, "answer": [["the cat"], expressions],
                                       "bbox": [[1, 2, 31, 30], box]}, features=features)  # fmt: skip
    datasets.DatasetDict({"val": rows, "test": rows}).save_to_disk(str(tmp_path / "refcoco"))
    with pytest.raises(SystemExit, match=rf"split 'val' row 1: {message}"):
        tasks.load_task("grounding", "train", 2, dataset=str(tmp_path / "refcoco"))


def test_a_real_datasets_images_stay_encoded_until_used(tmp_path):
    # decoded at load, 20,000 CLEVR rows (--train-size's default) held 11.5 GiB per process
    datasets.DatasetDict({"train": clevr_like(4), "test": clevr_like(2)}).save_to_disk(str(tmp_path / "ds"))
    examples = tasks.load_task("counting", "train", 4, dataset=str(tmp_path / "ds"))
    assert all(isinstance(e.source, bytes) and len(e.source) < 1000 for e in examples)  # a 32x32 PNG's file
    assert examples[0].image.size == (32, 32) and examples[0].image.getpixel((5, 5)) == SOLID[0]


@pytest.mark.parametrize("column", ["images", "problem", "answer"])
def test_real_dataset_lacking_a_column_exits_naming_it(tmp_path, column):
    datasets.DatasetDict({"train": clevr_like(3).remove_columns(column)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(SystemExit, match=f"lacks columns \\['{column}'\\]"):
        tasks.load_task("counting", "train", 3, dataset=str(tmp_path / "dd"))


def test_geometry3k_schema_loads_for_math_with_the_boxed_instruction(tmp_path):
    rows = datasets.Dataset.from_dict(
        {"images": [[Image.new("RGB", (40, 30), (1, 2, 3))]] * 2, "problem": ["<image>Find x.", "<image>Find y."],
         "answer": ["3\\sqrt{2}", "12"]},
        features=FEATURES,
    )  # fmt: skip
    datasets.DatasetDict({"train": rows, "test": rows}).save_to_disk(str(tmp_path / "g3k"))  # train, test as Geometry3K
    examples = tasks.load_task("math", "train", 2, dataset=str(tmp_path / "g3k"))
    assert [e.question for e in examples] == ["Find x. Put the final answer in \\boxed{}.", "Find y. Put the final answer in \\boxed{}."]
    assert [e.answer for e in examples] == ["3\\sqrt{2}", "12"]
    assert tasks.math_reward("\\boxed{\\sqrt{18}}", examples[0].answer) == 1.0


def test_refcoco_schema_loads_for_grounding_with_coco_boxes_converted(tmp_path):
    features = datasets.Features(
        {"image": datasets.Image(), "answer": datasets.Sequence(datasets.Value("string")),
         "bbox": datasets.Sequence(datasets.Value("float32"))}
    )  # fmt: skip
    rows = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (200, 100))] * 2, "answer": [["man on left", "left guy"], ["red car"]],
         "bbox": [[10, 20, 30, 40], [0, 0, 200, 100]]},
        features=features,
    )  # fmt: skip
    # lmms-lab/RefCOCO has no train split: val, test, testA, testB
    datasets.DatasetDict({"val": rows, "test": rows}).save_to_disk(str(tmp_path / "refcoco"))
    examples = tasks.load_task("grounding", "train", 2, dataset=str(tmp_path / "refcoco"))
    assert examples[0].question == "Locate man on left. Answer with <answer>[x1, y1, x2, y2]</answer>."
    assert json.loads(examples[0].answer) == {"box": [10, 20, 40, 60], "image_size": [200, 100]}  # x, y, w, h → x1..y2
    # a right answer in the 0-1000 frame: [10/200, 20/100, 40/200, 60/100] * 1000
    assert tasks.grounding_reward("<answer>[50, 200, 200, 600]</answer>", examples[0].answer) == pytest.approx(1.0)


@pytest.mark.parametrize("task, column", [("math", "problem"), ("grounding", "bbox")])
def test_real_dataset_of_another_task_lacking_a_column_exits_naming_it(tmp_path, task, column):
    datasets.DatasetDict({"train": clevr_like(3).remove_columns("problem")}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(SystemExit, match=f"lacks columns .*'{column}'"):
        tasks.load_task(task, "train", 3, dataset=str(tmp_path / "dd"))


BAD_LAST_ANSWER = [  # the last answer of each is one the task's reward cannot grade ('3.0' crashed counting's int())
    ("counting", ["3", " 4 ", "3.0"]), ("counting", ["three"]), ("math", ["12", "3\\sqrt{2}", " "]), ("math", ["12", "\\frac{"]),
]


@pytest.mark.parametrize("task, answers", BAD_LAST_ANSWER)
def test_real_dataset_row_with_an_answer_the_reward_cannot_grade_exits_naming_split_row_and_value(tmp_path, task, answers):
    rows = datasets.Dataset.from_dict(
        {"images": [[Image.new("RGB", (8, 8))]] * len(answers), "problem": ["<image>How many?"] * len(answers),
         "answer": answers}, features=FEATURES,
    )  # fmt: skip
    datasets.DatasetDict({"train": rows, "test": rows}).save_to_disk(str(tmp_path / "ds"))  # train rows in order
    row, bad = len(answers) - 1, answers[-1].strip()  # the last row is the bad one
    expected = f"--dataset '{tmp_path / 'ds'}' split 'train' row {row}: answer '{bad}' is not "
    with pytest.raises(SystemExit, match="^" + re.escape(expected)):
        tasks.load_task(task, "train", len(answers), dataset=str(tmp_path / "ds"))
    good = tasks.load_task(task, "train", row, dataset=str(tmp_path / "ds"))  # the rows before it load
    assert [e.answer for e in good] == [a.strip() for a in answers[:row]]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_real_dataset_held_out_rows_are_numbered_as_in_their_split(tmp_path, split):
    answers = [f"x{i}" for i in range(20)]  # every answer is bad and names its row
    rows = datasets.Dataset.from_dict(
        {"images": [[Image.new("RGB", (8, 8))]] * 20, "problem": ["<image>How many?"] * 20, "answer": answers}, features=FEATURES
    )
    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(SystemExit, match=r"split 'train' row (\d+): answer 'x\1' is not a whole number") as exited:
        tasks.load_task("counting", split, 1, dataset=str(tmp_path / "ds"))
    assert "row 0:" not in str(exited.value)  # so numbering rows by their place in the shuffled part would fail


@pytest.mark.parametrize("bbox", [[10, 20, 0, 40], [10, 20, 30, -1], [10, 20, 30, float("nan")], [10, 20, 30]])
def test_refcoco_row_with_a_box_that_is_not_x_y_w_h_exits_naming_it(tmp_path, bbox):
    features = datasets.Features(
        {"image": datasets.Image(), "answer": datasets.Sequence(datasets.Value("string")),
         "bbox": datasets.Sequence(datasets.Value("float32"))}
    )  # fmt: skip
    rows = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (20, 10))] * 2, "answer": [["a"], ["b"]], "bbox": [[0, 0, 5, 5], bbox]}, features=features
    )
    datasets.DatasetDict({"val": rows, "test": rows}).save_to_disk(str(tmp_path / "refcoco"))  # as lmms-lab/RefCOCO
    with pytest.raises(SystemExit, match=r"split 'val' row 1: bbox \[.*\] is not 4 finite numbers \[x, y, w, h\]"):
        tasks.load_task("grounding", "train", 2, dataset=str(tmp_path / "refcoco"))
