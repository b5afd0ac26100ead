"""The vLLM rollout engine (common/rollout.py) against the trainer's HF model, with the real vLLM engine.

One engine for the module, in this process, on a randomly initialised tiny Qwen2-VL with images. On a CPU
machine without a working torchvision the engine runs vLLM's Transformers backend (common/rollout.py says
why); the calls the helper makes on the `LLM` object are the same either way, and are observed here on the
real instance."""

import pytest
import torch
from safetensors.torch import load_file

from common import tasks
from common.rollout import VLLMRollout
from common.tiny_vlm import build_random_tiny_vlm
from common.vlm import (
    build_prompts,
    generate,
    load_processor,
    load_vlm,
    response_logprobs,
    response_mask,
    suppressed_token_ids,
    vision_tower,
)

LOGPROB_TOLERANCE = 1e-4  # fp32 both sides; measured differences are ~1e-6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("tiny-vlm"))
    build_random_tiny_vlm(model_dir)
    torch.manual_seed(0)
    model, processor = load_vlm(model_dir)
    examples = tasks.load_task("counting", "train", 4)
    images = [e.image for e in examples]
    prompts = build_prompts(processor, images, [e.question for e in examples], 512)
    engine = VLLMRollout(model_dir, processor, torch.float32, seed=0, max_model_len=256, max_images=2)
    calls = []  # (method, arguments) of every call the helper makes on the real LLM object

    def recorded(name, method):
        def call(*args, **kwargs):
            calls.append((name, args, kwargs))
            return method(*args, **kwargs)

        return call

    for name in ("sleep", "wake_up", "collective_rpc", "reset_prefix_cache", "generate"):
        setattr(engine.llm, name, recorded(name, getattr(engine.llm, name)))
    # LLM has no reset_encoder_cache in vLLM 0.32; its engine has
    engine.llm.llm_engine.reset_encoder_cache = recorded("reset_encoder_cache", engine.llm.llm_engine.reset_encoder_cache)
    return dict(model_dir=model_dir, model=model, processor=processor, prompts=prompts, images=images, engine=engine,
                calls=calls)  # fmt: skip


def vllm_logprobs(engine, model, prompts, images, completion):
    """vLLM's log-probs of `completion` (B, T) after each prompt, read as prompt log-probs (no sampling)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine.llm.wake_up(tags=["weights"])
    engine.llm.wake_up(tags=["kv_cache"])
    requests = [
        TokensPrompt(prompt_token_ids=r["prompt_token_ids"] + c.tolist(), multi_modal_data=r["multi_modal_data"])
        for r, c in zip(engine.prompt_requests(prompts, images), completion)
    ]
    outputs = engine.llm.generate(requests, SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
    engine.llm.sleep(level=engine.sleep_level)
    T = completion.shape[1]
    return torch.tensor(
        [[lp[int(t)].logprob for lp, t in zip(o.prompt_logprobs[-T:], c)] for o, c in zip(outputs, completion)]
    )


def test_greedy_rollouts_match_hf_generate_with_images(setup):
    model, processor, prompts, images, engine = (setup[k] for k in ("model", "processor", "prompts", "images", "engine"))
    expected = generate(model, processor, prompts, 1, 12, 1.0, greedy=True)  # (B, T)
    got = engine.generate(model, prompts, images, 1, 12, 1.0, greedy=True)
    assert torch.equal(got, expected)


def test_greedy_agentic_episodes_match_hf_generate_with_a_tool_image(setup, force_tool_call):
    """A zoom episode (common/agent.py): turn 1 forced to a tool call, the tool's image appended, turn 2 greedy from a
    context of two images. vLLM expands both images as the trainer's processor does (generate() checks the prompt
    tokens) and continues exactly as HF generate does."""
    from common.agent import run_episodes

    model, processor, engine = setup["model"], setup["processor"], setup["engine"]
    examples = tasks.load_task("zoom", "train", 3)
    prompts = build_prompts(processor, [e.image for e in examples], [e.question for e in examples], 512)
    force_tool_call(processor)  # HF generate's turns
    expected = run_episodes(model, None, processor, prompts, examples, 1, 8, 1.0, True, tasks.get_task("zoom").tools, 2)
    force_tool_call(processor, engine)  # the engine's turns
    got = run_episodes(model, engine, processor, prompts, examples, 1, 8, 1.0, True, tasks.get_task("zoom").tools, 2)
    assert all(len(e.images) == 2 and e.tool_calls == 1 for e in got)
    assert [e.ids for e in got] == [e.ids for e in expected]


def test_prompts_that_vllm_expands_to_other_tokens_than_the_trainer_stop_the_rollout(setup):
    """The guard against sampling for prompts other than those the trainer scores: here the trainer's processor
    resizes each 64 px image to 32 px (4 image tokens) while vLLM's keeps 64 px (16)."""
    model, images, engine = setup["model"], setup["images"], setup["engine"]
    small = load_processor(setup["model_dir"], min_pixels=32 * 32, max_pixels=32 * 32)
    prompts = build_prompts(small, images, ["How many shapes?"] * len(images), 512)
    with pytest.raises(SystemExit, match="^vLLM's prompt tokens differ from the processor's"):
        engine.generate(model, prompts, images, 1, 2, 1.0, greedy=True)


