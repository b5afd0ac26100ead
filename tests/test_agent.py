"""Multi-turn episodes with tools (common/agent.py) on the random tiny Qwen2-VL and the zoom task: the episode is the
tokens sampled, turn by turn; tool tokens are read but neither trained on nor in the KL; two images in one episode
each get their features; batched scoring equals scoring one episode at a time; every script runs an agentic step."""

import json
import math

import torch

from common import tasks
from common.agent import MAX_TOOL_TEXT, add_tool_turn, call_tool, episode_batch, parse_tool_call, run_episodes, start_episodes, tool_turn_text
from common.policy import Rollouts, Sampler, batch_logprobs
from common.vlm import build_prompts, response_logprobs, suppressed_token_ids
from conftest import TOOL_CALL

TOOLS = tasks.get_task("zoom").tools


def zoom_episodes(model, processor, n=3, max_turns=3, greedy=False):
    """n zoom episodes, first turns forced to TOOL_CALL by the caller (force_tool_call); (prompts, episodes)."""
    examples = tasks.load_task("zoom", "train", n)
    prompts = build_prompts(processor, [e.image for e in examples], [e.question for e in examples], 512)
    torch.manual_seed(0)
    return prompts, run_episodes(model, None, processor, prompts, examples, 1, 6, 1.0, greedy, TOOLS, max_turns)


def test_parse_tool_call_reads_the_first_call_and_an_answer_is_none():
    assert parse_tool_call("<tool>zoom(2)</tool>") == ("zoom", "2")
    assert parse_tool_call("I look. <tool> python( print(1) ) </tool> then") == ("python", "print(1)")
    assert parse_tool_call("<answer>3</answer>") is None
    assert parse_tool_call("<tool>zoom 2</tool>") is None  # no parentheses: not a call


def test_the_episode_is_the_tokens_sampled_turn_by_turn(tiny_vlm, force_tool_call):
    model, processor = tiny_vlm
    turns = force_tool_call(processor)
    prompts, episodes = zoom_episodes(model, processor, max_turns=2)
    eos = processor.tokenizer.eos_token_id
    first, second = turns[0][1].tolist(), turns[1][1].tolist()
    for row, episode in enumerate(episodes):
        assert episode.tool_calls == 1 and len(episode.turns) == 2
        (s1, e1), (s2, e2) = episode.turns
        response = episode.ids[episode.prompt_length :]
        assert response[s1:e1] == first[row][: first[row].index(eos) + 1]  # turn 1 as sampled, end-of-turn included
        sampled = second[row][: second[row].index(eos) + 1] if eos in second[row] else second[row]
        assert response[s2:e2] == sampled  # turn 2 as sampled (cut at its end-of-turn token)
        tool = processor(text=[tool_turn_text(processor, tasks.zoom_tool("2", episode.example))], images=[[tasks.zoom_tool("2", episode.example)]], add_special_tokens=False)
        assert response[e1:s2] == tool["input_ids"][0]  # the tool's turn, tokenised on its own
        assert episode.mask == [1] * (e1 - s1) + [0] * (s2 - e1) + [1] * (e2 - s2)


def test_a_canonical_episode_equals_the_chat_templates_rendering_of_the_conversation(tiny_vlm):
    """No drift from re-rendering: when the model's turns are the tokeniser's own tokens for their text, the
    concatenated episode is exactly what the chat template renders for the whole conversation (the `\\n` after each
    end-of-turn token included), so an episode built by concatenation trains on the conversation the model saw."""
    _, processor = tiny_vlm
    example = tasks.load_task("zoom", "train", 1)[0]
    prompts = build_prompts(processor, [example.image], [example.question], 512)
    (episode,) = start_episodes(processor, prompts, [example], 1)
    eos = processor.tokenizer.eos_token
    episode.add(processor.tokenizer(TOOL_CALL + eos, add_special_tokens=False)["input_ids"], model_written=True)
    face = tasks.zoom_tool("2", example)
    add_tool_turn(episode, processor, face)
    episode.add(processor.tokenizer("<answer>4</answer>" + eos, add_special_tokens=False)["input_ids"], model_written=True)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example.question}]},
        {"role": "assistant", "content": [{"type": "text", "text": TOOL_CALL}]},
        {"role": "user", "content": [{"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<answer>4</answer>"}]},
    ]
    text = processor.apply_chat_template(conversation, tokenize=False).removesuffix("\n")  # the model stops at its eos
    rendered = processor(text=[text], images=[[example.image, face]])["input_ids"][0]
    assert episode.ids == rendered


def test_train_turns_last_masks_all_but_the_last_turn(tiny_vlm, force_tool_call):
    model, processor = tiny_vlm
    force_tool_call(processor)
    prompts, episodes = zoom_episodes(model, processor, max_turns=2)
    eos = processor.tokenizer.eos_token_id
    _, response_ids, every = episode_batch(prompts, episodes, eos, "all")
    _, _, last = episode_batch(prompts, episodes, eos, "last")
    for row, episode in enumerate(episodes):
        (s1, e1), (s2, e2) = episode.turns
        assert every[row, s1:e1].eq(1).all() and every[row, s2:e2].eq(1).all() and every[row, e1:s2].eq(0).all()
        assert last[row, :s2].eq(0).all() and last[row, s2:e2].eq(1).all() and last[row, e2:].eq(0).all()


