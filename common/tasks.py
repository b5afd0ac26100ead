"""Tasks = data + prompt + reward. Each task is one `Task` record in `TASKS` (the end of this file): its offline
synthetic twin (the default), its real dataset path (`--dataset`), its reward, budgets and tools, and the embedded tiny
model's warm start. Adding a task is adding a record.

counting: CLEVR-like scenes drawn with Pillow; "How many shapes?"; answer `<answer>N</answer>`, exact match.
  real: BUAADreamer/clevr_count_70k schema (`images`: list of images, `problem`: text with `<image>`,
  `answer`: the count as a string).
math: two numbers drawn in the image, "Add the two numbers."; answer in `\\boxed{}`, graded by math-verify.
  real: hiyouga/geometry3k (same schema as counting: `images`, `problem`, `answer`).
grounding: "Where is the red circle?" in a scene of shapes; answer `<answer>[x1, y1, x2, y2]</answer>` in the
  model family's box convention; reward = IoU with the true box (continuous), success = IoU >= 0.5.
  real: lmms-lab/RefCOCO schema (`image`, `answer`: list of referring expressions, `bbox`: COCO [x, y, w, h]).
zoom (agentic, common/agent.py): four face-down cards in a 2x2 scene, one red; "Which number is on the red card?";
  only the tool `zoom(k)`, called as `<tool>zoom(k)</tool>`, shows card k's digit. Answer `<answer>N</answer>`.
mat-search, mat-coding (agentic): laolao77/MAT, a local copy (`--dataset DIR`); no twin. Tools `search(query)` and
  `python(code)` (common/sandbox.py); reward = token F1 of the answer.
"""

import functools
import hashlib
import inspect
import io
import json
import math
import os
import random
import re
import unicodedata
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

ANSWER_FORMAT = "Answer with <answer>N</answer>."
COUNTING_QUESTION = "How many shapes?"
MATH_QUESTION = "Add the two numbers."
BOXED_FORMAT = "Put the final answer in \\boxed{}."
GROUNDING_QUESTION = "Locate {}."  # {} = a referring expression, e.g. "the red circle"
BOX_FORMAT = "Answer with <answer>[x1, y1, x2, y2]</answer>."
ZOOM_QUESTION = "Which number is on the red card?"
ZOOM_FORMAT = "See card k with <tool>zoom(k)</tool>, k 1-4. Answer with <answer>N</answer>."

# Disjoint seed streams: a scene's seed is (split offset + index), so held-out scenes are never trained on.
SPLIT_SEED_OFFSET = {"train": 0, "warmstart": 1_000_000_000, "eval": 2_000_000_000}


@dataclass
class Example:
    source: "Image.Image | bytes"  # the image, or its encoded file (a real dataset's row: decoded only when used)
    question: str  # the text after the image in the user turn
    answer: str  # ground truth, compared by the reward function
    seed: int | None = None  # synthetic examples: the scene's seed (`draw_scene(seed)` redraws it)

    @property
    def image(self) -> Image.Image:
        """The image, 8-bit RGB: 20,000 decoded CLEVR rows would hold 11.5 GiB, their files 1/20 of that."""
        if isinstance(self.source, Image.Image):
            return self.source
        with Image.open(io.BytesIO(self.source)) as image:
            return to_rgb(image)


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
        shade_cells(draw, spec.image_size // spec.cell, spec.cell)
    for shape, colour, r, x, y in objects:
        box, fill = (x - r, y - r, x + r, y + r), COLORS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return image, objects


def shade_cells(draw, n: int, cell: int):
    """A "tiled floor": each of n x n cells gets its own background shade, so that a vision tower with only relative
    positions can tell the cells apart (see GROUNDING_SCENE)."""
    for c in range(n * n):
        column, row = c % n, c // n
        grey = 80 + 96 * column // max(n - 1, 1)  # the column sets the brightness,
        tint = 24 - 48 * row // max(n - 1, 1)  # the row the tint: warm at the top, cool at the bottom
        x0, y0 = column * cell, row * cell
        draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=(grey + tint, grey, grey - tint))


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
    for i, n in enumerate(numbers):
        jitter = image_size / 32
        x = (i + 0.5) * image_size / 2 + rng.uniform(-jitter, jitter)
        y = image_size / 2 + rng.uniform(-jitter, jitter)
        draw_number(draw, (x, y), n, image_size)
    return image, numbers


