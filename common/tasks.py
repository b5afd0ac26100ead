"""Tasks = data + prompt + reward. Each task has an offline synthetic twin (the default) and a real dataset
path (`--dataset`, loaded with `datasets.load_dataset`) for users who are online.

counting: CLEVR-like scenes drawn with Pillow; "How many shapes?"; answer `<answer>N</answer>`, exact match.
  real: BUAADreamer/clevr_count_70k schema (`images`: list of images, `problem`: text with `<image>`,
  `answer`: the count as a string).
math: two numbers drawn in the image, "Add the two numbers."; answer in `\\boxed{}`, graded by math-verify.
  real: hiyouga/geometry3k (same schema as counting: `images`, `problem`, `answer`).
grounding: "Where is the red circle?" in a scene of shapes; answer `<answer>[x1, y1, x2, y2]</answer>` in the
  model family's box convention; reward = IoU with the true box (continuous), success = IoU >= 0.5.
  real: lmms-lab/RefCOCO schema (`image`, `answer`: list of referring expressions, `bbox`: COCO [x, y, w, h]).
"""

import functools
import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

TASKS = ("counting", "math", "grounding")
ANSWER_FORMAT = "Answer with <answer>N</answer>."
COUNTING_QUESTION = "How many shapes?"
MATH_QUESTION = "Add the two numbers."
BOXED_FORMAT = "Put the final answer in \\boxed{}."
GROUNDING_QUESTION = "Locate {}."  # {} = a referring expression, e.g. "the red circle"
BOX_FORMAT = "Answer with <answer>[x1, y1, x2, y2]</answer>."
MAX_NEW_TOKENS = {"counting": 8, "math": 8, "grounding": 24}  # enough for the synthetic twins' answers
TOTAL_STEPS = {"counting": 400, "math": 450, "grounding": 250}  # the tiny model's default budget: ~10 min on 2 cores
SUCCESS = {"counting": 1.0, "math": 1.0, "grounding": 0.5}  # reward from which an answer counts as right

# Disjoint seed streams: a scene's seed is (split offset + index), so held-out scenes are never trained on.
SPLIT_SEED_OFFSET = {"train": 0, "warmstart": 1_000_000_000, "eval": 2_000_000_000}


@dataclass
class Example:
    image: Image.Image
    question: str  # the text after the image in the user turn
    answer: str  # ground truth, compared by the reward function
    seed: int | None = None  # synthetic examples: the scene's seed (`draw_scene(seed)` redraws it)


# ---------------------------------------------------------------------------------------------- counting
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 230), "green": (30, 170, 60), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")


@dataclass
class SceneSpec:
    """What a counting scene may contain. Counts are uniform over [min_count, max_count]."""

    image_size: int = 64
    min_count: int = 1
    max_count: int = 5
    radii: tuple = (4, 6)  # object sizes (half-width in pixels): small, large
    margin: int = 2  # minimum gap between objects' bounding circles, in pixels
    cell: int = 16  # if > 0: at most one object per cell of this many pixels, at a random place inside it
    jitter: float | None = None  # with cells: if set, objects sit at their cell's centre ± this many pixels
    distinct_colours: bool = False  # no two objects share a colour
    cell_shades: bool = False  # with cells: each cell's background has its own shade (a "tiled floor")


