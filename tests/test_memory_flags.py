"""--lora, --dtype bfloat16, --gradient-checkpointing and --freeze-vision-tower each do what they say.

Each test runs algos/grpo_vlm.py's `main` in-process on the random tiny model with a tiny budget, parsing the
flags as the command line does, and looks inside: which weights moved, what the optimizer holds, what the
reference scored, how often a decoder layer ran. Every test would fail if its flag were ignored. Rewards are
replaced by 0, 1, 0, 1, ... so that every group has a nonzero advantage and every step really updates. GRPO only
(the `grpo` fixture): the runs use its --group-size, and the flags act in common/policy.py (load_policy), the same in
every script.
"""

import itertools

import pytest
import torch
import tyro
from transformers import AutoModelForImageTextToText

import common.policy
import common.tasks
from common.vlm import load_vlm, response_logprobs, vision_tower

BUDGET = ["--total-steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--train-size", "8"]
BUDGET += ["--eval-size", "4", "--max-new-tokens", "4", "--lr", "1e-2"]  # a large lr: every update is visible
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Run:
    """What one in-process run of the script leaves behind for the tests to inspect."""

    def __init__(self):
        self.models = []  # every model load_vlm returned: [policy] or [policy, reference]
        self.optimizer_params = []  # the parameters the optimizer was built with
        self.logprob_calls = []  # every response_logprobs call: its arguments but the model, output, grad enabled?
        self.layer_calls_with_grad = 0  # forward calls of the policy's first decoder layer while grad is enabled
        self.run_dir = None


def run_script(grpo, model_dir, tmp_path, *flags) -> Run:
    run = Run()
    script_load_vlm, script_response_logprobs = common.policy.load_vlm, common.policy.response_logprobs
    original_optimizer_init = torch.optim.Optimizer.__init__

    def recording_load_vlm(*args, **kwargs):
        model, processor = script_load_vlm(*args, **kwargs)
        if not run.models:  # the policy: count its first decoder layer's forward calls in training
            layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
            layer_forward = layer.forward  # wrapped, not hooked: checkpointing's recompute skips forward hooks

            def counting_forward(*args, **kwargs):
                run.layer_calls_with_grad += torch.is_grad_enabled()
                return layer_forward(*args, **kwargs)

            layer.forward = counting_forward
        run.models.append(model)
        return model, processor

    def recording_response_logprobs(model, *args, **kwargs):
        out = script_response_logprobs(model, *args, **kwargs)
        run.logprob_calls.append({"args": args, "kwargs": kwargs, "out": out.detach(), "grad": torch.is_grad_enabled()})
        return out

    def recording_optimizer_init(self, params, *args, **kwargs):
        params = list(params)
        run.optimizer_params = params
        original_optimizer_init(self, params, *args, **kwargs)

    calls = itertools.count()

    def alternating(completion, answer, format_reward=0.0):
        return float(next(calls) % 2)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common.policy, "load_vlm", recording_load_vlm)
        patch.setattr(common.policy, "response_logprobs", recording_response_logprobs)
        patch.setattr(torch.optim.Optimizer, "__init__", recording_optimizer_init)
        patch.setattr(common.tasks.Task, "reward_fn", lambda self, box_frame=None: alternating)  # get_task(...).reward_fn
        out = tmp_path / "runs"
        grpo.main(tyro.cli(grpo.Args, args=[*BUDGET, "--model", model_dir, "--output-dir", str(out), *flags]))
    (run.run_dir,) = out.iterdir()
    return run


@pytest.fixture(scope="module")
def run(grpo, tiny_model_dir, tmp_path_factory):
    """run(*flags): the script's run with these flags, cached for the module (tests share runs)."""
    cache = {}

    def get(*flags):
        if flags not in cache:
            cache[flags] = run_script(grpo, tiny_model_dir, tmp_path_factory.mktemp("run"), *flags)
        return cache[flags]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from a second thread, and loses much on a busy CPU
    yield get
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir):
    """The weights the runs start from, as loaded from disk: {name: tensor}."""
    return {k: v.clone() for k, v in load_vlm(tiny_model_dir)[0].state_dict().items()}


def base_weights(model) -> dict:
    """{checkpoint name: tensor} of a model, peft's LoRA wrappers seen through (q_proj.base_layer → q_proj)."""
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


def logprobs_of(model, call):
    """Log-probs `model` gives the responses of a recorded response_logprobs call."""
    with torch.no_grad():
        return response_logprobs(model.eval(), *call["args"], **call["kwargs"])