def draw_number(draw, centre, n: int, image_size: int):
    """n in bold black, 5/8 of the image high, centred at `centre` (math's numbers, zoom's card faces)."""
    font = ImageFont.load_default(size=image_size * 5 / 8)  # Pillow's embedded font: no files needed
    draw.text(centre, str(n), font=font, anchor="mm", fill=(0, 0, 0), stroke_width=image_size // 32, stroke_fill=(0, 0, 0))


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


# ---------------------------------------------------------------------------------------------- zoom (agentic)
# The digit is drawn only on the zoomed card, so the task needs the tool: without it accuracy is 0.20 (5 digits),
# with a random zoom 0.25 (the 4 cards' digits differ). Cards sit on grounding's tiled floor (shade_cells), which
# the tiny vision tower needs to tell the 4 places apart. Reward: 1 for the right digit; calling the tool pays
# nothing by itself (RLLaVA's tool bonus paid a wrong answer after a call more than a right one without).
CARD_BACK, MARKED_BACK = (40, 80, 230), (220, 40, 40)
CARD_DIGITS = range(1, 6)  # four different ones per scene


def draw_cards(seed: int, image_size: int = 64):
    """(scene, marked card 1-4, digits of cards 1-4): four face-down cards, numbered in reading order, one red."""
    rng = random.Random(seed)
    marked, digits = rng.randint(1, 4), rng.sample(CARD_DIGITS, 4)
    image = Image.new("RGB", (image_size, image_size))
    draw = ImageDraw.Draw(image)
    cell, jitter = image_size // 2, image_size / 32
    w, h = cell * 0.3, cell * 0.38  # a card's half-width and half-height
    shade_cells(draw, 2, cell)
    for k in range(1, 5):
        x = ((k - 1) % 2 + 0.5) * cell + rng.uniform(-jitter, jitter)
        y = ((k - 1) // 2 + 0.5) * cell + rng.uniform(-jitter, jitter)
        draw.rectangle((x - w, y - h, x + w, y + h), fill=MARKED_BACK if k == marked else CARD_BACK)
    return image, marked, digits


def draw_card_face(digit: int, image_size: int = 64):
    """Card k seen up close: its digit, bold black on white."""
    image = Image.new("RGB", (image_size, image_size), (245, 245, 245))
    draw_number(ImageDraw.Draw(image), (image_size / 2, image_size / 2), digit, image_size)
    return image


def zoom_tool(argument: str, example: Example):
    """zoom(k): the face of card k (1-4) of the example's scene, as a new image."""
    if not re.fullmatch(r"[1-4]", argument.strip()):
        return f"zoom({argument}): k is 1, 2, 3 or 4"
    _, _, digits = draw_cards(example.seed, example.image.width)
    return draw_card_face(digits[int(argument) - 1], example.image.width)


def zoom_examples(split: str, n: int, image_size: int = 64):
    """n synthetic zoom examples: the answer is the digit of the red card, which only zoom() shows. Held out by seed
    stream, not by pixels: a scene shows only where the red card is (4 kinds), never its digit, so no answer can be
    learnt from a scene; the held-out set measures the skill (zoom on the red card, read it)."""
    out = []
    for seed in range(SPLIT_SEED_OFFSET[split], SPLIT_SEED_OFFSET[split] + n):
        image, marked, digits = draw_cards(seed, image_size)
        out.append(Example(image, f"{ZOOM_QUESTION} {ZOOM_FORMAT}", str(digits[marked - 1]), seed))
    return out


# ---------------------------------------------------------------------------------------------- MAT (agentic)
MAT_FILES = {  # task: (training file, benchmark file), relative to `hf download laolao77/MAT --local-dir DIR`
    "mat-search": ("MAT-Training/rft_agent_search_20.json", "MAT-Benchmark/MAT-Search.json"),
    "mat-coding": ("MAT-Training/rft_agent_code_1_2k.json", "MAT-Benchmark/MAT-Coding.json"),
}
MAT_FORMAT = {
    "mat-search": "To look something up, write <tool>search(your query)</tool>: the top passages come back. "
    "Then answer as briefly as possible with <answer>...</answer>.",
    "mat-coding": "The image may be rotated, dark, overexposed, blurred, noisy, or need a crop. To run Python on it, "
    "write <tool>python(code)</tool>: the code reads the image from input.png (PIL, numpy, cv2); if it saves "
    "output.png you see that image, else what it printed. Then answer as briefly as possible with <answer>...</answer>.",
}
MAT_STEP_SUFFIX = re.compile(r"_(proc|ori)(?=\.\w+$)")  # a training image's name: <trajectory>_proc / _ori .png
QUERY_RE = re.compile(r"<query>\s*(.*?)\s*</?query>", re.DOTALL)  # MAT writes the question as <query> q </query>


def load_mat(task: str, split: str, n: int, dataset: str) -> list:
    """n examples of a MAT task from a local copy of laolao77/MAT: train from MAT-Training, eval from MAT-Benchmark
    (its rows in order: the first 75 of MAT-Search and 70 of MAT-Coding are its 'simple' split, the rest 'hard')."""
    import datasets

    path = os.path.join(dataset, MAT_FILES[task][0 if split == "train" else 1])
    if not os.path.isfile(path):
        raise SystemExit(f"--dataset '{dataset}' has no {path}: download it with "
                         "`hf download laolao77/MAT --repo-type dataset --local-dir DIR`, then pass --dataset DIR")
    rows = datasets.load_dataset("json", data_files=path, split="train")  # a JSON list of objects; images stay files
    if split == "train":
        rows = mat_start_rows(rows)
    images_root = mat_images_root(path)
    return [mat_example(row, images_root, task) for row in list(rows)[:n]]


def mat_images_root(json_path: str) -> str:
    """The folder MAT's image paths are relative to: beside the JSON, named after it (MAT-Search.json ->
    MAT-Search-image/, rft_agent_code_1_2k.json -> rft_agent_code_1_2k_images/), else images/."""
    stem, folder = os.path.splitext(os.path.basename(json_path))[0], os.path.dirname(json_path)
    candidates = [os.path.join(folder, name) for name in (f"{stem}-image", f"{stem}_images", "images")]
    found = [c for c in candidates if os.path.isdir(c)]
    if not found:
        raise SystemExit(f"no image folder for {json_path}; looked for {', '.join(candidates)}")
    return found[0]


def mat_start_rows(rows) -> list[dict]:
    """One start per question from MAT-Training, whose trajectories are split into teacher steps (a row per step:
    `type` pre_problem / pre_code / pre_answer in the coding file). The start is the question with the FIRST step's
    image (the degraded `_proc` one: a later step may show the clean `_ori`), the answer the step that gives it."""
    steps = {}
    for row in rows:
        steps.setdefault(MAT_STEP_SUFFIX.sub("", row["image_path"]), []).append(row)
    starts = []
    for trajectory in steps.values():
        first = min(trajectory, key=lambda r: (r.get("type") != "pre_problem", len(r["problem"])))
        answers = [m.group(1).strip() for r in trajectory if (m := ANSWER_RE.search(r.get("solution") or ""))]
        if answers:
            starts.append({"question": mat_question(first["problem"]), "answers": answers[:1],
                           "image_path": first["image_path"]})
    return starts


def mat_question(problem: str) -> str:
    """The question of a MAT-Training `problem` ('<query> q </query>', maybe with a reasoning chain after it)."""
    found = QUERY_RE.search(problem)
    return (found.group(1) if found else problem).strip()


def mat_example(row, images_root: str, task: str) -> Example:
    """A MAT row: a benchmark row (MAT-Search: question/answer/image_path; MAT-Coding: question/answers/type/
    processed_image_path/ori_image_path) or a training start (mat_start_rows). `answer` holds the acceptable
    answers as a JSON list. A crop question shows the whole original image, as MAT's own evaluation does."""
    answers = row["answers"] if row.get("answers") is not None else row["answer"]
    answers = answers if isinstance(answers, list) else [answers]
    kind = row.get("type") or []
    name = row.get("image_path") or row["ori_image_path" if kind[:1] == ["crop"] else "processed_image_path"]
    path = os.path.join(images_root, name)
    if not os.path.isfile(path):  # a path with folders in it (the authors' own): the file name alone
        path = os.path.join(images_root, os.path.basename(name))
    if not os.path.isfile(path):
        raise SystemExit(f"MAT image {path} not found (row {row.get('id', '?')}): is {images_root} complete?")
    with Image.open(path) as image:
        image = to_rgb(image)
    question = row.get("question") or mat_question(row["problem"])
    return Example(image, f"{question}\n{MAT_FORMAT[task]}", json.dumps([str(a) for a in answers], ensure_ascii=False))


# reward: token F1, SQuAD's normalisation (lowercase, no punctuation, no articles, single spaces) with MAT-Coding's rule
# for Chinese (a character is a token); an exact match (after normalising) is 1.
CJK = re.compile(r"[\u4e00-\u9fff]")


def mat_normalize(text: str) -> str:
    """Lowercase, drop punctuation and symbols (ASCII and Unicode: Chinese marks too), then: Chinese text loses its
    spaces; other text loses the articles a/an/the and keeps single spaces."""
    text = "".join(ch for ch in text.lower() if unicodedata.category(ch)[0] not in "PS")
    if CJK.search(text):
        return text.replace(" ", "")
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, truth: str) -> float:
    """F1 of the normalised tokens (a multiset, as SQuAD counts them); characters if either side is Chinese."""
    pred, true = mat_normalize(prediction), mat_normalize(truth)
    if pred == true:
        return 1.0
    chars = CJK.search(pred + true) is not None
    pred, true = (list(pred), list(true)) if chars else (pred.split(), true.split())
    common = sum((Counter(pred) & Counter(true)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(true)
    return 2 * precision * recall / (precision + recall)


def mat_answers(answer: str) -> list[str]:
    """The acceptable answers: a JSON list of strings (what mat_example stores), else the string itself."""
    try:
        parsed = json.loads(answer)
    except ValueError:
        return [answer]
    ok = isinstance(parsed, list) and parsed and all(isinstance(a, str) for a in parsed)
    return parsed if ok else [answer]


def f1_reward(completion: str, answer: str, format_reward: float = 0.0) -> float:
    """Token F1 in [0, 1] of the single <answer> block against the best acceptable answer; a malformed completion
    (no block, two, text after it) or an empty block earns 0, a well-formed one at least `format_reward`."""
    content = parse_answer(completion)
    if not content:
        return 0.0
    return max(max(token_f1(content, truth) for truth in mat_answers(answer)), format_reward)


# tool: search. The user's own retriever; no web API (and no key) here.
SEARCH_TOP_K = 3
SEARCH_CHARS = 500  # per passage: 3 of them fit the agent's 2,000-character cut of a tool's text
SEARCH_TIMEOUT = 10.0  # seconds; VLRL_SEARCH_TIMEOUT overrides


def search_tool(argument: str, example) -> str:
    """Top passages for the query: from VLRL_SEARCH_URL (POST {"query", "queries", "topk"} as JSON; a URL holding
    {query} is fetched by GET with it filled in) or VLRL_SEARCH_CORPUS (a JSONL file of {"title", "text"} passages,
    ranked by the query's words they contain, rarer words counting more). Errors come back as text."""
    query = argument.strip().strip("\"'").strip()
    url, corpus = os.environ.get("VLRL_SEARCH_URL"), os.environ.get("VLRL_SEARCH_CORPUS")
    if not query:
        return "error: empty query; write <tool>search(your query)</tool>"
    try:
        if url:
            passages = search_endpoint(url, query, float(os.environ.get("VLRL_SEARCH_TIMEOUT", SEARCH_TIMEOUT)))
        elif corpus:
            passages = search_corpus(corpus, query)
        else:
            return "error: no search backend; set VLRL_SEARCH_URL (a retrieval endpoint) or VLRL_SEARCH_CORPUS (a JSONL file)"
    except Exception as e:  # noqa: BLE001 - a down server or a bad reply: the model reads it, the run goes on
        return f"error: search failed: {type(e).__name__}: {e}"
    lines = [f"{i}. {p[:SEARCH_CHARS]}" for i, p in enumerate(passages[:SEARCH_TOP_K], 1)]
    return "\n".join(lines) if lines else "no results"


def search_endpoint(url: str, query: str, timeout: float) -> list[str]:
    """Passages from an HTTP endpoint. The reply: a list, or {"results"|"passages": list}, or Search-R1's retrieval
    server's {"result": [list]}; an item: a string, {"title", "text"|"contents"}, or {"document": item}."""
    if "{query}" in url:
        request = urllib.request.Request(url.replace("{query}", urllib.parse.quote(query)))
    else:
        body = json.dumps({"query": query, "queries": [query], "topk": SEARCH_TOP_K}).encode()
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        reply = json.loads(response.read(1 << 20))
    if isinstance(reply, dict):
        reply = reply.get("results") or reply.get("passages") or (reply.get("result") or [[]])[0]
    return [passage_text(item) for item in reply]


def passage_text(item) -> str:
    if isinstance(item, dict) and "document" in item:
        item = item["document"]
    if isinstance(item, dict):
        text = item.get("text") or item.get("contents") or ""
        return f"{item['title']}: {text}" if item.get("title") else text
    return str(item)


@functools.lru_cache(maxsize=2)
def _corpus(path: str, mtime: float):
    """(passages, their word sets, document frequency of each word) of a JSONL corpus, read once per file version."""
    with open(path, encoding="utf-8") as f:
        passages = [passage_text(json.loads(line)) for line in f if line.strip()]
    words = [set(mat_normalize(p).split()) for p in passages]
    return passages, words, Counter(w for ws in words for w in ws)


def search_corpus(path: str, query: str) -> list[str]:
    """The passages sharing the most query words, each word weighted by its rarity (log N/df); small corpora only
    (a linear scan: for Wikipedia-sized ones, serve an index and use VLRL_SEARCH_URL)."""
    passages, words, df = _corpus(path, os.path.getmtime(path))
    terms = set(mat_normalize(query).split())
    scores = [sum(math.log(len(passages) / df[t]) + 1e-6 for t in terms & ws) for ws in words]
    ranked = sorted((i for i, s in enumerate(scores) if s > 0), key=lambda i: -scores[i])
    return [passages[i] for i in ranked[:SEARCH_TOP_K]]


# tool: python. Runs in common/sandbox.py (bubblewrap: no network, no host files, limits); RLLaVA exec()s the model's
# code inside the trainer process. The code always gets the example's ORIGINAL image as input.png (a tool sees the
# example, not the episode: chain operations in one call); output.png, if saved, is the result.
PYTHON_TIMEOUT = 10.0  # seconds of wall clock per call
MIN_IMAGE_SIDE = 28  # Qwen2.5-VL's patch merge: smaller images are refused by its processor
MAX_ASPECT = 200  # and so are longer/thinner ones
MAX_IMAGE_PIXELS = 4096 * 4096  # a bigger output.png is refused (the processor would shrink it to max_pixels anyway)


def python_tool(argument: str, example) -> "str | Image.Image":
    """Run the code on the example's image: output.png if the code saved a usable one, else what it printed (the
    tail of stderr and the exit status on failure)."""
    from common.sandbox import run_python  # imported here: only mat-coding needs the sandbox

    code = re.sub(r"^\s*```(?:python)?\s*\n|\n\s*```\s*$", "", argument)  # a fenced block is fine too
    png = io.BytesIO()
    example.image.save(png, "PNG")
    result = run_python(code, files={"input.png": png.getvalue()}, timeout=PYTHON_TIMEOUT, returned=("output.png",))
    if result.timed_out:
        return f"error: the code ran past {PYTHON_TIMEOUT:g} s and was stopped"
    if "output.png" in result.files:
        try:
            with Image.open(io.BytesIO(result.files["output.png"])) as image:
                w, h = image.size  # read from the header: a huge image is refused before it is decoded
                if min(w, h) < MIN_IMAGE_SIDE or max(w, h) > MAX_ASPECT * min(w, h) or w * h > MAX_IMAGE_PIXELS:
                    return (f"error: output.png is {w}x{h}; it needs sides of at least {MIN_IMAGE_SIDE} px, an aspect "
                            f"ratio up to {MAX_ASPECT} and at most {MAX_IMAGE_PIXELS} pixels")
                return image.convert("RGB")
        except Exception as e:  # noqa: BLE001 - not an image, or a truncated one
            return f"error: output.png is not a readable image ({type(e).__name__})"
    text = result.stdout[-1500:].rstrip()
    if result.returncode != 0:
        text += f"\n[stderr] {result.stderr[-500:]}\n[exit status {result.returncode}]"
    return text.strip() or "(no output: print something, or save output.png)"


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


# ---------------------------------------------------------------------------------------------- ideal responses
# What the embedded tiny model's supervised warm start imitates (common/tiny_vlm.py), and the text its tokenizer learns.
def answer_response(example: Example, box_frame=norm1000_frame) -> str:
    """`<answer>N</answer>` (counting, zoom's last turn)."""
    return f"<answer>{example.answer}</answer>"


def boxed_response(example: Example, box_frame=norm1000_frame) -> str:
    return f"\\boxed{{{example.answer}}}"


def box_response(example: Example, box_frame=norm1000_frame) -> str:
    """The true box, rounded, in the family's frame (see grounding_reward)."""
    truth = json.loads(example.answer)
    frame_w, frame_h = box_frame(*truth["image_size"])
    sx, sy = frame_w / truth["image_size"][0], frame_h / truth["image_size"][1]
    x1, y1, x2, y2 = truth["box"]
    return f"<answer>[{round(x1 * sx)}, {round(y1 * sy)}, {round(x2 * sx)}, {round(y2 * sy)}]</answer>"


def zoom_turns(example: Example) -> list[str]:
    """Zoom on the red card, then answer its digit."""
    _, marked, _ = draw_cards(example.seed, example.image.width)
    return [f"<tool>zoom({marked})</tool>", answer_response(example)]


def counting_text() -> list[str]:
    return [ANSWER_FORMAT, COUNTING_QUESTION] + [f"<answer>{n}</answer>" for n in range(100)]


def math_text() -> list[str]:
    return [BOXED_FORMAT, MATH_QUESTION] + [f"\\boxed{{{n}}}" for n in range(100)]


def grounding_text() -> list[str]:
    """The questions (their colours and shapes) and answers of 100 warm-start examples."""
    examples = grounding_examples("warmstart", 100)
    return [BOX_FORMAT] + [e.question for e in examples] + [box_response(e) for e in examples]


def zoom_text() -> list[str]:
    calls = [f"<tool>zoom({k})</tool>" for k in range(1, 5)] * 25
    return [ZOOM_QUESTION, ZOOM_FORMAT] + calls + [f"<answer>{n}</answer>" for n in range(100)]


def ideal_response(task: str, example: Example, box_frame=norm1000_frame) -> str:
    """The shortest response that earns reward 1 (what the tiny model's supervised warm start imitates); an agentic
    task's last turn (ideal_turns)."""
    record = get_task(task)
    if record.ideal_response is None:
        raise ValueError(f"no ideal response is known for --task {task}")
    return record.ideal_response(example, box_frame)


def ideal_turns(task: str, example: Example) -> list[str]:
    """An agentic task's shortest episode that earns reward 1, turn by turn: call the right tool, then answer (zoom's:
    what the tiny model's warm start imitates)."""
    record = get_task(task)
    if record.ideal_turns is None:
        raise ValueError(f"no ideal episode is known for --task {task}")
    return record.ideal_turns(example)


# ---------------------------------------------------------------------------------------------- real datasets
HELD_OUT = 0.1  # the share of a dataset without a test split held out for eval (the synthetic twins hold out ~10%)
ROW = "vlrl_row"  # a column load_rows adds: each row's number in its split, which the shuffled held-out split loses


@dataclass(frozen=True)
class Schema:
    """The layout of a task's real dataset (`--dataset`: a hub id or a local dir), and how its rows become examples."""

    columns: frozenset  # the columns a row needs
    reference: str  # the dataset the schema was written for, named when a column is missing
    truth: str  # the column of the ground truth, checked on every row before training
    problem: Callable  # (that column's value, the image's (w, h)) -> what is wrong with it for the reward, or None
    example: Callable  # (row, its image's encoded file) -> Example
    image: str  # the column of the image (or of a list of images: the first is the prompt's)
    text: str  # the column of the question (or of a list of referring expressions: the first is used)

    def load(self, split: str, n: int, dataset: str) -> list[Example]:
        return [self.example(row, image) for row, image in load_rows(dataset, split, n, self)]


def split_names(names: list[str]) -> tuple[str, str | None]:
    """(the split that trains, the split that evaluates) among a dataset's splits: 'train' (else the first split that
    is not 'test') and 'test'. None evaluates on a held-out share of the training split: there is no 'test', or it is
    the only split (never the training rows themselves)."""
    train = "train" if "train" in names else next((n for n in names if n != "test"), names[0])
    return train, "test" if "test" in names and train != "test" else None


FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def open_dataset(dataset: str):
    """--dataset as datasets opens it: a save_to_disk folder (load_from_disk), one data file (its builder, as
    load_dataset("parquet", data_files=...)), or a folder or hub id (load_dataset). A hub id that load_dataset cannot
    reach (offline: HF_HUB_OFFLINE=1) loads from the snapshot `hf download --repo-type dataset` left in the Hugging
    Face cache, as a model does: load_dataset itself reads only its own cache of datasets it prepared before."""
    import datasets
    import huggingface_hub

    saved = ("dataset_dict.json", "state.json")  # written by DatasetDict / Dataset .save_to_disk
    if os.path.isdir(dataset) and any(os.path.exists(os.path.join(dataset, f)) for f in saved):
        return datasets.load_from_disk(dataset)
    if os.path.isfile(dataset) and os.path.splitext(dataset)[1] in FILE_BUILDERS:
        return datasets.load_dataset(FILE_BUILDERS[os.path.splitext(dataset)[1]], data_files=dataset)
    try:
        return datasets.load_dataset(dataset)
    except Exception:
        if os.path.exists(dataset):
            raise
        try:  # a hub id: offline, the snapshot a download left in the Hugging Face cache
            snapshot = huggingface_hub.snapshot_download(dataset, repo_type="dataset", local_files_only=True)
        except Exception:  # noqa: BLE001 - not there either: load_dataset's own error says more
            snapshot = None
        if snapshot is None:
            raise
        return datasets.load_dataset(snapshot)


def empty_saved_splits(path: str) -> list[str]:
    """The splits of a DatasetDict.save_to_disk folder saved without rows (their state.json lists no data files)."""
    try:
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f)["splits"]
        states = {}
        for split in splits:
            with open(os.path.join(path, split, "state.json")) as f:
                states[split] = json.load(f)
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [split for split, state in states.items() if not state.get("_data_files")]


def load_rows(dataset: str, split: str, n: int, schema: Schema):
    """n rows of a real dataset in `schema`, their ground truth checked, from the split split_names picks (printed).
    Without a separate eval split, `train_test_split` holds out a seeded HELD_OUT share of the training split: the
    same rows on every call, so no eval row is trained on, whatever --train-size and --eval-size."""
    import datasets

    try:
        ds = open_dataset(dataset)
    except Exception as e:  # noqa: BLE001 - one line for people, not a traceback
        if empty := empty_saved_splits(dataset):  # datasets' load_from_disk fails on one with an IndexError
            message = f"--dataset '{dataset}' split '{empty[0]}' has no rows: drop it from the DatasetDict"
            raise SystemExit(message) from None
        raise SystemExit(f"could not load --dataset '{dataset}': {type(e).__name__}: {str(e).splitlines()[0]}")
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    name, eval_name = split_names(list(ds))
    missing = schema.columns - set(ds[name].column_names)
    if missing:
        raise SystemExit(
            f"--dataset '{dataset}' lacks columns {sorted(missing)}; this task needs {', '.join(sorted(schema.columns))} "
            f"(the {schema.reference} schema): rename them with datasets' rename_column"
        )
    if split == "eval" and eval_name:  # not train_test_split: a dataset's own test split is the one results cite
        name = eval_name
    if len(ds[name]) == 0:
        raise SystemExit(f"--dataset '{dataset}' split '{name}' has no rows")
    rows = ds[name].add_column(ROW, list(range(len(ds[name]))))  # row numbers in the split, for the errors below
    if eval_name is None:
        rows = rows.train_test_split(test_size=HELD_OUT, seed=0)["test" if split == "eval" else "train"]
    rows = rows.select(range(min(n, len(rows))))
    share = "" if eval_name else f"a held-out {HELD_OUT:.0%} of " if split == "eval" else f"{1 - HELD_OUT:.0%} of "
    print(f"--dataset {dataset}: {split} rows from {share}split '{name}' ({len(rows)} of {len(ds[name])})")
    # every row used is checked now, images by their headers (not decoded): a bad one stops the run before training
    # with one line, instead of a traceback at the step that first draws it
    checked = []
    for start in range(0, len(rows), 1000):  # the arrow rows: images as their encoded files
        for row in rows.select(range(start, min(start + 1000, len(rows)))).with_format("arrow")[:].to_pylist():
            truth = row[schema.truth]
            image, size, problem = image_file(row[schema.image])
            problem = problem or text_problem(row[schema.text])
            problem = problem or ("no ground truth (None)" if truth is None else schema.problem(truth, size))
            if problem:
                where = f"--dataset '{dataset}' split '{name}' row {row[ROW]}"
                raise SystemExit(f"{where}: {problem}; fix or drop the row (datasets' filter)")
            checked.append((row, image))
    return checked


def image_file(value) -> tuple[bytes | None, tuple | None, str | None]:
    """(the encoded file of a row's image, its (w, h), None), or (None, None, what is wrong with it). `value`:
    datasets' undecoded Image ({"bytes", "path"}), or a list of them (the first is the prompt's)."""
    if isinstance(value, list):
        if not value:
            return None, None, "no image (an empty list)"
        value = value[0]
    if not value or not (value.get("bytes") or value.get("path")):
        return None, None, "no image (None)"
    try:
        data = value["bytes"]
        if data is None:
            with open(value["path"], "rb") as f:
                data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
            image.verify()  # the whole file is read and checked (PNG: every chunk's CRC), not decoded
    except Exception as e:  # noqa: BLE001 - corrupt bytes, a truncated file, a missing path
        why = str(e).splitlines()[0] if str(e) else ""
        return None, None, f"an image that does not open ({type(e).__name__}: {why})"
    if max(w, h) > MAX_ASPECT * min(w, h):
        return None, None, f"a {w}x{h} image: Qwen-VL's processor refuses an aspect ratio over {MAX_ASPECT}"
    return data, (w, h), None


def text_problem(value) -> str | None:
    """What is wrong with a row's question (or list of referring expressions), or None."""
    texts = value if isinstance(value, list) else [value]
    if not texts or not isinstance(texts[0], str) or not texts[0].strip():
        return f"no question text ({value!r})"
    return None


def count_problem(answer, size=None) -> str | None:
    answer = str(answer).strip()  # as problem_example stores it
    return None if re.fullmatch(r"[0-9]+", answer) else f"answer '{answer}' is not a whole number like '3'"


def math_problem(answer, size=None) -> str | None:
    from math_verify import parse  # imported here: it loads sympy, only math needs it

    answer = str(answer).strip()
    # parse gives [expression, text], or only [text] (compared character by character) when it cannot parse it
    if all(isinstance(p, str) for p in parse(f"${answer}$")):
        return f"answer '{answer}' is not a number or LaTeX math-verify can parse, like '12' or '3\\sqrt{{2}}'"
    return None


def coco_box_problem(box, size: tuple) -> str | None:
    numbers = isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
    if not (numbers and all(math.isfinite(v) for v in box) and box[2] > 0 and box[3] > 0):
        return f"bbox {box!r} is not 4 finite numbers [x, y, w, h] (COCO) with w > 0 and h > 0"
    (x, y, w, h), (width, height) = box, size
    if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:  # a pixel of rounding allowed
        return f"bbox {list(box)} reaches outside the {width}x{height} image (its IoU would always be 0)"
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a dataset image. PIL's convert("RGB") clips a 16-bit greyscale image (a PNG's I;16,
    opened as I) at 255, which turns it almost all white; it is scaled to 8 bits here instead."""
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # 32-bit integers, the same values
    if image.mode == "I" and image.getextrema()[1] > 255:  # 16-bit values: 0..65535 to 0..255
        image = image.point(lambda v: v / 257, "L")
    return image.convert("RGB")


def problem_example(row, image: bytes, answer_format: str, marker: str) -> Example:
    """A row of the images/problem/answer schema (CLEVR-Count, Geometry3K) and its first image's file; a question
    that does not ask for `marker` (its answer's format) gets `answer_format` after it."""
    question = row["problem"].replace("<image>", "").strip()
    if marker not in question:
        question = f"{question} {answer_format}"
    return Example(image, question, str(row["answer"]).strip())


def refcoco_example(row, image: bytes) -> Example:
    """A row of the lmms-lab/RefCOCO schema and its image's file: the first referring expression; bbox is COCO
    [x, y, w, h]."""
    expressions = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
    x, y, w, h = row["bbox"]
    with Image.open(io.BytesIO(image)) as header:  # the size, without decoding
        size = list(header.size)
    answer = json.dumps({"box": [x, y, x + w, y + h], "image_size": size})
    return Example(image, f"{GROUNDING_QUESTION.format(expressions[0].strip())} {BOX_FORMAT}", answer)


CLEVR_COUNT = Schema(frozenset({"images", "problem", "answer"}), "BUAADreamer/clevr_count_70k", "answer", count_problem,
                     functools.partial(problem_example, answer_format=ANSWER_FORMAT, marker="<answer>"), "images",
                     "problem")  # fmt: skip
GEOMETRY3K = Schema(frozenset({"images", "problem", "answer"}), "hiyouga/geometry3k", "answer", math_problem,
                    functools.partial(problem_example, answer_format=BOXED_FORMAT, marker="\\boxed"), "images",
                    "problem")  # fmt: skip
REFCOCO = Schema(frozenset({"image", "answer", "bbox"}), "lmms-lab/RefCOCO", "bbox", coco_box_problem, refcoco_example,
                 "image", "answer")


# ---------------------------------------------------------------------------------------------- the tasks
@dataclass(frozen=True)
class Task:
    """Everything about one task; adding a task is adding one record to TASKS below (and its tests)."""

    name: str  # what --task says
    examples: Callable | None  # (split, n, image_size) -> list[Example]: the offline synthetic twin; None: none (MAT)
    reward: Callable  # (completion, answer, format_reward=0.0) -> float in [0, 1]; one reading boxes takes box_frame=
    max_new_tokens: int  # default --max-new-tokens: enough for the twin's answer (an agentic task's: per turn)
    total_steps: int  # default --total-steps of the group-sampling scripts (GRPO, RLOO, OPO, GSPO, DAPO)
    ppo_total_steps: int  # default --total-steps of algos/ppo_vlm.py (~3/8 of total_steps: a PPO step costs ~3)
    success: float = 1.0  # the reward from which an answer counts as right (<prefix>/accuracy)
    metric: str | None = None  # "iou" / "f1": the mean reward is logged too, as <prefix>/<metric>
    tools: dict | None = None  # agentic tasks: the tools an episode may call, by name (common/agent.py); None: 1 turn
    load_real: Callable | None = None  # (split, n, dataset) -> list[Example]: --dataset's rows; None: the twin only
    dataset_hint: str = ""  # without a twin: how to get the real data, said when --dataset is missing
    # the embedded tiny model (common/tiny_vlm.py); None: it has none for this task (pass --model)
    warm_start: dict | None = None  # its supervised warm start: max_steps, batch_size, lr, target_accuracy
    tokenizer_text: Callable | None = None  # () -> list[str]: the prompts and answers its tokenizer is trained on
    ideal_response: Callable | None = None  # (example, box_frame) -> str: the shortest response earning 1 (imitated)
    ideal_turns: Callable | None = None  # (example) -> list[str]: an agentic task's shortest rewarded episode, turn by turn
    # a model as the reward (--reward-model, common/reward.py)
    parse: Callable | None = None  # (completion) -> the answer it gives, None if malformed (--reward-mix format-gate)
    judge_template: str | None = None  # a judge's prompt after the image: {question}, {response}, {reference}
    judge_warm_start: dict | None = None  # the tiny judge's (common/tiny_vlm.py's judge_warm_start)
    wrong_answer: Callable | None = None  # (example, random.Random) -> a wrong answer: the tiny judge's "no" cases

    def reward_fn(self, box_frame=norm1000_frame):
        """The reward as (completion, answer, format_reward=0.0) -> float; a reward that reads boxes (grounding's)
        reads them in `box_frame`, the model family's (common/vlm.py's box_frame)."""
        if "box_frame" in inspect.signature(self.reward).parameters:
            return functools.partial(self.reward, box_frame=box_frame)
        return self.reward

    def summarize(self, rewards: list[float], prefix: str) -> dict:
        """<prefix>/accuracy, the share of rewards at or above `success`; and <prefix>/<metric>, the mean reward."""
        out = {f"{prefix}/accuracy": sum(r >= self.success for r in rewards) / max(len(rewards), 1)}
        if self.metric:
            out[f"{prefix}/{self.metric}"] = sum(rewards) / max(len(rewards), 1)
        return out


# Budgets: the twins' total_steps take the tiny model ~10 min on 2 cores; MAT's (a GPU's) are a first guess, unmeasured.
# PPO's: counting's measured (docs/ppo_vlm.md), the others scaled like it, untuned.
# A judge's prompt: the image, then this, then its answer (common/judges.py). With the reference answer the judge
# compares; without it (drop the line) it must see for itself whether the response is right, which a real judge
# does and the tiny one learns too slowly here (docs/rewards.md).
JUDGE_TEMPLATE = "{question}\nThe right answer: {reference}\nResponse: {response}\nIs the response right? Answer yes or no."
TINY_JUDGE = dict(comparison_steps=600, max_steps=500, batch_size=64, lr=1e-3, target_agreement=0.99)  # counting's


def wrong_count(example: Example, rng: random.Random) -> str:
    """Another count the scene could have had (1 to 5)."""
    return str(rng.choice([k for k in range(1, 6) if str(k) != example.answer]))


MAT_HINT = "download MAT and pass --dataset DIR (docs/tasks.md#real-agentic-data-mat)"
TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task("counting", lambda split, n, image_size: counting_examples(split, n, SceneSpec(image_size=image_size)),
             counting_reward, max_new_tokens=8, total_steps=400, ppo_total_steps=150, load_real=CLEVR_COUNT.load,
             warm_start=dict(max_steps=400, batch_size=32, lr=1e-3, target_accuracy=0.35), tokenizer_text=counting_text,
             ideal_response=answer_response, parse=parse_answer, judge_template=JUDGE_TEMPLATE,
             judge_warm_start=TINY_JUDGE, wrong_answer=wrong_count),
        Task("math", math_examples, math_reward, max_new_tokens=8, total_steps=450, ppo_total_steps=170,
             load_real=GEOMETRY3K.load, warm_start=dict(max_steps=400, batch_size=32, lr=1e-3, target_accuracy=0.35),
             tokenizer_text=math_text, ideal_response=boxed_response, parse=parse_boxed, judge_template=JUDGE_TEMPLATE),
        Task("grounding", grounding_examples, grounding_reward, max_new_tokens=24, total_steps=250, ppo_total_steps=95,
             success=0.5, metric="iou", load_real=REFCOCO.load,
             warm_start=dict(max_steps=600, batch_size=32, lr=1e-3, target_accuracy=0.30), tokenizer_text=grounding_text,
             ideal_response=box_response, parse=parse_box, judge_template=JUDGE_TEMPLATE),
        Task("zoom", zoom_examples, counting_reward, max_new_tokens=10, total_steps=300, ppo_total_steps=110,
             tools={"zoom": zoom_tool}, warm_start=dict(max_steps=400, batch_size=32, lr=1e-3, target_accuracy=0.25),
             tokenizer_text=zoom_text, ideal_response=answer_response, ideal_turns=zoom_turns, parse=parse_answer,
             judge_template=JUDGE_TEMPLATE),
        # MAT's turns hold a thought and a tool call: 512 tokens each
        Task("mat-search", None, f1_reward, max_new_tokens=512, total_steps=200, ppo_total_steps=75, metric="f1",
             tools={"search": search_tool}, load_real=functools.partial(load_mat, "mat-search"), dataset_hint=MAT_HINT,
             parse=parse_answer, judge_template=JUDGE_TEMPLATE),
        Task("mat-coding", None, f1_reward, max_new_tokens=512, total_steps=400, ppo_total_steps=150, metric="f1",
             tools={"python": python_tool}, load_real=functools.partial(load_mat, "mat-coding"), dataset_hint=MAT_HINT,
             parse=parse_answer, judge_template=JUDGE_TEMPLATE),
    ]
}  # fmt: skip


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise SystemExit(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def load_task(task: str, split: str, n: int, dataset: str | None = None, image_size: int = 64):
    """n examples of a task's split: its synthetic twin, or `dataset` (a hub id or a local path) through its loader."""
    record = get_task(task)
    if dataset is not None:
        if record.load_real is None:
            raise SystemExit(f"--task {task} reads no --dataset: it has only its synthetic twin")
        return record.load_real(split, n, dataset)
    if record.examples is None:
        raise SystemExit(f"--task {task} has no offline twin: {record.dataset_hint}")
    return record.examples(split, n, image_size)