def test_the_engine_leaves_the_trainers_model_classes_alone(setup):
    """vLLM's Transformers backend decorates the class of the language model it runs for torch.compile; it must be
    the engine's own subclass (common.rollout.ENGINE_MODEL_MODULE), or the trainer's forward breaks."""
    model, processor, prompts = setup["model"], setup["processor"], setup["prompts"]
    if setup["engine"].native:
        pytest.skip("vLLM runs its native Qwen2-VL here (torchvision works): no transformers class is shared")
    trainer_class = type(model.get_decoder())
    assert all(c.__module__.startswith(("transformers.", "torch.", "builtins")) for c in trainer_class.__mro__)
    completion = torch.tensor([[setup["engine"].eos_id]] * len(setup["images"]))
    logprobs = response_logprobs(model, prompts, completion, torch.ones_like(completion), suppressed_token_ids(processor))
    logprobs.sum().backward()  # the trainer's forward and backward still run
    assert all(p.grad is not None for p in model.get_decoder().parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)


def test_a_weight_push_carries_a_training_step_to_vllm(setup):
    model, processor, prompts, images, engine = (setup[k] for k in ("model", "processor", "prompts", "images", "engine"))
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    completion = torch.tensor([tok.encode("<answer>3</answer>") + [eos]] * len(images))  # (B, T)
    mask = response_mask(completion, eos)
    engine.push_weights(model)
    before = vllm_logprobs(engine, model, prompts, images, completion)
    with torch.no_grad():  # prompt log-probs are over the full vocabulary: score without suppression here
        assert torch.allclose(before, response_logprobs(model, prompts, completion, mask, []), atol=LOGPROB_TOLERANCE)

    # one real training step of the HF model: supervised toward the completion
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = -(response_logprobs(model, prompts, completion, mask, suppressed_token_ids(processor)) * mask).sum() / mask.sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

    stale = vllm_logprobs(engine, model, prompts, images, completion)
    engine.push_weights(model)
    after = vllm_logprobs(engine, model, prompts, images, completion)
    with torch.no_grad():
        trainer = response_logprobs(model, prompts, completion, mask, [])
    assert torch.equal(stale, before)  # without a push vLLM still has the old weights
    assert (after - before).abs().max() > 0.05  # the step moved the log-probs...
    assert torch.allclose(after, trainer, atol=LOGPROB_TOLERANCE)  # ...and vLLM now has exactly the trainer's