# --lora
def test_lora_trains_only_the_adapters_and_the_optimizer_holds_only_them(run, checkpoint):
    lora = run("--lora", "--total-steps", "2")
    (policy,) = lora.models  # no second model loaded for the reference
    weights = base_weights(policy)
    assert weights.keys() == checkpoint.keys()
    assert all(torch.equal(weights[k], checkpoint[k]) for k in checkpoint), "a base weight changed"
    adapters = {n: p for n, p in policy.named_parameters() if "lora_" in n}
    lora_B = [p for n, p in adapters.items() if "lora_B" in n]
    assert lora_B and all(p.abs().sum() > 0 for p in lora_B), "an adapter did not train (lora_B starts at zero)"
    assert {id(p) for p in lora.optimizer_params} == {id(p) for p in adapters.values()}


def test_lora_adapts_exactly_the_language_model_linears_named_by_the_targets(run, tiny_model_dir):
    policy = run("--lora", "--total-steps", "2").models[0]
    adapted = {n for n, m in policy.named_modules() if hasattr(m, "lora_A")}
    fresh = load_vlm(tiny_model_dir)[0]
    linears = [n for n, m in fresh.named_modules() if isinstance(m, torch.nn.Linear)]
    expected = {n for n in linears if ".language_model." in n and n.rsplit(".", 1)[-1] in LORA_TARGETS}
    assert len(expected) == 4 * 7 and adapted == expected  # 4 decoder layers × 7 linears


def test_lora_never_adapts_the_vision_tower_even_when_a_target_name_is_found_there(run):
    # qkv and fc1 exist only in the tiny Qwen2-VL's vision blocks (as gate_proj does in Qwen2.5-VL's)
    policy = run("--lora", "--lora-target-modules", "q_proj", "qkv", "fc1").models[0]
    adapted = {n for n, m in policy.named_modules() if hasattr(m, "lora_A")}
    assert adapted and all(n.endswith(".q_proj") and ".language_model." in n for n in adapted), adapted


def test_lora_reference_is_the_base_model_with_adapters_disabled(run, tiny_model_dir):
    calls = run("--lora", "--total-steps", "2").logprob_calls
    # per step: the reference scores without grad, then the training forward with grad; step 2 comes after an update
    assert [c["grad"] for c in calls] == [False, True, False, True]
    reference, policy = calls[2], calls[3]
    base = load_vlm(tiny_model_dir)[0]  # the untrained checkpoint, no adapters
    torch.testing.assert_close(reference["out"], logprobs_of(base, reference), atol=1e-6, rtol=0)
    assert (policy["out"] - reference["out"]).abs().max() > 1e-4, "the trained adapters changed nothing"


def test_lora_saves_the_adapter_which_reloads_as_the_trained_policy(run, tiny_model_dir):
    from peft import PeftModel

    lora = run("--lora", "--total-steps", "2")
    adapter_dir = lora.run_dir / "adapter"
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "adapter_model.safetensors").exists()
    assert not (lora.run_dir / "model").exists(), "without --lora-merge only the adapter is saved"
    reloaded = PeftModel.from_pretrained(load_vlm(tiny_model_dir)[0], str(adapter_dir))
    call = lora.logprob_calls[-1]
    trained = lora.models[0]  # the base model with the trained adapters injected in place
    torch.testing.assert_close(logprobs_of(reloaded, call), logprobs_of(trained, call), atol=1e-6, rtol=0)


def test_lora_merge_saves_a_full_model_with_the_adapter_models_logprobs(run, tiny_model_dir):
    from peft import PeftModel

    merged_run = run("--lora", "--lora-merge")
    merged = AutoModelForImageTextToText.from_pretrained(str(merged_run.run_dir / "model"))
    assert not any("lora_" in k for k in merged.state_dict())
    adapter_model = PeftModel.from_pretrained(load_vlm(tiny_model_dir)[0], str(merged_run.run_dir / "adapter"))
    base = load_vlm(tiny_model_dir)[0]
    call = merged_run.logprob_calls[-1]
    merged_logprobs, adapter_logprobs = logprobs_of(merged, call), logprobs_of(adapter_model, call)
    torch.testing.assert_close(merged_logprobs, adapter_logprobs, atol=1e-5, rtol=0)
    assert (merged_logprobs - logprobs_of(base, call)).abs().max() > 1e-4, "the merged model is the untrained base"


def test_lora_merge_without_lora_is_an_error_naming_the_fix(run):
    with pytest.raises(SystemExit, match="--lora"):
        run("--lora-merge")


# --dtype bfloat16
def test_bf16_trains_bf16_weights_with_bf16_logits_and_fp32_logprobs(run, checkpoint):
    bf16 = run("--dtype", "bfloat16")
    policy, reference = bf16.models
    assert all(p.dtype == torch.bfloat16 for p in [*policy.parameters(), *reference.parameters()])
    assert all(c["out"].dtype == torch.float32 for c in bf16.logprob_calls)
    weights = policy.state_dict()
    assert any(not torch.equal(weights[k], v.to(torch.bfloat16)) for k, v in checkpoint.items()), "nothing trained"