def draw_scene(seed: int, spec: SceneSpec = SceneSpec()):
    """A deterministic scene: returns (PIL image, list of objects as (shape, colour, radius, x, y))."""
    rng = random.Random(seed)
    count = rng.randint(spec.min_count, spec.max_count)
    objects = []
    if spec.cell:
        n = spec.image_size // spec.cell
        colours = rng.sample(list(COLORS), count) if spec.distinct_colours else None
        for c in rng.sample(range(n * n), count):
            r = rng.choice(spec.radii)
            low, high = (r + 1, spec.cell - r - 1) if spec.jitter is None else (spec.cell / 2 - spec.jitter, spec.cell / 2 + spec.jitter)
            x = (c % n) * spec.cell + rng.uniform(low, high)
            y = (c // n) * spec.cell + rng.uniform(low, high)
            shape = rng.choice(SHAPES)
            colour = colours[len(objects)] if colours else rng.choice(list(COLORS))
            objects.append((shape, colour, r, x, y))
    while len(objects) < count:  # rejection sampling for non-overlapping positions
        r = rng.choice(spec.radii)
        x, y = rng.uniform(r + 1, spec.image_size - r - 1), rng.uniform(r + 1, spec.image_size - r - 1)
        if all((x - ox) ** 2 + (y - oy) ** 2 >= (r + orad + spec.margin) ** 2 for _, _, orad, ox, oy in objects):
            objects.append((rng.choice(SHAPES), rng.choice(list(COLORS)), r, x, y))
    image = Image.new("RGB", (spec.image_size, spec.image_size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    if spec.cell and spec.cell_shades:
        n = spec.image_size // spec.cell
        for c in range(n * n):
            column, row = c % n, c // n
            grey = 80 + 96 * column // max(n - 1, 1)  # the column sets the brightness,
            tint = 24 - 48 * row // max(n - 1, 1)  # the row the tint: warm at the top, cool at the bottom
            x0, y0 = column * spec.cell, row * spec.cell
            draw.rectangle((x0, y0, x0 + spec.cell - 1, y0 + spec.cell - 1), fill=(grey + tint, grey, grey - tint))
    for shape, colour, r, x, y in objects:
        box, fill = (x - r, y - r, x + r, y + r), COLORS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return image, objects


def in_eval_bucket(image: Image.Image) -> bool:
    """Whether an image belongs to the held-out set: decided by its pixels (~10% of all images), so no
    held-out image is ever trained on, even when two seeds draw the same scene (one-object scenes repeat)."""
    return hashlib.sha256(image.tobytes()).digest()[0] < 26


def keep_for_split(image: Image.Image, split: str) -> bool:
    """Held-out images go to 'eval' only; every other split gets the rest."""
    return in_eval_bucket(image) == (split == "eval")


def counting_examples(split: str, n: int, spec: SceneSpec = SceneSpec()):
    """n synthetic counting examples of a split ('train', 'warmstart' or 'eval'); same split + n → same data."""
    out, seed = [], SPLIT_SEED_OFFSET[split]
    while len(out) < n:
        image, objects = draw_scene(seed, spec)
        if keep_for_split(image, split):
            out.append(Example(image, f"{COUNTING_QUESTION} {ANSWER_FORMAT}", str(len(objects)), seed))
        seed += 1
    return out


# ---------------------------------------------------------------------------------------------- math
MAX_ADDEND = 5  # numbers 1-5, sums 2-10: a from-scratch tiny model reads 5 glyphs and learns 25 sums in minutes
def draw_numbers(seed: int, image_size: int = 64):
    """Two numbers (1 to MAX_ADDEND) in bold black, centred in the left and right halves of the image, each nudged by a few
    pixels. Returns (PIL image, (a, b))."""
    rng = random.Random(seed)
    numbers = (rng.randint(1, MAX_ADDEND), rng.randint(1, MAX_ADDEND))
    image = Image.new("RGB", (image_size, image_size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=image_size * 5 / 8)  # Pillow's embedded font: no files needed
    for i, n in enumerate(numbers):
        jitter = image_size / 32
        x = (i + 0.5) * image_size / 2 + rng.uniform(-jitter, jitter)
        y = image_size / 2 + rng.uniform(-jitter, jitter)
        draw.text((x, y), str(n), font=font, anchor="mm", fill=(0, 0, 0), stroke_width=image_size // 32, stroke_fill=(0, 0, 0))
    return image, numbers


def math_examples(split: str, n: int, image_size: int = 64):
    """n synthetic math examples: the answer is the sum of the two numbers drawn in the image."""
    out, seed = [], SPLIT_SEED_OFFSET[split]
    while len(out) < n:
        image, (a, b) = draw_numbers(seed, image_size)
        if keep_for_split(image, split):
            out.append(Example(image, f"{MATH_QUESTION} {BOXED_FORMAT}", str(a + b), seed))
        seed += 1
    return out


# ---------------------------------------------------------------------------------------------- grounding
# One shape (20 px) in one of 2x2 cells, its colour and shape named ("the red circle"). Each cell has its own
# background: the tiny model's vision tower has only rotary (relative) positions, and without an absolute cue in
# the pixels it did not localise. The column sets the brightness and the row the tint, so x and y each have a cue
# of their own: with one grey per cell (darkest top-left to lightest bottom-right) the model learnt only the two
# extreme cells and answered the diagonal box (y = x) for the other two, Acc@0.5 stuck at 0.425 after RL.
# With distractors (2-3 shapes of distinct colours, the RefCOCO setting) the 1.3M-parameter model stayed at
# chance, Acc@0.5 ~0.2, after 420 supervised steps: it localises, it does not yet pick the named object. With two
# sizes (16 and 24 px), RL raised mean IoU 0.30 -> 0.48 in 250 steps but Acc@0.5 only 0.29 -> 0.38: a right
# place with the wrong size has IoU 0.44, just under the bar. Raise min_count/max_count and add radii for a
# larger model.
GROUNDING_SCENE = SceneSpec(
    min_count=1, max_count=1, radii=(10,), cell=32, jitter=1, distinct_colours=True, cell_shades=True
)


def grounding_examples(split: str, n: int, image_size: int = 64):
    """n synthetic grounding examples: "Locate the red circle." in a scene where it is the only red object.
    The answer is JSON: the true box [x1, y1, x2, y2] in pixels of the original image, and the image size."""
    spec = SceneSpec(**{**GROUNDING_SCENE.__dict__, "image_size": image_size})
    out, seed = [], SPLIT_SEED_OFFSET[split]
    while len(out) < n:
        image, objects = draw_scene(seed, spec)
        seed += 1
        kinds = [(shape, colour) for shape, colour, *_ in objects]
        unique = [o for o in objects if kinds.count((o[0], o[1])) == 1]
        if not unique or not keep_for_split(image, split):
            continue
        shape, colour, r, x, y = random.Random(seed).choice(unique)
        answer = json.dumps({"box": [round(v, 2) for v in (x - r, y - r, x + r, y + r)], "image_size": list(image.size)})
        out.append(Example(image, f"{GROUNDING_QUESTION.format(f'the {colour} {shape}')} {BOX_FORMAT}", answer, seed - 1))
    return out


# ---------------------------------------------------------------------------------------------- rewards
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_answer(completion: str):
    """The text inside the single <answer>...</answer> block, or None if the format is broken.

    Strict on purpose: no block, several blocks, an unclosed tag, or anything after the closing tag → None.
    Free text before the block (reasoning) is allowed."""
    blocks = ANSWER_RE.findall(completion)
    if len(blocks) != 1 or completion.count("<answer>") != 1 or completion.count("</answer>") != 1:
        return None
    if completion.split("</answer>", 1)[1].strip():
        return None
    return blocks[0].strip()


def counting_reward(completion: str, answer: str, format_reward: float = 0.0) -> float:
    """1.0 if the answer block holds exactly the integer `answer` (e.g. '3', ' 3 ', '03' → 3), else
    `format_reward` if the block holds a lone integer, else 0. '3 or 4', '3.5', 'three', '' earn 0."""
    content = parse_answer(completion)
    if content is None or not re.fullmatch(r"[0-9]{1,6}", content):
        return 0.0
    return 1.0 if int(content) == int(answer) else format_reward


def parse_boxed(completion: str):
    r"""The content of the single \boxed{...} in `completion` (braces balanced), or None.

    Strict: no \boxed, two of them, unbalanced braces, empty content, or text after the closing brace → None.
    Free text before it (reasoning) is allowed."""
    if completion.count("\\boxed{") != 1:
        return None
    start = completion.index("\\boxed{") + len("\\boxed{")
    depth = 1
    for i in range(start, len(completion)):
        depth += {"{": 1, "}": -1}.get(completion[i], 0)
        if depth == 0:
            content, rest = completion[start:i].strip(), completion[i + 1 :]
            return content if content and not rest.strip() else None
    return None  # never closed


def math_reward(completion: str, answer: str, format_reward: float = 0.0) -> float:
    r"""1.0 if the \boxed{} answer is mathematically equal to `answer` as math-verify judges it (12 = 12.0 =
    \frac{24}{2}, 3\sqrt{2} = \sqrt{18}), `format_reward` if it is well-formed but wrong, else 0."""
    from math_verify import parse, verify  # imported here: it loads sympy, only math needs it

    content = parse_boxed(completion)
    if content is None:
        return 0.0
    try:
        predicted = parse(f"${content}$")
        right = bool(predicted) and verify(parse(f"${answer}$"), predicted)
    except Exception:  # noqa: BLE001 - math-verify on adversarial LaTeX: a wrong answer, not a crash
        return 0.0
    return 1.0 if right else (format_reward if predicted else 0.0)


NUMBER = r"\s*(-?[0-9]{1,6}(?:\.[0-9]{1,6})?)\s*"
BOX_RE = re.compile(rf"\[{NUMBER},{NUMBER},{NUMBER},{NUMBER}\]")


def parse_box(completion: str):
    """[x1, y1, x2, y2] from the single <answer> block, or None (malformed, or x2 <= x1, or y2 <= y1)."""
    content = parse_answer(completion)
    match = BOX_RE.fullmatch(content) if content is not None else None
    if match is None:
        return None
    x1, y1, x2, y2 = map(float, match.groups())
    return [x1, y1, x2, y2] if x1 < x2 and y1 < y2 else None


def iou(a, b) -> float:
    """Intersection over union of two boxes [x1, y1, x2, y2]."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def norm1000_frame(width: int, height: int):
    """The coordinate frame of a family that writes boxes normalised to 0-1000 (Qwen2-VL)."""
    return 1000, 1000


def grounding_reward(completion: str, answer: str, format_reward: float = 0.0, box_frame=norm1000_frame) -> float:
    """IoU in [0, 1] of the predicted box with the true one, in pixels of the ORIGINAL image.

    The model writes boxes in its family's frame: `box_frame(width, height)` gives that frame's extent for
    an original image of that size — (1000, 1000) for 0-1000 normalised families, the resized input's
    (w, h) for absolute-pixel families. A predicted coordinate maps back as x * width / frame_width.
    A malformed box earns 0; a well-formed one at least `format_reward`."""
    box = parse_box(completion)
    if box is None:
        return 0.0
    truth = json.loads(answer)
    width, height = truth["image_size"]
    frame_w, frame_h = box_frame(width, height)
    sx, sy = width / frame_w, height / frame_h
    return max(iou([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy], truth["box"]), format_reward)


def ideal_response(task: str, example: Example, box_frame=norm1000_frame) -> str:
    """The shortest response that earns reward 1 (what the tiny model's supervised warm start imitates)."""
    if task == "counting":
        return f"<answer>{example.answer}</answer>"
    if task == "math":
        return f"\\boxed{{{example.answer}}}"
    truth = json.loads(example.answer)
    frame_w, frame_h = box_frame(*truth["image_size"])
    sx, sy = frame_w / truth["image_size"][0], frame_h / truth["image_size"][1]
    x1, y1, x2, y2 = truth["box"]
    return f"<answer>[{round(x1 * sx)}, {round(y1 * sy)}, {round(x2 * sx)}, {round(y2 * sy)}]</answer>"


def reward_fn(task: str, box_frame=norm1000_frame):
    """The task's reward: (completion, answer, format_reward=0.0) -> float."""
    if task == "counting":
        return counting_reward
    if task == "math":
        return math_reward
    if task == "grounding":
        return functools.partial(grounding_reward, box_frame=box_frame)
    raise SystemExit(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")


def summarize(task: str, rewards: list[float], prefix: str) -> dict:
    """Accuracy (share of answers at or above the task's success reward) and, for grounding, mean IoU."""
    out = {f"{prefix}/accuracy": sum(r >= SUCCESS[task] for r in rewards) / max(len(rewards), 1)}
    if task == "grounding":
        out[f"{prefix}/iou"] = sum(rewards) / max(len(rewards), 1)
    return out


# ---------------------------------------------------------------------------------------------- loading
def load_data(args) -> tuple[list, list]:
    """(train examples, held-out examples) of --task (--dataset: a real one), after checking with the processor
    alone, before any weights load, that their prompts fit --max-prompt-tokens (if not, one line says what to do)."""
    from common.tiny_vlm import tiny_processor  # imported here: tiny_vlm imports this module
    from common.vlm import build_prompts, load_processor

    train = load_task(args.task, "train", args.train_size, args.dataset)
    held_out = load_task(args.task, "eval", args.eval_size, args.dataset)
    if args.model == "tiny":
        processor = tiny_processor(args.task, args.min_pixels, args.max_pixels)
    else:
        processor = load_processor(args.model, args.min_pixels, args.max_pixels)
    for examples in (train[: args.prompts_per_step], held_out[: args.prompts_per_step]):
        build_prompts(processor, [e.image for e in examples], [e.question for e in examples], args.max_prompt_tokens)
    return train, held_out


def load_task(task: str, split: str, n: int, dataset: str | None = None, image_size: int = 64):
    """Examples for a task: the synthetic twin, or `dataset` (a hub id or a local path) via `load_dataset`."""
    if task not in TASKS:
        raise SystemExit(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    if dataset is None:
        if task == "counting":
            return counting_examples(split, n, SceneSpec(image_size=image_size))
        return {"math": math_examples, "grounding": grounding_examples}[task](split, n, image_size)
    rows = load_rows(dataset, split, n, task)
    return [{"grounding": refcoco_example}.get(task, problem_example)(row, task) for row in rows]


REAL_SCHEMA = {  # columns each task's --dataset needs, and the dataset it was written for
    "counting": ({"images", "problem", "answer"}, "BUAADreamer/clevr_count_70k"),
    "math": ({"images", "problem", "answer"}, "hiyouga/geometry3k"),
    "grounding": ({"image", "answer", "bbox"}, "lmms-lab/RefCOCO"),
}


HELD_OUT = 0.1  # the share of a dataset without a test split held out for eval (the synthetic twins hold out ~10%)
ROW = "vlrl_row"  # a column load_rows adds: each row's number in its split, which the shuffled held-out split loses


def load_rows(dataset: str, split: str, n: int, task: str):
    """n rows of a real dataset for `task`, their answers checked. Train rows come from its 'train' split (else
    its first split); eval rows from its 'test' split if it has one. Without one, `train_test_split` holds out a
    seeded HELD_OUT share of the training split: the same rows on every call, so no eval row is trained on,
    whatever --train-size and --eval-size."""
    import datasets

    try:
        saved = ("dataset_dict.json", "state.json")  # written by DatasetDict / Dataset .save_to_disk
        if os.path.isdir(dataset) and any(os.path.exists(os.path.join(dataset, f)) for f in saved):
            ds = datasets.load_from_disk(dataset)
        else:
            ds = datasets.load_dataset(dataset)
    except Exception as e:  # noqa: BLE001 - one line for people, not a traceback
        raise SystemExit(f"could not load --dataset '{dataset}': {type(e).__name__}: {str(e).splitlines()[0]}")
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    columns, reference = REAL_SCHEMA[task]
    name = "train" if "train" in ds else next(iter(ds))
    missing = columns - set(ds[name].column_names)
    if missing:
        raise SystemExit(
            f"--dataset '{dataset}' lacks columns {sorted(missing)}; this task needs {', '.join(sorted(columns))} "
            f"(the {reference} schema): rename them with datasets' rename_column"
        )
    if split == "eval" and "test" in ds:  # not train_test_split: a dataset's own test split is the one results cite
        name = "test"
    rows = ds[name].add_column(ROW, list(range(len(ds[name]))))  # row numbers in the split, for the errors below
    if "test" not in ds:
        rows = rows.train_test_split(test_size=HELD_OUT, seed=0)["test" if split == "eval" else "train"]
    rows = rows.select(range(min(n, len(rows))))
    # a bad answer found now stops the run before training, instead of crashing the reward at the first eval
    checked = ["bbox"] if task == "grounding" else ["answer"]
    for row in rows.select_columns([*checked, ROW]):  # no images decoded
        problem = answer_problem(task, row)
        if problem:
            where = f"--dataset '{dataset}' split '{name}' row {row[ROW]}"
            raise SystemExit(f"{where}: {problem}; fix or drop the row (datasets' filter)")
    return rows


def answer_problem(task: str, row) -> str | None:
    """What is wrong with a real row's ground truth for the task's reward, or None."""
    if task == "grounding":
        box = row["bbox"]
        numbers = isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
        if not (numbers and all(math.isfinite(v) for v in box) and box[2] > 0 and box[3] > 0):
            return f"bbox {box!r} is not 4 finite numbers [x, y, w, h] (COCO) with w > 0 and h > 0"
        return None
    answer = str(row["answer"]).strip()  # as problem_example stores it
    if task == "counting" and not re.fullmatch(r"[0-9]+", answer):
        return f"answer '{answer}' is not a whole number like '3'"
    if task == "math":
        from math_verify import parse  # imported here: it loads sympy, only math needs it

        # parse gives [expression, text], or only [text] (compared character by character) when it cannot parse it
        if all(isinstance(p, str) for p in parse(f"${answer}$")):
            return f"answer '{answer}' is not a number or LaTeX math-verify can parse, like '12' or '3\\sqrt{{2}}'"
    return None


def problem_example(row, task: str) -> Example:
    """A row of the images/problem/answer schema (CLEVR-Count, Geometry3K)."""
    images = row["images"] if isinstance(row["images"], list) else [row["images"]]
    question = row["problem"].replace("<image>", "").strip()
    answer_format = ANSWER_FORMAT if task == "counting" else BOXED_FORMAT
    if ("<answer>" if task == "counting" else "\\boxed") not in question:
        question = f"{question} {answer_format}"
    return Example(images[0].convert("RGB"), question, str(row["answer"]).strip())


def refcoco_example(row, task: str = "grounding") -> Example:
    """A row of the lmms-lab/RefCOCO schema: the first referring expression; bbox is COCO [x, y, w, h]."""
    expressions = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
    x, y, w, h = row["bbox"]
    image = row["image"].convert("RGB")
    answer = json.dumps({"box": [x, y, x + w, y + h], "image_size": list(image.size)})
    return Example(image, f"{GROUNDING_QUESTION.format(expressions[0].strip())} {BOX_FORMAT}", answer)