def test_vllm_samples_from_the_distribution_the_trainer_scores(setup):
    """Sampled tokens' log-probs as vLLM samples them (temperature, suppressed tokens, no top-k/top-p) equal the
    trainer's response_logprobs of the same tokens: the policy we sample is the policy we train."""
    model, processor, prompts, images, engine = (setup[k] for k in ("model", "processor", "prompts", "images", "engine"))
    temperature, G = 0.7, 3
    engine.llm.wake_up(tags=["weights"])
    engine.push_weights(model)
    engine.llm.wake_up(tags=["kv_cache"])
    params = engine.sampling_params(G, 8, temperature, greedy=False, logprobs=0)
    outputs = engine.llm.generate(engine.prompt_requests(prompts, images), params, use_tqdm=False)
    engine.llm.sleep(level=engine.sleep_level)
    eos = engine.eos_id
    for i, output in enumerate(outputs):
        for sample in output.outputs:
            ids = torch.tensor([list(sample.token_ids)])
            prompt = {k: v[i : i + 1] for k, v in prompts.items() if k not in ("pixel_values", "image_grid_thw")}
            prompt["pixel_values"] = prompts["pixel_values"].split(prompts["image_grid_thw"].prod(-1).tolist())[i]
            prompt["image_grid_thw"] = prompts["image_grid_thw"][i : i + 1]
            with torch.no_grad():
                trainer = response_logprobs(model, prompt, ids, response_mask(ids, eos), suppressed_token_ids(processor), temperature)[0]
            sampled = torch.tensor([lp[t].logprob for lp, t in zip(sample.logprobs, sample.token_ids)])
            assert torch.allclose(sampled, trainer, atol=LOGPROB_TOLERANCE)


def test_a_rollout_after_a_training_step_samples_from_the_trained_weights(setup):
    """The same prompts and images before and after a step that moves every weight, the vision tower's too: vLLM's
    greedy tokens are HF's both times, and the step changed them. Fails if the engine samples with its old weights,
    or reuses KV or image embeddings the old weights computed (its prefix and multimodal caches)."""
    model, processor, prompts, images, engine = (setup[k] for k in ("model", "processor", "prompts", "images", "engine"))
    before = engine.generate(model, prompts, images, 1, 12, 1.0, greedy=True)
    assert torch.equal(before, generate(model, processor, prompts, 1, 12, 1.0, greedy=True))
    eos = engine.eos_id
    completion = torch.tensor([processor.tokenizer.encode("<answer>7</answer>") + [eos]] * len(images))
    mask = response_mask(completion, eos)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    (-(response_logprobs(model, prompts, completion, mask, suppressed_token_ids(processor)) * mask).sum() / mask.sum()).backward()
    assert all(p.grad is not None for p in vision_tower(model)[1].parameters())  # the image embeddings change too
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    expected = generate(model, processor, prompts, 1, 12, 1.0, greedy=True)
    assert not torch.equal(expected, before), "the step did not change the greedy tokens: nothing is tested"
    assert torch.equal(engine.generate(model, prompts, images, 1, 12, 1.0, greedy=True), expected)


def test_each_rollout_wakes_the_weights_for_the_push_before_the_kv_cache_and_sleeps_after_sampling(setup):
    """vLLM's sleep-mode recipe for a weight update (docs.vllm.ai, "Sleep Mode"): wake the weights alone and load the
    new ones, then wake the KV cache, so that both never need memory at once; sleep again once sampled, so that the
    trainer has the memory back. vLLM on a CPU has no sleep mode (sleep and wake_up free nothing), so memory cannot
    show the order here: it is checked on the calls made on the real LLM object, against that recipe rather than
    against common/rollout.py (the cache resets are left out: vLLM's sleep clears those caches itself, and the test
    above checks what they are for)."""
    model, prompts, images, engine, calls = (setup[k] for k in ("model", "prompts", "images", "engine", "calls"))
    calls.clear()
    engine.generate(model, prompts, images, 2, 4, 1.0, greedy=False)
    observed = [(name, kwargs.get("tags") or (args[0] if name == "collective_rpc" else None)) for name, args, kwargs in calls]
    recipe = [("wake_up", ["weights"]), ("collective_rpc", "reload_weights"), ("wake_up", ["kv_cache"]), ("generate", None)]
    positions = [observed.index(call) for call in recipe]
    assert positions == sorted(positions), observed
    assert observed[-1] == ("sleep", None) and calls[-1][2]["level"] == engine.sleep_level, observed