def test_tool_tokens_get_no_gradient_and_do_not_enter_the_kl(tiny_vlm, force_tool_call, grpo):
    model, processor = tiny_vlm
    force_tool_call(processor)
    prompts, episodes = zoom_episodes(model, processor, max_turns=2)
    inputs, response_ids, mask = episode_batch(prompts, episodes, processor.tokenizer.eos_token_id)
    tool = (mask == 0) & (torch.arange(mask.shape[1]) < torch.tensor([len(e.mask) for e in episodes]).unsqueeze(1))
    assert tool.sum() > 30  # the tool's turns: its image (16 tokens) and the chat frame around it, per episode
    logprobs = response_logprobs(model, inputs, response_ids, mask, suppressed_token_ids(processor))
    assert logprobs[tool].eq(0).all()
    logprobs = logprobs.detach().requires_grad_(True)
    ref = logprobs.detach() - 0.1 * mask  # a reference 0.1 nats below on the model's tokens
    advantages = torch.tensor([1.0, -1.0, 0.5])
    loss, logs = grpo.grpo_loss(logprobs, logprobs.detach(), ref, advantages, mask, 0.2, 0.5)
    loss.backward()
    assert logprobs.grad[tool].eq(0).all() and logprobs.grad[mask.bool()].ne(0).all()
    far_ref = torch.where(tool, ref + 50.0, ref)  # a reference wildly off on the tool's tokens only
    loss_far, logs_far = grpo.grpo_loss(logprobs, logprobs.detach(), far_ref, advantages, mask, 0.2, 0.5)
    assert logs_far["losses/kl"].item() == logs["losses/kl"].item() > 0 and loss_far.item() == loss.item()


def test_two_images_in_one_episode_each_get_their_image_features(tiny_vlm, force_tool_call):
    model, processor = tiny_vlm
    force_tool_call(processor)
    prompts, episodes = zoom_episodes(model, processor, n=2, max_turns=2)
    inputs, response_ids, mask = episode_batch(prompts, episodes, processor.tokenizer.eos_token_id)
    merge = model.config.vision_config.spatial_merge_size
    for row in range(2):
        image_tokens = (inputs["input_ids"][row] == processor.image_token_id).sum() + (response_ids[row] == processor.image_token_id).sum()
        grids = inputs["image_grid_thw"][2 * row : 2 * row + 2]
        assert inputs["images_per_row"][row] == 2 and image_tokens == grids.prod(-1).sum() // merge**2
    suppressed = suppressed_token_ids(processor)
    logprobs = response_logprobs(model, inputs, response_ids, mask, suppressed)  # raises if tokens and features mismatch
    # the second image's features reach the second turn, and only it: another tool image changes turn 2's log-probs
    swapped = dict(inputs)
    blocks = list(inputs["pixel_values"].split(inputs["image_grid_thw"].prod(-1).tolist()))
    blocks[1] = -blocks[1]  # episode 0's tool image, negated
    swapped["pixel_values"] = torch.cat(blocks)
    other = response_logprobs(model, swapped, response_ids, mask, suppressed)
    (s1, e1), (s2, e2) = episodes[0].turns
    assert torch.equal(other[0, s1:e1], logprobs[0, s1:e1])  # turn 1 comes before the tool's image
    assert (other[0, s2:e2] - logprobs[0, s2:e2]).abs().max() > 1e-4
    assert torch.equal(other[1], logprobs[1])


def test_batched_episode_logprobs_equal_each_episode_scored_alone(tiny_vlm, force_tool_call):
    model, processor = tiny_vlm
    force_tool_call(processor)
    prompts, episodes = zoom_episodes(model, processor, n=4, max_turns=3)
    examples = [e.example for e in episodes]
    episodes[1] = start_episodes(processor, prompts, examples, 1)[1]  # answers at once:
    episodes[1].add(processor.tokenizer("<answer>3</answer>" + processor.tokenizer.eos_token, add_special_tokens=False)["input_ids"], True)
    inputs, response_ids, mask = episode_batch(prompts, episodes, processor.tokenizer.eos_token_id)
    assert inputs["images_per_row"].tolist()[1] == 1 and max(inputs["images_per_row"].tolist()) == 2
    completions, tool_calls = [e.answer for e in episodes], torch.tensor([float(e.tool_calls) for e in episodes])
    batch = Rollouts(inputs, response_ids, mask, completions, examples, tool_calls, 1, suppressed_token_ids(processor), 1.0)
    batched = batch_logprobs(model, batch)
    for row in range(4):  # batch[rows]: each row's prompt with its own images, the tool's included
        alone = batch_logprobs(model, batch[row : row + 1])
        torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch_logprobs(model, batch[[3, 1]]), batched[[3, 1]], atol=1e-5, rtol=0)


