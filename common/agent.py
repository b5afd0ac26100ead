"""Multi-turn episodes with tools: the model writes a turn, a tool answers, the model goes on, until it answers.

An episode is ONE token sequence: the prompt's ids, then each turn's ids appended exactly as they were sampled (model
turns) or tokenised (tool turns), never re-rendered through the chat template. Re-rendering the conversation
between turns changes tokens (peers have lost the `\\n` after `<|im_end|>` and stripped reasoning that way), and
then the tokens trained on are not the ones sampled. A per-token mask marks who wrote each token: 1 the model, 0
the tool. The algorithms' losses, KL terms and statistics all take that mask, so tool tokens are read by the
policy (they are attended to) but never trained on and never in the KL (a KL over text the policy did not write
blows up). Images accumulate per episode: a tool may return one (zoom in, crop), and the training forward gets all
of them, in the order their tokens appear, each with its own rotary positions.

A model turn ends at the end-of-turn token. If it contains a tool call `<tool>name(argument)</tool>`, the tool's
result (text or an image) becomes the next user turn; otherwise the turn is the answer and the episode ends. After
`max_turns` model turns it ends either way; the reward reads the last model turn (common/tasks.py).

    --train-turns all    every model-written token of every turn is trained (the decision to call a tool included)
    --train-turns last   only the last model turn (RLLaVA's, which folds earlier turns into the prompt): an ablation

A tool is a function (argument: str, example) -> str | PIL image; the task's tools are named in common/tasks.py.
`greedy_rewards` is the held-out evaluation: each example's greedy response (one-turn tasks) or greedy episode.
"""

import re
from dataclasses import dataclass, field

import torch
from PIL import Image

from common.dist import all_max
from common.vlm import build_prompts, generate, stop_token_id, take_rows

TOOL_CALL = re.compile(r"<tool>\s*([A-Za-z_]\w*)\((.*?)\)\s*</tool>", re.DOTALL)
MAX_TOOL_TEXT = 2000  # characters of a tool's text result the model reads (a flood is cut, with a note)
MARK = "\x1eTURN\x1e"  # stands for a model turn when the chat template renders a tool turn (tool_turn_text)


def parse_tool_call(text: str):
    """(tool name, argument) of the first `<tool>name(argument)</tool>` in a model turn, or None (an answer)."""
    match = TOOL_CALL.search(text)
    return (match.group(1), match.group(2).strip()) if match else None


def call_tool(tools: dict, call: tuple[str, str], example):
    """The tool's result; a wrong name or a failing tool is an error message the model reads, not a crash."""
    name, argument = call
    if name not in tools:
        return f"error: no tool '{name}'; tools: {', '.join(tools)}"
    try:
        return tools[name](argument, example)
    except Exception as e:  # noqa: BLE001 - the model's bad argument, shown to the model
        return f"error: {name}({argument}): {type(e).__name__}: {e}"


def tool_turn_text(processor, result) -> str:
    """What the chat template writes after a model turn's end-of-turn token, through the generation prompt of the
    next model turn, when the tool's result is the user's next turn: rendered as a whole conversation and cut after
    the model turn, so the separator the template puts between turns (Qwen's `\\n` after `<|im_end|>`) is kept."""
    content = [{"type": "image"}] if isinstance(result, Image.Image) else [{"type": "text", "text": str(result)}]
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": MARK}]},
        {"role": "user", "content": content},
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return text.split(MARK + processor.tokenizer.eos_token, 1)[1]


@dataclass
class Episode:
    """One episode as it grows. ids: the prompt's (no padding), then every turn's; mask: one per token after the
    prompt (1 model-written, 0 tool-written); images, the prompt's first."""

    example: object
    prompt_row: int  # the row of the prompt batch it started from
    ids: list[int]
    prompt_length: int
    pixel_blocks: list  # per image, the processor's (pixel_values rows, grid): what the trainer's forward reads
    images: list  # the PIL images, in order: what vLLM reads
    mask: list[int] = field(default_factory=list)
    turns: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each model turn, in mask positions
    answer: str = ""  # the last model turn's text: what the reward reads
    tool_calls: int = 0
    done: bool = False

    def add(self, ids: list[int], model_written: bool):
        if model_written:
            self.turns.append((len(self.mask), len(self.mask) + len(ids)))
        self.ids += ids
        self.mask += [int(model_written)] * len(ids)


