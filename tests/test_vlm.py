"""The model side on a random tiny Qwen2-VL: loading, prompts, batched scoring, and that the log-probs we train
on are those of the policy we sample from."""

import re
import shutil

import pytest
import torch

from common import tasks
from common.tiny_vlm import TINY
from common.vlm import (
    build_prompts,
    cat_inputs,
    generate,
    load_processor,
    load_vlm,
    response_logprobs,
    response_mask,
    suppressed_token_ids,
    take_rows,
)

# different lengths → different amounts of left padding in one batch
QUESTIONS = [
    "How many?",
    "How many shapes are in the image? Answer with <answer>N</answer>.",
    "How many shapes are in the picture, small or large, red blue green or yellow? Answer with <answer>N</answer>.",
]


def ids(processor, token: str) -> int:
    return processor.tokenizer.convert_tokens_to_ids(token)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def test_reloading_a_saved_checkpoint_gives_the_same_logits(tiny_vlm, make_prompts, tmp_path):
    model, processor = tiny_vlm
    batch = make_prompts(QUESTIONS[:2])
    model.save_pretrained(tmp_path / "again")
    processor.save_pretrained(tmp_path / "again")  # what algos/grpo_vlm.py does with the trained model
    reloaded, reloaded_processor = load_vlm(str(tmp_path / "again"))
    assert torch.equal(logits(reloaded.eval(), batch), logits(model, batch))
    rebuilt = make_prompts(QUESTIONS[:2], processor=reloaded_processor)
    assert all(torch.equal(rebuilt[key], batch[key]) for key in batch)


def test_loading_the_same_directory_twice_gives_identical_logits(tiny_model_dir, make_prompts):
    batch = make_prompts(QUESTIONS[:2])
    first, second = load_vlm(tiny_model_dir)[0].eval(), load_vlm(tiny_model_dir)[0].eval()
    assert torch.equal(logits(first, batch), logits(second, batch))


def test_a_checkpoint_saved_with_pixel_limits_resizes_to_the_size_a_call_passes(tiny_model_dir, tmp_path):
    """--min/--max-pixels live in the image processor's `size` only. A processor given them as from_pretrained
    kwargs also saves them in tokenizer_config.json, and from there they override the `size` a call passes,
    which is how vLLM applies the flags (mm_processor_kwargs) to the trained checkpoint the script saves."""
    processor = load_processor(tiny_model_dir, min_pixels=32 * 32, max_pixels=32 * 32)  # 64 px images → 32 px
    processor.save_pretrained(tmp_path)
    shutil.copy(f"{tiny_model_dir}/config.json", tmp_path)
    reloaded = load_processor(str(tmp_path))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
    text = reloaded.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    image = tasks.load_task("counting", "eval", 1)[0].image  # 64 x 64: 4 x 4 patches of 16 px
    saved = reloaded(text=[text], images=[[image]], return_tensors="pt")["image_grid_thw"]
    full = {"shortest_edge": 64 * 64, "longest_edge": 64 * 64}
    called = reloaded(text=[text], images=[[image]], size=full, return_tensors="pt")["image_grid_thw"]
    assert (saved.tolist(), called.tolist()) == ([[1, 2, 2]], [[1, 4, 4]])


def test_load_vlm_on_a_missing_path_exits_naming_it():
    with pytest.raises(SystemExit, match="/nonexistent/model"):
        load_vlm("/nonexistent/model")


def test_load_vlm_on_a_directory_without_a_checkpoint_exits_naming_it(tmp_path):
    with pytest.raises(SystemExit, match=re.escape(str(tmp_path))):
        load_vlm(str(tmp_path))