def test_bf16_logprobs_are_computed_in_fp32_from_the_bf16_logits(tiny_model_dir, make_prompts):
    model, processor = load_vlm(tiny_model_dir, torch.bfloat16)
    model.eval()
    prompts = make_prompts(["How many shapes?", "Count the shapes in the picture."])
    response_ids = processor.tokenizer(["There are 3 shapes here.", "I see four of them."])["input_ids"]
    response_ids = torch.tensor([ids[:5] for ids in response_ids])  # (2, 5) ordinary text tokens
    mask = torch.ones(2, 5)
    with torch.no_grad():
        logprobs = response_logprobs(model, prompts, response_ids, mask, [])
        inputs = {**prompts, "input_ids": torch.cat([prompts["input_ids"], response_ids], 1)}
        inputs["attention_mask"] = torch.cat([prompts["attention_mask"], mask.long()], 1)
        inputs["mm_token_type_ids"] = torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(response_ids)], 1)
        logits = model(**inputs).logits[:, -6:-1]  # (2, 5, V) bf16: the positions that predict the response
    assert logits.dtype == torch.bfloat16
    expected = torch.log_softmax(logits.float(), -1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    in_bf16 = torch.log_softmax(logits, -1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1).float()
    assert logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=0)
    assert (in_bf16 - expected).abs().max() > 1e-4  # the check above can tell fp32 from bf16 arithmetic


# --gradient-checkpointing
@pytest.mark.parametrize("lora", [[], ["--lora", "--total-steps", "2"]], ids=["full", "lora"])
def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_update(run, lora):
    plain, checkpointed = run(*lora), run(*lora, "--gradient-checkpointing")
    assert checkpointed.models[0].is_gradient_checkpointing and not plain.models[0].is_gradient_checkpointing
    # each training forward runs the layer once; checkpointing runs it again during backward
    assert plain.layer_calls_with_grad > 0
    assert checkpointed.layer_calls_with_grad == 2 * plain.layer_calls_with_grad
    plain_weights, checkpointed_weights = plain.models[0].state_dict(), checkpointed.models[0].state_dict()
    for name, weight in plain_weights.items():
        torch.testing.assert_close(checkpointed_weights[name], weight, atol=1e-6, rtol=0, msg=name)


# --freeze-vision-tower
def test_freeze_vision_tower_leaves_it_bitwise_unchanged_and_out_of_the_optimizer(run, checkpoint):
    frozen = run("--freeze-vision-tower")
    policy = frozen.models[0]
    tower_name, tower = vision_tower(policy)
    assert tower_name == "model.visual"
    weights = policy.state_dict()
    vision = [k for k in checkpoint if k.startswith("model.visual.")]
    language = [k for k in checkpoint if not k.startswith("model.visual.")]
    assert all(torch.equal(weights[k], checkpoint[k]) for k in vision), "a vision weight changed"
    assert any(not torch.equal(weights[k], checkpoint[k]) for k in language), "the language model did not train"
    assert not any(p.requires_grad for p in tower.parameters())
    assert not {id(p) for p in tower.parameters()} & {id(p) for p in frozen.optimizer_params}


def test_without_freeze_vision_tower_the_tower_trains(run, checkpoint):  # the test above can fail
    weights = run().models[0].state_dict()
    assert any(not torch.equal(weights[k], checkpoint[k]) for k in checkpoint if k.startswith("model.visual."))


# all four together, as a memory-constrained user would run a large model
def test_all_flags_together_train_adapters_in_bf16_and_save_a_merged_bf16_model(run, checkpoint):
    combined = run("--lora", "--lora-merge", "--dtype", "bfloat16", "--gradient-checkpointing", "--freeze-vision-tower")
    assert combined.layer_calls_with_grad == 2  # one micro-batch, recomputed once
    assert len(combined.optimizer_params) == 2 * 4 * 7  # lora_A and lora_B of 7 linears in each of 4 layers
    # peft keeps the adapters in fp32 over bf16 base weights: their small updates are not rounded away
    assert all(p.dtype == torch.float32 for p in combined.optimizer_params)
    merged = AutoModelForImageTextToText.from_pretrained(str(combined.run_dir / "model"))
    assert merged.dtype == torch.bfloat16
    weights = merged.state_dict()
    assert any(not torch.equal(weights[k], checkpoint[k].to(torch.bfloat16)) for k in checkpoint if ".language_model." in k)