def start_episodes(processor, prompts, examples, num_samples: int) -> list[Episode]:
    """num_samples episodes per prompt, ordered p0 x G, p1 x G, ...: each starts as its prompt's ids (no padding)."""
    episodes = []
    for i, (ids, attention) in enumerate(zip(prompts["input_ids"].tolist(), prompts["attention_mask"].tolist())):
        ids = [t for t, a in zip(ids, attention) if a]
        image = image_blocks(take_rows(prompts, [i]))
        for _ in range(num_samples):
            episodes.append(Episode(examples[i], i, list(ids), len(ids), list(image), [examples[i].image]))
    return episodes


def image_blocks(inputs) -> list:
    """[(pixel_values rows, grid thw)] per image of a one-row Qwen-VL batch; [] for a family without image grids
    (its single prompt image stays in the prompt batch, picked per row by `take_rows`)."""
    if "image_grid_thw" not in inputs:
        return []
    sizes = inputs["image_grid_thw"].prod(-1).tolist()
    return list(zip(inputs["pixel_values"].split(sizes), inputs["image_grid_thw"]))


def add_tool_turn(episode: Episode, processor, result):
    """Append the tool's result as the next user turn, tokenised on its own (an image expands to its tokens here)."""
    if isinstance(result, str) and len(result) > MAX_TOOL_TEXT:
        result = result[:MAX_TOOL_TEXT] + f"\n[... {len(result) - MAX_TOOL_TEXT} more characters cut]"
    image = result if isinstance(result, Image.Image) else None
    turn = processor(text=[tool_turn_text(processor, result)], images=[[image]] if image else None, add_special_tokens=False, return_tensors="pt")
    if image is not None:
        if "image_grid_thw" not in turn:
            raise SystemExit(f"a tool returned an image, which {type(processor).__name__} cannot place in a running episode: use a Qwen-VL model")
        episode.pixel_blocks += image_blocks(turn)
        episode.images.append(image)
    episode.add(turn["input_ids"][0].tolist(), model_written=False)


def context_batch(processor, prompts, episodes: list[Episode]):
    """The episodes so far as one left-padded batch to continue from: ids, attention mask, every image in order."""
    pad, longest = processor.tokenizer.pad_token_id, max(len(e.ids) for e in episodes)
    batch = take_rows(prompts, [e.prompt_row for e in episodes])  # the image inputs of families without grids (their one prompt image)
    batch["input_ids"] = torch.tensor([[pad] * (longest - len(e.ids)) + e.ids for e in episodes])
    batch["attention_mask"] = torch.tensor([[0] * (longest - len(e.ids)) + [1] * len(e.ids) for e in episodes])
    if "mm_token_type_ids" in batch:  # Qwen-VL: 1 on image tokens (M-RoPE numbers images by it)
        batch["mm_token_type_ids"] = (batch["input_ids"] == processor.image_token_id).long()
    if "image_grid_thw" in batch:
        blocks = [block for e in episodes for block in e.pixel_blocks]
        batch["pixel_values"] = torch.cat([rows for rows, _ in blocks])
        batch["image_grid_thw"] = torch.stack([grid for _, grid in blocks])
    return batch