def test_prompt_has_one_image_pad_per_merged_patch(tiny_vlm, make_prompts):
    _, processor = tiny_vlm
    batch = make_prompts(QUESTIONS)
    # a 64x64 image in p-pixel patches → (64/p)^2 patches; an m x m merge → (64/p)^2 / m^2 image tokens
    p, m = TINY["vision"]["patch_size"], TINY["vision"]["spatial_merge_size"]
    patches = (64 // p) ** 2
    assert (batch["input_ids"] == ids(processor, "<|image_pad|>")).sum(1).tolist() == [patches // m**2] * 3
    assert batch["pixel_values"].shape[0] == 3 * patches
    assert processor.tokenizer.padding_side == "left"
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"][:, 0] == 0).any()


def test_prompt_longer_than_the_limit_exits_naming_the_flag(make_prompts):
    with pytest.raises(SystemExit, match="--max-prompt-tokens"):
        make_prompts(QUESTIONS[:1], max_prompt_tokens=20)


def test_response_mask_covers_tokens_up_to_and_including_the_first_eos():
    eos = 2
    responses = torch.tensor([[5, 2, 7, 2], [2, 2, 2, 2], [5, 6, 7, 8], [5, 6, 7, 2]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]).float()
    assert torch.equal(response_mask(responses, eos), expected)


def test_select_gathers_each_rows_image_block():
    # hand-made batch: image 0 has 4 patch rows, image 1 has 16 (different grids), each row tagged by its image
    inputs = {
        "input_ids": torch.tensor([[1, 2], [3, 4]]),
        "attention_mask": torch.tensor([[0, 1], [1, 1]]),
        "pixel_values": torch.cat([torch.full((4, 3), 0.0), torch.full((16, 3), 1.0)]),
        "image_grid_thw": torch.tensor([[1, 2, 2], [1, 4, 4]]),
    }
    out = take_rows(inputs, [1, 0, 1])
    assert torch.equal(out["input_ids"], torch.tensor([[3, 4], [1, 2], [3, 4]]))
    assert torch.equal(out["attention_mask"], torch.tensor([[1, 1], [0, 1], [1, 1]]))
    expected_pixels = torch.cat([torch.full((16, 3), 1.0), torch.full((4, 3), 0.0), torch.full((16, 3), 1.0)])
    assert torch.equal(out["pixel_values"], expected_pixels)
    assert torch.equal(out["image_grid_thw"], torch.tensor([[1, 4, 4], [1, 2, 2], [1, 4, 4]]))


def test_select_swapping_rows_equals_building_the_batch_swapped(tiny_vlm):
    _, processor = tiny_vlm
    images = [e.image for e in tasks.load_task("counting", "eval", 2)]
    batch = build_prompts(processor, images, QUESTIONS[:2], 512)
    swapped = build_prompts(processor, images[::-1], QUESTIONS[:2][::-1], 512)
    out = take_rows(batch, [1, 0])
    assert not torch.equal(batch["pixel_values"], swapped["pixel_values"])  # the images differ
    for key in swapped:
        assert torch.equal(out[key], swapped[key]), key


def test_cat_inputs_keeps_each_rows_images_when_one_batch_has_several_per_row():
    # (each family's processor batches, concatenated: tests/test_families.py)
    # an agentic batch (row 0: 2 images, row 1: 1) and a one-turn batch (1 image per row, no images_per_row)
    episodes = {
        "input_ids": torch.tensor([[7, 8], [9, 9]]),
        "attention_mask": torch.tensor([[1, 1], [1, 1]]),
        "pixel_values": torch.cat([torch.full((4, 3), 0.0), torch.full((4, 3), 1.0), torch.full((16, 3), 2.0)]),
        "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 2], [1, 4, 4]]),
        "images_per_row": torch.tensor([2, 1]),
    }
    one_turn = {
        "input_ids": torch.tensor([[5, 6, 7]]),
        "attention_mask": torch.tensor([[1, 1, 1]]),
        "pixel_values": torch.full((4, 3), 3.0),
        "image_grid_thw": torch.tensor([[1, 2, 2]]),
    }
    out = cat_inputs(one_turn, episodes, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 7, 8], [0, 9, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1], [0, 1, 1]]
    assert out["images_per_row"].tolist() == [1, 2, 1]
    for row, tags in enumerate([[3.0], [0.0, 1.0], [2.0]]):  # take_rows reads each row's images back
        picked = take_rows(out, [row])
        assert picked["pixel_values"][:, 0].unique_consecutive().tolist() == tags, row


@pytest.fixture(scope="module")
def scored(tiny_vlm, make_prompts):
    """Responses of different lengths, padded with EOS after EOS, scored as one batch and one at a time."""
    model, processor = tiny_vlm
    eos = ids(processor, "<|im_end|>")
    answer_open, answer_close = ids(processor, "<answer>"), ids(processor, "</answer>")
    digit = processor.tokenizer.convert_tokens_to_ids("3")
    responses = torch.tensor(
        [
            [answer_open, digit, answer_close, eos, eos, eos],
            [digit, eos, eos, eos, eos, eos],
            [answer_open, digit, digit, digit, answer_close, digit],  # no EOS: all 6 tokens count
        ]
    )
    mask = response_mask(responses, eos)
    suppressed = suppressed_token_ids(processor)
    prompts = make_prompts(QUESTIONS)
    assert (prompts["attention_mask"][:2, 0] == 0).all()  # the two shorter prompts are left-padded
    with torch.no_grad():
        batched = response_logprobs(model, prompts, responses, mask, suppressed)
        alone = torch.cat(
            [response_logprobs(model, make_prompts(QUESTIONS[i : i + 1], first=i), responses[i : i + 1], mask[i : i + 1], suppressed) for i in range(3)]
        )  # fmt: skip
    return dict(responses=responses, mask=mask, batched=batched, alone=alone, suppressed=suppressed, eos=eos)


def test_batched_logprobs_with_left_padding_equal_one_at_a_time(scored):
    assert torch.allclose(scored["batched"], scored["alone"], atol=1e-4)
    assert (scored["batched"][scored["mask"].bool()] < 0).all()  # real log-probs where the mask is on


def test_logprobs_after_eos_are_zero_and_do_not_change_earlier_positions(tiny_vlm, make_prompts, scored):
    model, processor = tiny_vlm
    eos, mask = scored["eos"], scored["mask"]
    responses = scored["responses"].clone()
    # garbage after the first EOS, including suppressed specials (<|endoftext|>, <|im_start|>) and a later EOS
    responses[0, 4:] = torch.tensor([ids(processor, "<|endoftext|>"), ids(processor, "<|im_start|>")])
    responses[1, 2:] = torch.tensor([7, 8, eos, 9])
    assert torch.equal(response_mask(responses, eos), mask)
    prompts = make_prompts(QUESTIONS)
    logprobs = response_logprobs(model, prompts, responses, mask, scored["suppressed"])
    assert torch.equal(logprobs[mask == 0], torch.zeros(int((mask == 0).sum())))
    assert torch.allclose(logprobs, scored["batched"], atol=1e-5)
    model.zero_grad()
    logprobs.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)


