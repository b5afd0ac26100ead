"""Every supported VLM family through the same code path: a tiny random-init checkpoint of each (common/families.py)
is trained for one step by GRPO's script (and each script that changes its shared blocks), as a user runs it, and
scored the way the trainer scores: batched log-probs equal per-sample ones, training log-probs equal the sampling distribution of `generate`,
and the Qwen-VL M-RoPE offsets cached by `generate` do not leak into the next forward."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from common.families import FAMILIES, build
from common.vlm import (
    box_convention,
    build_prompts,
    cat_inputs,
    load_processor,
    load_vlm,
    model_input_size,
    response_logprobs,
    response_mask,
    stop_token_id,
    suppressed_token_ids,
    take_rows,
)
from conftest import TEMPLATE

END_OF_TURN = {"qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>", "qwen3_vl": "<|im_end|>", "idefics3": "<end_of_utterance>"}
# different sizes → different numbers of image tokens (Qwen-VL) or crops (Idefics3) in one batch
IMAGE_SIZES = [(64, 64), (112, 84), (40, 96)]
# different lengths → different amounts of left padding
QUESTIONS = ["How many?", "How many shapes are in the image?", "How many shapes are in the picture, small or large, red or blue?"]


@pytest.fixture(scope="session")
def script(end_to_end_script):
    """The scripts run here: GRPO and each script that changes one of its TRY NOT TO MODIFY blocks (conftest.py)."""
    return end_to_end_script


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """family -> directory of its tiny random-init checkpoint, built once per session (about a second for all)."""
    paths = {family: str(tmp_path_factory.mktemp(family)) for family in FAMILIES}
    for family, path in paths.items():
        build(family, path)
    return paths


@pytest.fixture(scope="session", params=FAMILIES)
def checkpoint(request, checkpoints) -> tuple[str, str]:
    return request.param, checkpoints[request.param]


@pytest.fixture(scope="session")
def step_runs(checkpoints, repo_root, tmp_path_factory):
    """step_runs(script): one step of the script per family, run as a user runs it, started on the first call for
    that script and kept for the session (a fixture parametrised by `script` would be torn down and started again
    each time pytest's ordering alternates scripts). The four subprocesses start at once, one thread each (most of
    their time is importing torch and transformers); each test waits for its own."""
    started: dict[str, dict] = {}

    def start(script):
        if script.name in started:
            return started[script.name]
        runs = started[script.name] = {}
        for family, path in checkpoints.items():
            out = tmp_path_factory.mktemp(f"{script.name}-{family}")
            flags = ["--model", path, "--total-steps", "1", "--prompts-per-step", "2", *script.optional("--group-size", "2")]
            flags += ["--train-size", "8", "--eval-size", "4", "--max-new-tokens", "4", "--output-dir", str(out / "runs")]
            # a random model earns reward 0: still run the update's forward
            flags += script.optional("--no-skip-zero-advantage-groups")
            # each family's rollouts through the co-located vLLM engine, in GRPO's run: the engine block is the same
            # text in every script, so another script's runs (PPO's critic on each family's trunk) sample with HF
            flags += ["--rollout-engine", "vllm" if script.name == TEMPLATE.stem else "hf"]
            env = {**os.environ, "VLRL_CACHE": str(out / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
            with open(out / "stdout", "w") as stdout, open(out / "stderr", "w") as stderr:
                command = [sys.executable, script.path, *flags]
                runs[family] = (subprocess.Popen(command, cwd=repo_root, env=env, stdout=stdout, stderr=stderr), out)
        return runs

    yield start
    for runs in started.values():
        for process, _ in runs.values():
            if process.poll() is None:
                process.kill()


@pytest.fixture(scope="session")
def loaded(checkpoint):
    family, path = checkpoint
    model, processor = load_vlm(path)
    return family, model.eval(), processor


def noise_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def random_responses(processor, n, length, seed=0):
    """(n, length) ids drawn from the tokens a response may contain. Row 0 has no EOS (all its tokens count),
    row i > 0 has EOS at position length - i, then EOS padding, as `generate` pads."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor(sorted(set(range(len(processor.tokenizer))) - set(suppressed_token_ids(processor))))
    responses = allowed[torch.randint(len(allowed), (n, length), generator=g)]
    eos = stop_token_id(processor)
    for i in range(1, n):
        responses[i, length - i :] = eos
    return responses