@torch.no_grad()
def run_episodes(model, rollout_engine, processor, prompts, examples, num_samples: int, max_new_tokens: int,
                 temperature: float, greedy: bool, tools: dict, max_turns: int) -> list[Episode]:  # fmt: skip
    """num_samples episodes per prompt (ordered p0 x G, p1 x G, ...), each up to max_turns model turns of at most
    max_new_tokens tokens, sampled with HF generate (rollout_engine None) or the vLLM engine. Under torchrun every
    rank samples as many turns as the rank that needs the most (an FSDP2 forward is a collective)."""
    eos, device = stop_token_id(processor), prompts["input_ids"].device
    episodes = start_episodes(processor, prompts, examples, num_samples)
    for turn in range(max_turns):
        live = [k for k, e in enumerate(episodes) if not e.done]
        if all_max(len(live)) == 0:
            break
        rows = live or [0]  # a rank with no live episode samples one more turn of episode 0, unused, to stay in step
        context = {k: v.to(device) for k, v in context_batch(processor, prompts, [episodes[k] for k in rows]).items()}
        if rollout_engine is None:
            new_ids = generate(model, processor, context, 1, max_new_tokens, temperature, greedy)
        else:
            new_ids = rollout_engine.generate(model, context, [episodes[k].images for k in rows], 1, max_new_tokens, temperature, greedy)
        for k, ids in zip(live, new_ids.tolist()):
            episode = episodes[k]
            closed = eos in ids  # a turn cut by max_new_tokens has no end-of-turn token: it cannot go on
            ids = ids[: ids.index(eos) + 1] if closed else ids
            episode.add(ids, model_written=True)
            episode.answer = processor.tokenizer.decode(ids, skip_special_tokens=True)
            call = parse_tool_call(episode.answer) if closed and turn < max_turns - 1 else None
            if call is None:
                episode.done = True
                continue
            episode.tool_calls += 1
            add_tool_turn(episode, processor, call_tool(tools, call, episode.example))
    return episodes


@torch.no_grad()
def greedy_rewards(model, processor, examples, reward_fn, max_new_tokens: int, max_prompt_tokens: int, batch_size=100,
                   tools: dict | None = None, max_turns: int = 1):  # fmt: skip
    """The reward of each example's greedy response (evaluation: no sampling noise, no format bonus); with tools, of
    its greedy episode's last turn (run_episodes)."""
    texts = greedy_completions(model, processor, examples, max_new_tokens, max_prompt_tokens, batch_size, tools, max_turns)
    return [reward_fn(t, e.answer) for t, e in zip(texts, examples)]


def greedy_completions(model, processor, examples, max_new_tokens: int, max_prompt_tokens: int, batch_size=100,
                       tools: dict | None = None, max_turns: int = 1) -> list[str]:  # fmt: skip
    """Each example's greedy response (evaluation), or with tools its greedy episode's last turn (run_episodes)."""
    was_training = model.training
    model.eval()
    completions = []
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        images = [e.image for e in batch]
        prompts = build_prompts(processor, images, [e.question for e in batch], max_prompt_tokens).to(model.device)
        if tools:
            episodes = run_episodes(model, None, processor, prompts, batch, 1, max_new_tokens, 1.0, True, tools, max_turns)
            texts = [e.answer for e in episodes]
        else:
            response_ids = generate(model, processor, prompts, 1, max_new_tokens, 1.0, greedy=True)
            texts = processor.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        completions += texts
    model.train(was_training)
    return completions


def episode_batch(prompts, episodes: list[Episode], eos_id: int, train_turns: str = "all"):
    """(inputs, response_ids, mask) of the episodes, the format every script trains on: inputs, the prompts (row i is
    episode i's, left-padded) with every image of the episode; response_ids (N, T), everything after the prompt,
    EOS-padded; mask (N, T): 1 on the model-written tokens trained on (every turn's, or the last turn's), else 0."""
    N = len(episodes)
    inputs = take_rows(prompts, [e.prompt_row for e in episodes])
    if "image_grid_thw" in inputs and any(len(e.pixel_blocks) > 1 for e in episodes):  # tool images: every row's, in order
        inputs["pixel_values"] = torch.cat([rows for e in episodes for rows, _ in e.pixel_blocks]).to(inputs["pixel_values"].device)
        inputs["image_grid_thw"] = torch.stack([grid for e in episodes for _, grid in e.pixel_blocks]).to(inputs["image_grid_thw"].device)
        inputs["images_per_row"] = torch.tensor([len(e.pixel_blocks) for e in episodes])
    T = max(len(e.mask) for e in episodes)
    response_ids = torch.full((N, T), eos_id, dtype=torch.long)
    mask = torch.zeros(N, T)
    for row, episode in enumerate(episodes):
        response = episode.ids[episode.prompt_length :]
        response_ids[row, : len(response)] = torch.tensor(response)
        trained = episode.turns if train_turns == "all" else episode.turns[-1:]
        for start, end in trained:
            mask[row, start:end] = 1
    device = prompts["input_ids"].device
    return inputs, response_ids.to(device), mask.to(device)