def test_scoring_a_suppressed_token_gives_minus_infinity(tiny_vlm, make_prompts, scored):
    model, processor = tiny_vlm
    responses = torch.tensor([[ids(processor, "<|im_start|>"), scored["eos"]]])
    with torch.no_grad():
        logprobs = response_logprobs(model, make_prompts(QUESTIONS[:1]), responses, torch.ones(1, 2), scored["suppressed"])
    assert logprobs[0, 0] == float("-inf") and torch.isfinite(logprobs[0, 1])


def test_suppressed_ids_are_the_special_tokens_except_eos(tiny_vlm):
    _, processor = tiny_vlm
    suppressed = suppressed_token_ids(processor)
    for token in ["<|endoftext|>", "<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>"]:
        assert ids(processor, token) in suppressed, token
    for token in ["<|im_end|>", "<answer>", "</answer>", "3"]:
        assert ids(processor, token) not in suppressed, token


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_training_logprobs_equal_the_sampling_distribution_of_generate(tiny_vlm, make_prompts, sample_with_scores, temperature):
    """common.vlm.generate as the trainer calls it, its sampling settings unread here: a top-k or top-p cut, another
    temperature or an unsuppressed token would make the distribution it samples from differ from the one we train."""
    model, processor = tiny_vlm
    prompts = make_prompts(QUESTIONS[:2])
    eos, suppressed, G = ids(processor, "<|im_end|>"), suppressed_token_ids(processor), 3
    torch.manual_seed(0)
    responses, scores = sample_with_scores(model, processor, prompts, G, 6, temperature)  # scores: (N, T, V)
    mask = response_mask(responses, eos)
    assert (scores[..., suppressed] == float("-inf")).all()
    sampled = torch.log_softmax(scores, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        trained = response_logprobs(model, take_rows(prompts, [0] * G + [1] * G), responses, mask, suppressed, temperature)
    on = mask.bool()
    assert torch.allclose(trained[on], sampled[on], atol=1e-4)


@pytest.mark.parametrize("hidden_states", [False, True])
def test_rows_sharing_a_prompt_score_as_one_row_each_within_1e_5_gradients_too(tiny_vlm, make_prompts, hidden_states):
    # groups of 3, 2 and 1 rows with one prompt each (left-padded to different lengths), responses of different
    # lengths, EOS-padded: packed into one row per prompt (common.vlm.shared_prompt_forward) they must give what
    # scoring each row alone gives (one_row_each_forward), the log-probs, the hidden states and the gradients
    from common.vlm import one_row_each_forward, shared_prompt_runs

    model, processor = tiny_vlm
    eos, suppressed = ids(processor, "<|im_end|>"), suppressed_token_ids(processor)
    prompts = take_rows(make_prompts(QUESTIONS), [0, 0, 0, 1, 1, 2])
    assert shared_prompt_runs(model, prompts) == [3, 2, 1]
    torch.manual_seed(0)
    responses = torch.randint(10, 60, (6, 5))
    responses[0, 2:], responses[3, 4:], responses[4, 0] = eos, eos, eos  # lengths 3, 5, 5, 5, 1, 5
    mask = response_mask(responses, eos)

    def scored(shared: bool):
        model.zero_grad(set_to_none=True)
        if shared:
            out = response_logprobs(model, prompts, responses, mask, suppressed, 0.7, hidden_states)
        else:
            rows = [one_row_each_forward(model, take_rows(prompts, [i]), responses[i : i + 1], mask[i : i + 1],
                                         hidden_states) for i in range(6)]  # fmt: skip
            logits = torch.cat([r[0] for r in rows]).float() / 0.7
            logits[..., suppressed] = float("-inf")
            out = torch.log_softmax(logits, -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1) * mask
            out = (out, torch.cat([r[1] for r in rows])) if hidden_states else out
        logprobs, hidden = out if hidden_states else (out, None)
        loss = (logprobs * torch.linspace(-1, 1, 6).view(6, 1)).sum()
        loss = loss + (hidden * mask.unsqueeze(-1)).sum() if hidden_states else loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return logprobs.detach(), hidden.detach() if hidden_states else None, grads

    shared, alone = scored(True), scored(False)
    torch.testing.assert_close(shared[0], alone[0], atol=1e-5, rtol=0)
    assert (shared[0][mask.bool()] < 0).all() and (shared[0][~mask.bool()] == 0).all()
    if hidden_states:  # where the mask is on (after it, a row alone numbers the unattended tokens 1, packed t)
        torch.testing.assert_close(shared[1][mask.bool()], alone[1][mask.bool()], atol=1e-5, rtol=1e-5)
    assert shared[2].keys() == alone[2].keys() and any("visual" in name for name in shared[2])
    for name in shared[2]:
        shared_grad, alone_grad = shared[2][name], alone[2][name]  # within 1e-5 of the tensor's largest (rounding)
        assert (shared_grad - alone_grad).abs().max() <= 1e-5 * alone_grad.abs().max() + 1e-7, name


def test_rows_with_different_prompts_or_images_are_not_shared(tiny_vlm, make_prompts):
    from common.vlm import shared_prompt_runs

    model, processor = tiny_vlm
    prompts = make_prompts(QUESTIONS)
    assert shared_prompt_runs(model, prompts) is None  # three prompts, one row each: nothing to share
    same_text = make_prompts([QUESTIONS[0]] * 2)  # one question, the tokens alike, over two different scenes
    assert torch.equal(same_text["input_ids"][0], same_text["input_ids"][1])
    assert shared_prompt_runs(model, same_text) is None


def test_sampling_never_emits_a_suppressed_token(tiny_vlm, make_prompts):
    model, processor = tiny_vlm
    torch.manual_seed(0)
    responses = generate(model, processor, make_prompts(QUESTIONS[:2]), 64, 8, 1.0, greedy=False)
    assert responses.shape == (128, 8)
    emitted = set(responses.flatten().tolist())
    assert len(emitted) > 200  # the random policy spreads over the vocabulary, so specials would show up
    assert emitted.isdisjoint(suppressed_token_ids(processor))


def test_decoded_target_response_earns_the_reward(tiny_vlm):
    _, processor = tiny_vlm
    eos = ids(processor, "<|im_end|>")
    target = processor.tokenizer("<answer>12</answer><|im_end|>")["input_ids"] + [eos, eos]
    assert len(target) == 7 and target[-3:] == [eos] * 3  # <answer>, 1, 2, </answer> as whole tokens
    text = processor.tokenizer.batch_decode([target], skip_special_tokens=True)[0]
    assert tasks.counting_reward(text, "12") == 1.0
