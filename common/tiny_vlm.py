"""The embedded tiny VLM: a real Qwen2-VL (transformers' own class and processor) at tiny size, so the
whole pipeline runs offline on a laptop CPU and is loaded through the same `from_pretrained` path as a real
checkpoint.

`--model tiny` resolves to a directory under the cache (`$VLRL_CACHE`, default `~/.cache/vlrl`) that this
module builds deterministically on first use:
  1. a byte-level BPE tokenizer trained with `tokenizers` on the task's prompt text, carrying Qwen2-VL's
     special tokens and a chat template without the default system message;
  2. a randomly initialised `Qwen2VLForConditionalGeneration` (text: 4 layers × 128; vision: 2 blocks × 64,
     16-pixel patches, no merge → a 64×64 image is 16 image tokens);
  3. a short supervised warm start (`warm_start`) on the task's own 'warmstart' split, disjoint from the
     train and held-out seeds. It teaches the answer format and is stopped early, while accuracy is still
     low, so that what RL adds is measured from there.
"""

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from common import dist, tasks
from common.agent import add_tool_turn, call_tool, episode_batch, greedy_rewards, parse_tool_call, start_episodes
from common.judges import Judge
from common.vlm import (
    Qwen2VLImageOnlyProcessor,
    build_prompts,
    load_vlm,
    response_logprobs,
    response_mask,
    set_image_size_limits,
    suppressed_token_ids,
)

SPECIAL_TOKENS = [  # Qwen2-VL's, in its order
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
ANSWER_TOKENS = ["<answer>", "</answer>"]  # whole tokens here, so an answer is 3 tokens + EOS

# Qwen2-VL's chat template without the default system message (as Qwen3-VL's): every text token the
# answer position attends to dilutes the 16 image tokens, and a tiny model from scratch learns to read the
# image much faster when they are half the prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY = dict(  # the architecture; changing anything here changes the cache key
    text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
              "mrope_section": [4, 6, 6]}, max_position_embeddings=1024),
    vision=dict(depth=2, embed_dim=64, num_heads=2, mlp_ratio=4, patch_size=16, spatial_merge_size=1,
                temporal_patch_size=2),
    image_size=64, vocab_size=512, seed=0,
)  # fmt: skip


def task_with_tiny_model(task: str) -> tasks.Task:
    """The task's record (common/tasks.py), which says how the tiny model is built for it: its warm start and the text
    its tokenizer learns."""
    record = tasks.get_task(task)
    if record.warm_start is None or record.tokenizer_text is None:
        raise SystemExit(f"the embedded tiny model has no warm start for --task {task}: pass --model (a hub id or a checkpoint dir)")
    return record


def tokenizer_corpus(task: str = "counting"):
    """Text the tiny tokenizer is trained on: the chat frame, the task's prompts and answers, digits."""
    lines = ["You are a helpful assistant.", "system", "user", "assistant"]
    lines += task_with_tiny_model(task).tokenizer_text()
    lines += [" ".join(map(str, range(n, n + 10))) for n in range(0, 1000, 7)]
    words = "the a an of in on is are how many what which where shape shapes object objects image picture colour color"
    words += " red blue green yellow circle square triangle small large left right top bottom answer number count"
    rng = random.Random(0)
    lines += [" ".join(rng.choice(words.split()) for _ in range(8)).capitalize() + rng.choice("?.") for _ in range(500)]
    return lines


def train_tokenizer(
    vocab_size: int, corpus: list[str] | None = None, special_tokens: list[str] = SPECIAL_TOKENS,
    eos_token: str = "<|im_end|>", pad_token: str = "<|endoftext|>", extra_special_tokens: dict | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (digits split one by one, as Qwen2's) with a model family's special tokens.
    `extra_special_tokens` names the multimodal ones for the processor (default: Qwen2-VL's image/video pads)."""
    tok = Tokenizer(models.BPE())
    # Qwen2 style: digits one by one, then byte-level BPE
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(ANSWER_TOKENS),
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else tokenizer_corpus(), trainer)
    if extra_special_tokens is None:
        extra_special_tokens = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token, unk_token=None,
        extra_special_tokens=extra_special_tokens,
        model_max_length=TINY["text"]["max_position_embeddings"],
    )  # fmt: skip
    fast.add_tokens(ANSWER_TOKENS)
    return fast


def tiny_processor(task: str = "counting", min_pixels: int | None = None, max_pixels: int | None = None,
                   extra_text: tuple[str, ...] = ()):  # fmt: skip
    """The tiny model's processor (tokenizer, image processor, chat template), built in memory in milliseconds:
    the same one its checkpoint saves, so the scripts can check their prompts before the model is built.
    extra_text: more text for its tokenizer (the tiny judge's prompts)."""
    tokenizer = train_tokenizer(TINY["vocab_size"], tokenizer_corpus(task) + list(extra_text))
    size = TINY["image_size"]
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=TINY["vision"]["patch_size"], merge_size=TINY["vision"]["spatial_merge_size"],
        temporal_patch_size=TINY["vision"]["temporal_patch_size"], min_pixels=size * size, max_pixels=size * size,
    )  # fmt: skip
    processor = Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)
    set_image_size_limits(processor, min_pixels, max_pixels)
    return processor