def test_one_step_runs_end_to_end_and_the_saved_model_reloads(checkpoint, step_runs, script):
    family, _ = checkpoint
    process, out = step_runs(script)[family]
    assert process.wait(timeout=300) == 0, (out / "stderr").read_text()[-3000:]
    (run_dir,) = (out / "runs").iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    kl = ["losses/kl"] if script.optional("--beta") else []  # a script without a KL term logs none
    for key in ["eval/accuracy", "charts/reward_mean", *kl, "losses/grad_norm", "charts/response_length"]:
        assert math.isfinite(records[1][key]), (key, records[1])
    assert records[1]["losses/entropy"] > 0  # the training forward scored the sampled responses
    # vLLM's own Idefics3 runs here; its Qwen-VLs need torchvision, so those run on its Transformers backend.
    # Either way the rollout checked vLLM's image expansion against the processor's, token by token.
    engine = "native" if family == "idefics3" else "Transformers backend"
    expected = f"vLLM ({engine}, in the training process)" if script.name == TEMPLATE.stem else "HF generate"
    assert f"rollout engine: {expected}" in (out / "stdout").read_text()
    model, processor = load_vlm(str(run_dir / "model"))
    assert model.config.model_type == family
    assert stop_token_id(processor) == processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[family])


def test_each_family_loads_through_the_auto_classes_with_its_own_model_type(loaded):
    family, model, processor = loaded
    assert model.config.model_type == family
    assert not hasattr(processor, "video_processor")  # the Qwen-VL ones: loaded without torchvision


def test_stop_token_is_the_familys_end_of_turn_token_and_is_never_suppressed(loaded):
    family, model, processor = loaded
    eos = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    assert stop_token_id(processor) == eos == model.generation_config.eos_token_id
    assert eos not in suppressed_token_ids(processor)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert image_token in suppressed_token_ids(processor)


def test_select_swapping_rows_equals_building_the_batch_swapped(loaded):
    _, _, processor = loaded
    images = noise_images(IMAGE_SIZES[:2])
    batch = build_prompts(processor, images, QUESTIONS[:2], 512)
    swapped = build_prompts(processor, images[::-1], QUESTIONS[:2][::-1], 512)
    out = take_rows(batch, [1, 0])
    assert set(out) == set(swapped)
    for key in swapped:
        assert torch.equal(out[key], swapped[key]), key


def test_cat_inputs_of_two_batches_equals_the_batch_processed_together(loaded):
    # different image sizes and prompt lengths: Qwen-VL's patch grids, Idefics3's crop counts and left padding differ
    _, _, processor = loaded
    images = noise_images(IMAGE_SIZES)
    together = build_prompts(processor, images, QUESTIONS, 512)
    first, second = (build_prompts(processor, images[r], QUESTIONS[r], 512) for r in (slice(2, 3), slice(0, 2)))
    out = cat_inputs(first, second, processor.tokenizer.pad_token_id)
    reordered = take_rows(together, [2, 0, 1])
    assert set(out) == set(reordered)
    for key in reordered:
        assert torch.equal(out[key], reordered[key]), key


def test_select_keeps_each_rows_images_in_batch_first_layouts():
    # Idefics3: (B, crops, C, H, W) + pixel_attention_mask (B, crops, H, W); Gemma 3-like: (B, C, H, W). Each
    # sample's images are tagged with its row number, so a mix-up shows.
    crops = torch.arange(3.0).view(3, 1, 1, 1, 1).expand(3, 2, 3, 4, 4)
    inputs = {"input_ids": torch.tensor([[1], [2], [3]]), "pixel_values": crops, "pixel_attention_mask": crops[:, :, 0] > 0}
    out = take_rows(inputs, [2, 0, 2])
    assert out["input_ids"].flatten().tolist() == [3, 1, 3]
    assert out["pixel_values"][:, :, 0, 0, 0].tolist() == [[2, 2], [0, 0], [2, 2]]
    assert out["pixel_attention_mask"][:, :, 0, 0].tolist() == [[True, True], [False, False], [True, True]]
    single = {"input_ids": torch.tensor([[1], [2]]), "pixel_values": torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 4, 4)}
    assert take_rows(single, [1, 1, 0])["pixel_values"][:, 0, 0, 0].tolist() == [1, 1, 0]


