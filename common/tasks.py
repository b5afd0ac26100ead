"""Tasks = data + prompt + reward. Each task has an offline synthetic twin (the default) and a real dataset
path (`--dataset`, loaded with `datasets.load_dataset`) for users who are online.

counting: CLEVR-like scenes drawn with Pillow; "How many shapes are in the image?"; answer `<answer>N</answer>`.
  real: BUAADreamer/clevr_count_70k schema (`images`: list of images, `problem`: text with `<image>`,
  `answer`: the count as a string).
"""

import hashlib
import os
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

TASKS = ("counting",)
ANSWER_FORMAT = "Answer with <answer>N</answer>."
COUNTING_QUESTION = "How many shapes?"

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


def draw_scene(seed: int, spec: SceneSpec = SceneSpec()):
    """A deterministic scene: returns (PIL image, list of objects as (shape, colour, radius, x, y))."""
    rng = random.Random(seed)
    count = rng.randint(spec.min_count, spec.max_count)
    objects = []
    if spec.cell:
        n = spec.image_size // spec.cell
        for c in rng.sample(range(n * n), count):
            r = rng.choice(spec.radii)
            x = (c % n) * spec.cell + rng.uniform(r + 1, spec.cell - r - 1)
            y = (c // n) * spec.cell + rng.uniform(r + 1, spec.cell - r - 1)
            objects.append((rng.choice(SHAPES), rng.choice(list(COLORS)), r, x, y))
    while len(objects) < count:  # rejection sampling for non-overlapping positions
        r = rng.choice(spec.radii)
        x, y = rng.uniform(r + 1, spec.image_size - r - 1), rng.uniform(r + 1, spec.image_size - r - 1)
        if all((x - ox) ** 2 + (y - oy) ** 2 >= (r + orad + spec.margin) ** 2 for _, _, orad, ox, oy in objects):
            objects.append((rng.choice(SHAPES), rng.choice(list(COLORS)), r, x, y))
    image = Image.new("RGB", (spec.image_size, spec.image_size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
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


def counting_examples(split: str, n: int, spec: SceneSpec = SceneSpec()):
    """n synthetic counting examples of a split ('train', 'warmstart' or 'eval'); same split + n → same data."""
    out, seed = [], SPLIT_SEED_OFFSET[split]
    while len(out) < n:
        image, objects = draw_scene(seed, spec)
        if in_eval_bucket(image) == (split == "eval"):
            out.append(Example(image, f"{COUNTING_QUESTION} {ANSWER_FORMAT}", str(len(objects)), seed))
        seed += 1
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


# ---------------------------------------------------------------------------------------------- loading
def load_task(task: str, split: str, n: int, dataset: str | None = None, image_size: int = 64):
    """Examples for a task: the synthetic twin, or `dataset` (a hub id or a local path) via `load_dataset`."""
    if task not in TASKS:
        raise SystemExit(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    if dataset is None:
        return counting_examples(split, n, SceneSpec(image_size=image_size))
    return load_counting_dataset(dataset, split, n)


def load_counting_dataset(dataset: str, split: str, n: int):
    """CLEVR-Count in the BUAADreamer/clevr_count_70k schema: images (list), problem, answer.

    Train rows come from the dataset's 'train' split; eval rows from its 'test' split if it has one, else
    from the end of 'train' (disjoint from the rows trained on as long as n_train + n_eval <= len)."""
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
    missing = {"images", "problem", "answer"} - set(ds["train"].column_names)
    if missing:
        raise SystemExit(
            f"--dataset '{dataset}' lacks columns {sorted(missing)}; counting needs images, problem, answer "
            "(the BUAADreamer/clevr_count_70k schema): rename them with datasets' rename_column"
        )
    if split == "eval":
        rows = ds["test"] if "test" in ds else ds["train"].select(range(max(0, len(ds["train"]) - n), len(ds["train"])))
    else:
        rows = ds["train"]
    rows = rows.select(range(min(n, len(rows))))
    out = []
    for row in rows:
        images = row["images"] if isinstance(row["images"], list) else [row["images"]]
        question = row["problem"].replace("<image>", "").strip()
        if "<answer>" not in question:
            question = f"{question} {ANSWER_FORMAT}"
        out.append(Example(images[0].convert("RGB"), question, str(row["answer"]).strip()))
    return out


def reward_fn(task: str):
    if task == "counting":
        return counting_reward
    raise SystemExit(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