def test_responses_that_stop_early_are_padded_with_eos_like_hf(setup):
    """common.vlm.generate's format: (B*G, T), T = the longest response, EOS after each response's EOS. At
    temperature 2 (vLLM's maximum) the random model's sampling is spread over its ~500 allowed tokens, so some of
    4*64 responses of 32 tokens stop early at EOS and others do not."""
    model, prompts, images, engine = (setup[k] for k in ("model", "prompts", "images", "engine"))
    eos, max_new_tokens = engine.eos_id, 32
    got = engine.generate(model, prompts, images, 64, max_new_tokens, 2.0, greedy=False)
    is_eos = got == eos
    ended = is_eos.any(1)
    first_eos = torch.where(ended, is_eos.int().argmax(1), torch.full_like(ended, max_new_tokens, dtype=torch.long))
    assert got.shape[0] == 4 * 64 and 0 < ended.sum() < len(got), f"{int(ended.sum())} of {len(got)} responses ended early: padding is not exercised"
    assert got.shape[1] == min(int(first_eos.max()) + 1, max_new_tokens)  # T: the longest response
    after_eos = torch.arange(got.shape[1]) > first_eos.unsqueeze(1)
    assert (got[after_eos] == eos).all()  # padded with EOS after EOS
    assert not is_eos[torch.arange(got.shape[1]) < first_eos.unsqueeze(1)].any()


def test_lora_adapters_are_merged_into_the_push(setup):
    """A LoRA-wrapped trainer (peft) after a training step: vLLM gets W + (alpha / r) B A, and the trainer's base
    weights are unchanged by the merge-push-unmerge."""
    peft = pytest.importorskip("peft")  # the script's --lora imports it the same way
    import copy

    model, processor, prompts, images, engine = (setup[k] for k in ("model", "processor", "prompts", "images", "engine"))
    lora_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    eos = engine.eos_id
    completion = torch.tensor([processor.tokenizer.encode("<answer>2</answer>") + [eos]] * len(images))
    mask = response_mask(completion, eos)
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # B starts at 0: the first step moves only B, the second makes B A nonzero in both
        loss = -(response_logprobs(lora_model, prompts, completion, mask, []) * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    base_before = {k: v.clone() for k, v in lora_model.get_base_model().state_dict().items() if "lora_" not in k}
    engine.push_weights(lora_model)
    pushed = vllm_logprobs(engine, lora_model, prompts, images, completion)
    with torch.no_grad():
        trainer = response_logprobs(lora_model, prompts, completion, mask, [])
        base_only = response_logprobs(model, prompts, completion, mask, [])
    assert (trainer - base_only).abs().max() > 1e-3  # the adapters matter...
    assert torch.allclose(pushed, trainer, atol=LOGPROB_TOLERANCE)  # ...and vLLM has them
    base_after = lora_model.get_base_model().state_dict()
    assert all(torch.allclose(base_after[k], v, atol=1e-6) for k, v in base_before.items())  # unmerged again


def test_memory_bytes_counts_the_engines_weights_and_the_kv_cache_it_allocated(setup):
    """Against what is there: the checkpoint's tensors (the engine loads a full copy; its CPU backend repacks linear
    weights outside its parameters, so those cannot be summed instead) and the KV cache tensors vLLM allocated."""
    engine, model = setup["engine"], setup["model"]
    checkpoint = load_file(f"{setup['model_dir']}/model.safetensors")
    weights = sum(t.numel() * t.element_size() for t in checkpoint.values())

    def kv_cache_bytes(worker):  # runs on vLLM's worker (in this process), each storage once
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in worker.model_runner.kv_caches}.values())

    (kv,) = engine.llm.collective_rpc(kv_cache_bytes)
    assert 0.9 * (1 << 30) <= kv <= 1 << 30, kv  # cpu_kv_cache_bytes (1 GiB), filled with whole blocks
    assert engine.memory_bytes(model) == weights + kv