def test_modality_type_ids_are_extended_over_the_response_as_text():
    # Qwen-VL's mm_token_type_ids and Gemma 3's token_type_ids mark image tokens (1) in the prompt; the forward
    # over prompt + response needs them for every position, and response tokens are text (0)
    class Recorder(torch.nn.Module):
        def forward(self, input_ids, logits_to_keep, **kwargs):
            self.kwargs = kwargs
            return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], logits_to_keep, 8))

    model = Recorder()
    prompts = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    for key in ("mm_token_type_ids", "token_type_ids"):
        response_logprobs(model, {**prompts, key: torch.tensor([[0, 1, 0]])}, torch.tensor([[2, 3]]), torch.ones(1, 2), [])
        assert model.kwargs[key].tolist() == [[0, 1, 0, 0, 0]], key


def test_batched_logprobs_with_left_padding_and_different_image_sizes_equal_per_sample(loaded):
    family, model, processor = loaded
    images = noise_images(IMAGE_SIZES)
    prompts = build_prompts(processor, images, QUESTIONS, 512)
    assert (prompts["attention_mask"][:, 0] == 0).sum() >= 2  # left padding
    if "image_grid_thw" in prompts:  # Qwen-VL: a different patch grid and number of patches per image
        assert len(set(prompts["image_grid_thw"].prod(-1).tolist())) == 3
    else:  # Idefics3: a different number of crops per image, the batch zero-padded to the most
        assert len(set(prompts["pixel_attention_mask"].flatten(2).any(-1).sum(1).tolist())) >= 2
    responses = random_responses(processor, 3, 5)
    mask = response_mask(responses, stop_token_id(processor))
    suppressed = suppressed_token_ids(processor)
    with torch.no_grad():
        batched = response_logprobs(model, prompts, responses, mask, suppressed)
        alone = torch.cat([
            response_logprobs(model, build_prompts(processor, images[i : i + 1], QUESTIONS[i : i + 1], 512), responses[i : i + 1], mask[i : i + 1], suppressed)
            for i in range(3)
        ])  # fmt: skip
    assert (batched[mask.bool()] < 0).all()
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_training_logprobs_equal_the_sampling_distribution_of_generate(loaded, sample_with_scores):
    family, model, processor = loaded
    prompts = build_prompts(processor, noise_images(IMAGE_SIZES[:2], seed=1), QUESTIONS[:2], 512)
    eos, suppressed, G = stop_token_id(processor), suppressed_token_ids(processor), 3
    torch.manual_seed(0)
    responses, scores = sample_with_scores(model, processor, prompts, G, 6, 1.0)  # as common.vlm.generate samples
    mask = response_mask(responses, eos)
    sampled = torch.log_softmax(scores, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        trained = response_logprobs(model, take_rows(prompts, [0] * G + [1] * G), responses, mask, suppressed)
    on = mask.bool()
    assert on.sum() > 2 * G  # several tokens per response are compared
    torch.testing.assert_close(trained[on], sampled[on], atol=1e-5, rtol=0)


def test_rope_offsets_cached_by_generate_do_not_leak_into_the_next_training_forward(checkpoint):
    family, path = checkpoint
    model, processor = load_vlm(path)
    fresh = load_vlm(path)[0].eval()
    model.eval()
    # generate on batch A: Qwen-VL caches A's M-RoPE offsets (rope_deltas) on the model
    batch_a = build_prompts(processor, noise_images([(112, 112), (56, 56)], seed=2), QUESTIONS[1:], 512)
    model.generate(**batch_a, max_new_tokens=2, do_sample=False)
    # then the training forward on batch B, of the same batch size: a leak would be silent, not a shape error
    batch_b = build_prompts(processor, noise_images([(40, 96), (64, 64)], seed=3), QUESTIONS[:2], 512)
    responses = random_responses(processor, 2, 4, seed=1)
    mask = response_mask(responses, stop_token_id(processor))
    suppressed = suppressed_token_ids(processor)
    stale = getattr(model.model, "rope_deltas", None)
    with torch.no_grad():
        after_generate = response_logprobs(model, batch_b, responses, mask, suppressed)
        expected = response_logprobs(fresh, batch_b, responses, mask, suppressed)
    if family != "idefics3":  # M-RoPE: A's offsets were really there and differ from B's, so a leak would show
        assert stale is not None and stale.shape[0] == 2
        assert not torch.equal(stale, fresh.model.rope_deltas)
    torch.testing.assert_close(after_generate, expected, atol=1e-6, rtol=0)


def test_box_convention_per_family():
    # see common/vlm.py box_convention for the sources
    expected = {"qwen2_vl": "norm1000", "qwen2_5_vl": "pixels", "qwen3_vl": "norm1000", "idefics3": "norm1000"}
    assert {family: box_convention(family) for family in FAMILIES} == expected
    with pytest.raises(SystemExit, match="gemma3"):
        box_convention("gemma3")


@pytest.mark.parametrize("width, height", [(64, 64), (112, 40), (40, 96), (300, 200), (20, 20)])
def test_model_input_size_is_the_size_the_processor_resizes_to(loaded, width, height):
    family, _, processor = loaded
    w, h = model_input_size(processor, width, height)
    (image,) = noise_images([(width, height)])
    if family == "idefics3":  # the crops the processor cut, times the crop side
        out = processor.image_processor([[image]], return_row_col_info=True)
        crop = processor.image_processor.max_image_size["longest_edge"]
        rows, cols = out["rows"][0][0], out["cols"][0][0]
        assert (w, h) == ((cols * crop, rows * crop) if rows else (crop, crop))
    else:  # the patch grid the processor made, times the patch side
        grid = processor.image_processor([image], return_tensors="pt")["image_grid_thw"][0]
        patch = processor.image_processor.patch_size
        assert (w, h) == (int(grid[2]) * patch, int(grid[1]) * patch)


@pytest.fixture(scope="module")
def qwen2_vl_processor(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_vl-by-hand")
    build("qwen2_vl", str(path))
    return load_processor(str(path))


def test_model_input_size_by_hand(qwen2_vl_processor):
    # the tiny Qwen2-VL allows 56² to 112² pixels in sides of whole 28-px units. 40x96 is 1.4 x 3.4 units, rounded
    # 1 x 3 = 2352 px < 56²: scaled up by beta = sqrt(3136 / 3840) = 0.904, rounded up: 1.3 x 3.1 → 2 x 4 units
    assert model_input_size(qwen2_vl_processor, 40, 96) == (56, 112)
    # 300x200 = 60000 px > 112²: scaled down by sqrt(60000 / 12544) and rounded down to 4 x 3 units
    assert model_input_size(qwen2_vl_processor, 300, 200) == (112, 84)


def test_min_and_max_pixels_set_the_number_of_image_tokens_of_qwen_families(checkpoint):
    family, path = checkpoint
    (image,) = noise_images([(96, 96)])

    def image_tokens(processor):
        ids = build_prompts(processor, [image], QUESTIONS[:1], 512)["input_ids"]
        return int((ids == processor.tokenizer.convert_tokens_to_ids(processor.image_token)).sum())

    if family == "idefics3":  # sized by the longest edge: the flags would silently do nothing, so they refuse
        with pytest.raises(SystemExit, match="longest edge"):
            load_processor(path, max_pixels=64 * 64)
        return
    default = load_processor(path)
    unit = default.image_processor.patch_size * default.image_processor.merge_size  # px per image-token side: 28 or 32
    assert image_tokens(default) == 9  # 96 px ≈ 3 units a side, within the checkpoint's own bounds
    small = load_processor(path, max_pixels=(2 * unit) ** 2 + unit)  # room for 2 x 2 units, not 3 x 3
    large = load_processor(path, min_pixels=(4 * unit) ** 2 - unit, max_pixels=(4 * unit) ** 2)  # exactly 4 x 4
    assert (image_tokens(small), image_tokens(large)) == (4, 16)
    assert model_input_size(small, 96, 96) == (2 * unit, 2 * unit)
    assert model_input_size(large, 96, 96) == (4 * unit, 4 * unit)