def build_random_tiny_vlm(out_dir: str, task: str = "counting", extra_text: tuple[str, ...] = ()):
    """Tokenizer + processor + randomly initialised Qwen2-VL, saved with save_pretrained. Deterministic."""
    processor = tiny_processor(task, extra_text=extra_text)
    tokenizer = processor.tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config=dict(**TINY["text"], vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(**TINY["vision"], hidden_size=TINY["text"]["hidden_size"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(TINY["seed"])
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def warm_start(model_dir: str, task: str, max_steps: int, batch_size: int, lr: float, target_accuracy: float, log=print):
    """Supervised fine-tuning on the task's 'warmstart' split until greedy accuracy on 200 more warmstart
    examples (never the held-out set) reaches `target_accuracy`, or `max_steps`; saves in place. Stopping on
    accuracy rather than a step count makes the starting point the same on every machine."""
    torch.manual_seed(0)
    model, processor = load_vlm(model_dir)
    examples = tasks.load_task(task, "warmstart", max_steps * batch_size + 200, image_size=TINY["image_size"])
    train, validation = examples[:-200], examples[-200:]
    tok = processor.tokenizer
    eos = tok.eos_token_id  # the stop token, as common.vlm.stop_token_id
    suppressed = suppressed_token_ids(processor)
    record = tasks.get_task(task)
    tools = record.tools
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(1, max_steps + 1):
        batch = train[(step - 1) * batch_size : step * batch_size]
        prompts = build_prompts(processor, [e.image for e in batch], [e.question for e in batch], 4096)
        if tools:  # an agentic task: its ideal episodes, built turn by turn as a rollout builds them
            prompts, target_ids, mask = ideal_episodes(processor, prompts, batch, task, tools)
        else:
            targets = [tasks.ideal_response(task, e) + tok.eos_token for e in batch]
            target_ids = tok(targets, padding=True, padding_side="right", return_tensors="pt")["input_ids"]
            target_ids[target_ids == tok.pad_token_id] = eos
            mask = response_mask(target_ids, eos)
        loss = -response_logprobs(model, prompts, target_ids, mask, suppressed).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            rewards = greedy_rewards(model, processor, validation, record.reward_fn(), record.max_new_tokens, 4096, tools=tools, max_turns=3)
            metrics = record.summarize(rewards, "warmstart-validation")
            log(f"warm start step {step}: loss {loss.item():.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            accuracy = metrics["warmstart-validation/accuracy"]
            if accuracy >= target_accuracy:
                break
    model.save_pretrained(model_dir)


def ideal_episodes(processor, prompts, examples, task: str, tools: dict):
    """(inputs, response ids, mask) of the ideal episodes of an agentic task (tasks.ideal_turns), each model turn
    tokenised and followed by its tool's real result, exactly as common/agent.py assembles a sampled episode."""
    eos = processor.tokenizer.eos_token
    episodes = start_episodes(processor, prompts, examples, 1)
    for episode in episodes:
        turns = tasks.ideal_turns(task, episode.example)
        for k, text in enumerate(turns):
            episode.add(processor.tokenizer(text + eos, add_special_tokens=False)["input_ids"], model_written=True)
            if k < len(turns) - 1:
                add_tool_turn(episode, processor, call_tool(tools, parse_tool_call(text), episode.example))
    return episode_batch(prompts, episodes, processor.tokenizer.eos_token_id)


def judge_examples(task: str, split: str, n: int, seed: int) -> tuple[list, list[str], list[bool]]:
    """(examples, responses, is each right by the task's rule) for the tiny judge: n examples of the task's split, each
    with its ideal response (1/2), the ideal response with a wrong answer (3/10), with junk for the answer (3/25) or
    with a piece of it replaced by junk (2/25). Junk: random characters, a word of the question, a piece of the ideal
    response or the answer twice (one draw in five is empty: a wrong answer instead). A judge whose negatives were
    only wrong answers was hacked in 40 steps, the policy answering "<answer>he</answer>" (docs/rewards.md)."""
    record, rng = tasks.get_task(task), random.Random(seed)
    rule = record.reward_fn()
    examples, responses, right = tasks.load_task(task, split, n, image_size=TINY["image_size"]), [], []
    for e in examples:
        ideal, u = record.ideal_response(e), rng.random()
        a, b = sorted(rng.sample(range(len(ideal) + 1), 2))
        junk = rng.choice(["", "".join(chr(rng.randint(1, 126)) for _ in range(rng.randint(1, 3))),
                           rng.choice(e.question.split()), ideal[a:b], e.answer * 2])  # fmt: skip
        if u < 0.5:
            response = ideal
        elif u < 0.75 or junk == "":  # an empty draw: a wrong answer
            response = record.ideal_response(dataclasses.replace(e, answer=record.wrong_answer(e, rng)))
        elif u < 0.9:
            response = record.ideal_response(dataclasses.replace(e, answer=junk))
        else:
            response = ideal[:a] + junk + ideal[b:]
        responses.append(response)
        right.append(rule(response, e.answer) >= record.success)
    return examples, responses, right


def judge_text(task: str) -> list[str]:
    """What the tiny judge's tokenizer learns besides the policy's text: its prompts and verdicts."""
    template = tasks.get_task(task).judge_template
    examples, responses, _ = judge_examples(task, "warmstart", 100, 1)
    return [template.format(question=e.question, response=r, reference=e.answer) for e, r in zip(examples, responses)] + ["yes", "no"]


def judge_warm_start(model_dir: str, task: str, comparison_steps: int, max_steps: int, batch_size: int, lr: float,
                     target_agreement: float, log=print):  # fmt: skip
    """Supervised fine-tuning of the verdict's first token ("yes" / "no") on the task's 'warmstart' split, in two parts.
    1. The bare comparison "<reference> <response>" (no image, no prompt) of other judge_examples, until 99 % of the
       last 25 batches are right, or `comparison_steps`: a tiny model learns to compare there in a few hundred fast
       steps.
    2. The judge prompt itself, image and all, beside a batch of bare comparisons (so that it is kept), the rate
       decaying linearly to 0 over `max_steps`, until the judge agrees with the rule on 500 more warm-start responses
       (never the held-out set) `target_agreement` of the time. Saves in place.
    On the judge prompt from the start it stays at chance for ~700 steps (docs/rewards.md)."""
    torch.manual_seed(0)
    model, processor = load_vlm(model_dir)
    tok, template = processor.tokenizer, tasks.get_task(task).judge_template
    yes, no = (tok(word, add_special_tokens=False)["input_ids"][0] for word in ("yes", "no"))
    judge = Judge(model, processor, template, 100, 4096)
    pairs = judge_examples(task, "warmstart", (comparison_steps + max_steps) * batch_size, 1)
    examples, responses, right = judge_examples(task, "warmstart", max_steps * batch_size + 500, 0)
    validation = slice(len(examples) - 500, len(examples))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def verdict_loss(inputs, rights):  # (loss, share right)
        verdicts = torch.tensor([yes if r else no for r in rights])
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]  # (batch, V): the verdict's
        return torch.nn.functional.cross_entropy(logits, verdicts), (logits.argmax(-1) == verdicts).float().mean()

    def bare_loss(step):  # of batch `step` of the bare comparisons
        rows = range((step - 1) * batch_size, step * batch_size)
        texts = [f"{pairs[0][i].answer} {pairs[1][i]}" for i in rows]
        inputs = tok(texts, padding=True, padding_side="left", return_tensors="pt", return_token_type_ids=False)
        return verdict_loss(inputs, [pairs[2][i] for i in rows])

    def update(loss):
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    model.train()
    recent = []  # the last 25 batches' shares right
    for step in range(1, comparison_steps + 1):  # 1. the bare comparison
        loss, share = bare_loss(step)
        update(loss)
        recent = (recent + [share.item()])[-25:]
        if step % 25 == 0:
            log(f"judge warm start, bare comparison, step {step}: loss {loss.item():.3f}, right {sum(recent) / 25:.3f}")
            if sum(recent) / 25 >= 0.99:
                break
    for step in range(1, max_steps + 1):  # 2. the judge prompt
        rows = range((step - 1) * batch_size, step * batch_size)
        texts = [judge.prompt(examples[i], responses[i]) for i in rows]
        inputs = build_prompts(processor, [examples[i].image for i in rows], texts, 4096)
        model.train()
        loss = verdict_loss(inputs, [right[i] for i in rows])[0] + bare_loss(comparison_steps + step)[0]
        update(loss)
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - step / max_steps)
        if step % 25 == 0 or step == max_steps:
            scores = judge.scores(examples[validation], responses[validation])
            agreement = ((scores >= 0.5) == torch.tensor(right[validation])).float().mean().item()
            log(f"judge warm start, judge prompt, step {step}: loss {loss.item():.3f}, agreement {agreement:.3f}")
            if agreement >= target_agreement:
                break
    model.save_pretrained(model_dir)


def tiny_model_dir(task: str) -> str:
    """Path of the embedded tiny VLM warm-started for `task`; built on first use, then cached. Under torchrun rank 0
    builds it while the other ranks wait."""
    return dist.rank0_first(cached_tiny_model_dir, task)


def tiny_judge_dir(task: str) -> str:
    """Path of the embedded tiny judge of `task` (--reward-model tiny-judge): a tiny Qwen2-VL of the same size,
    warm-started to answer whether a response is right for its image (judge_warm_start); built on first use, then
    cached, like the tiny policy."""
    return dist.rank0_first(cached_tiny_judge_dir, task)


def warmstart_images(task: str) -> str:
    """The warm start's first images stand for how the task draws its data: a change there rebuilds the model."""
    return hashlib.sha256(b"".join(e.image.tobytes() for e in tasks.load_task(task, "warmstart", 16))).hexdigest()


def cached_tiny_model_dir(task: str) -> str:
    record = task_with_tiny_model(task)
    recipe = [TINY, record.warm_start, task, CHAT_TEMPLATE, tokenizer_corpus(task), warmstart_images(task)]

    def build(out_dir):
        build_random_tiny_vlm(out_dir, task)
        warm_start(out_dir, task, **record.warm_start)

    return cached_build(f"tiny-qwen2-vl-{task}", recipe, build, f"the embedded tiny VLM for '{task}'")


def cached_tiny_judge_dir(task: str) -> str:
    record = task_with_tiny_model(task)
    if record.judge_warm_start is None or record.wrong_answer is None:
        raise SystemExit(f"--reward-model tiny-judge: --task {task} has no tiny judge (counting has one): pass a "
                         "judge checkpoint (docs/rewards.md)")  # fmt: skip
    text = judge_text(task)
    recipe = ["judge", TINY, record.judge_warm_start, task, CHAT_TEMPLATE, tokenizer_corpus(task), text,
              warmstart_images(task)]  # fmt: skip

    def build(out_dir):
        build_random_tiny_vlm(out_dir, task, tuple(text))
        judge_warm_start(out_dir, task, **record.judge_warm_start)

    return cached_build(f"tiny-judge-qwen2-vl-{task}", recipe, build, f"the embedded tiny judge for '{task}'")


def cached_build(name: str, recipe: list, build, what: str) -> str:
    """<cache>/<name>-<hash of recipe>, built by build(dir) unless it is there already (a DONE file says so)."""
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    cache = os.environ.get("VLRL_CACHE", os.path.expanduser("~/.cache/vlrl"))
    path = os.path.join(cache, f"{name}-{key}")
    if os.path.exists(os.path.join(path, "DONE")):
        return path
    t0 = time.time()
    print(f"building {what} in {path} (once; cached afterwards)")
    remove_stale_builds(path)
    tmp = f"{path}.tmp{os.getpid()}"  # build aside, then rename: an interrupted build leaves no half model
    try:
        # the build seeds torch itself; fork_rng gives the caller its random state back, so that a run that builds
        # the model samples exactly what the same run with the model already cached does
        with torch.random.fork_rng():
            build(tmp)
        open(os.path.join(tmp, "DONE"), "w").write(f"built in {time.time() - t0:.1f}s\n")
    except BaseException:  # Ctrl-C (KeyboardInterrupt) included: nothing would ever remove the folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.makedirs(cache, exist_ok=True)
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"built in {time.time() - t0:.1f}s")
    return path


def remove_stale_builds(path: str):
    """Remove `{path}.tmp<pid>` folders whose process is gone: a build killed with SIGKILL (or a power cut) has
    no chance to clean up after itself. A running build's folder is left alone."""
    parent, name = os.path.split(path)
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        pid = entry.removeprefix(f"{name}.tmp")
        if entry.startswith(f"{name}.tmp") and pid.isdigit() and not process_exists(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks that the process exists, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True