def test_dynamic_samplings_refill_moves_an_episode_group_with_its_tool_images(tiny_vlm, force_tool_call):
    # DAPO's refill (common.policy.Sampler.refill): slot 1 of `batch` takes group 1 of `new` (groups of G = 2), each
    # episode with its tool image; every row then scores as it did in its own batch
    model, processor = tiny_vlm
    force_tool_call(processor)

    def episodes(first, max_new_tokens, answer_at_once=()):  # 4 episodes of training examples first, first + 1, ...
        examples = tasks.load_task("zoom", "train", 8)[first : first + 4]
        prompts = build_prompts(processor, [e.image for e in examples], [e.question for e in examples], 512)
        episodes = run_episodes(model, None, processor, prompts, examples, 1, max_new_tokens, 1.0, False, TOOLS, 2)
        for row in answer_at_once:  # one image only
            episodes[row] = start_episodes(processor, prompts, examples, 1)[row]
            episodes[row].add(processor.tokenizer("<answer>3</answer>" + processor.tokenizer.eos_token, add_special_tokens=False)["input_ids"], True)
        inputs, response_ids, mask = episode_batch(prompts, episodes, processor.tokenizer.eos_token_id)
        tool_calls = torch.tensor([float(e.tool_calls) for e in episodes])
        batch = Rollouts(inputs, response_ids, mask, [e.answer for e in episodes], examples, tool_calls, 2, suppressed_token_ids(processor), 1.0)
        batch.rewards = torch.arange(float(first), first + 4.0)
        return batch

    torch.manual_seed(0)
    batch, new = episodes(0, max_new_tokens=6, answer_at_once=[2]), episodes(4, max_new_tokens=3, answer_at_once=[1])
    assert batch.response_ids.shape[1] != new.response_ids.shape[1]
    sampler = Sampler(model, processor, None, TOOLS, "cpu", 6, 512, 1.0, 3, "all")
    refilled = sampler.refill(batch, [1], new, torch.tensor([False, True]))
    assert refilled.rewards.tolist() == [0.0, 1.0, 6.0, 7.0] and refilled.tool_calls.tolist() == [1, 1, 1, 1]
    assert refilled.examples == batch.examples[:2] + new.examples[2:]
    assert refilled.inputs["images_per_row"].tolist() == [2, 2, 2, 2]
    scored = batch_logprobs(model, refilled)
    for rows, source in ((slice(0, 2), batch), (slice(2, 4), new)):
        alone = batch_logprobs(model, source)[rows]
        width = alone.shape[1]
        torch.testing.assert_close(scored[rows, :width], alone, atol=1e-5, rtol=0)
        assert (scored[rows, width:] == 0).all()
    assert sampler.refill(batch, [1], new, torch.tensor([False, False])) is batch  # no informative group: unchanged


def test_a_tool_error_is_a_turn_the_model_reads_and_a_flood_is_cut(tiny_vlm):
    _, processor = tiny_vlm
    example = tasks.load_task("zoom", "train", 1)[0]
    prompts = build_prompts(processor, [example.image], [example.question], 512)
    (episode,) = start_episodes(processor, prompts, [example], 1)
    assert call_tool(TOOLS, ("zoom", "9"), example) == "zoom(9): k is 1, 2, 3 or 4"
    assert call_tool(TOOLS, ("search", "cats"), example).startswith("error: no tool 'search'")
    add_tool_turn(episode, processor, "x" * 10 * MAX_TOOL_TEXT)
    text = processor.tokenizer.decode(episode.ids[episode.prompt_length :])
    assert text.count("x") == MAX_TOOL_TEXT and "more characters cut" in text and episode.mask == [0] * len(episode.mask)


def test_every_script_runs_one_agentic_step_that_trains_on_its_episodes(script, tiny_model_dir, tmp_path, one_thread, force_tool_call):
    """One zoom step in-process, first turns forced to a tool call, rewards alternating 0, 1 (every group varies):
    each episode calls the tool once, its tool turn comes back in the log's length, and the update is finite."""
    from test_scripts import LOSSES, run_in_process

    from common.vlm import load_processor

    force_tool_call(load_processor(tiny_model_dir))
    flags = ["--task", "zoom", "--total-steps", "1", "--max-turns", "2"]
    records, _ = run_in_process(script, tiny_model_dir, tmp_path, *flags)
    step = records[1]
    assert step["charts/tool_calls"] == 1.0, step
    logged = [key for key in LOSSES if key in step]  # losses/kl only where there is a KL term
    assert step["losses/loss"] is not None and all(math.isfinite(step[key]) for key in logged), step
    args = json.loads(next(tmp_path.iterdir()).joinpath("args.json").read_text())
    assert args["task"] == "zoom" and args["max_turns"] == 2 and args["train_turns"] == "all"
