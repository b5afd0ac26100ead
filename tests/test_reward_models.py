"""A model as the reward (common/judges.py, common/reward.py): a judge's P(yes) against a hand computation, batching,
each family as a judge, a sequence classifier, the mixes, and the one-line errors."""

import dataclasses
import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

from common import tasks
from common.families import FAMILIES, build
from common.judges import Classifier, Judge, model_metrics, verdict_token_ids
from common.reward import Reward, load_reward_model
from common.tiny_vlm import judge_examples, train_tokenizer
from common.vlm import load_vlm

COUNTING = tasks.get_task("counting")
RESPONSES = ["<answer>3</answer>", "<answer>1</answer>", "no answer", "<answer>5</answer>", "", "<answer>2</answer>",
             "<answer>4</answer>"]  # fmt: skip


@pytest.fixture(scope="module")
def examples():
    return tasks.load_task("counting", "eval", len(RESPONSES))


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("judge")
    build("qwen2_vl", str(path))
    return str(path)


def favour_verdicts(model, yes_id: int, no_id: int, yes=20.0, no=19.5):
    """A forward hook adding to the yes and no logits, so a random model answers yes or no (and not always the same
    way: the offsets are close)."""
    def hook(module, args, logits):
        logits = logits.clone()
        logits[..., yes_id] += yes
        logits[..., no_id] += no
        return logits

    return model.get_output_embeddings().register_forward_hook(hook)


def test_the_judges_reward_is_its_verdict_probability_computed_by_hand(judge_dir, examples):
    model, processor = load_vlm(judge_dir)
    tokenizer = processor.tokenizer
    yes, no = tokenizer("yes", add_special_tokens=False)["input_ids"][0], tokenizer("no", add_special_tokens=False)["input_ids"][0]
    big_yes, big_no = tokenizer("Yes", add_special_tokens=False)["input_ids"][0], tokenizer("No", add_special_tokens=False)["input_ids"][0]
    handle = favour_verdicts(model, yes, no)
    judge = Judge(model, processor, COUNTING.judge_template, batch_size=8, max_tokens=1024)
    scores = judge.scores(examples[:2], RESPONSES[:2])
    for example, response, score in zip(examples[:2], RESPONSES[:2], scores):
        text = (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                f"<|image_pad|><|vision_end|>{example.question}\nThe right answer: {example.answer}\nResponse: "
                f"{response}\nIs the response right? Answer yes or no.<|im_end|>\n<|im_start|>assistant\n")  # the family's chat template, written out
        inputs = processor(text=[text], images=[[example.image]], return_tensors="pt")
        with torch.no_grad():
            p = model(**inputs).logits[0, -1].softmax(-1)
        expected = (p[yes] + p[big_yes]) / (p[yes] + p[big_yes] + p[no] + p[big_no])
        assert score.item() == pytest.approx(expected.item(), abs=1e-6)
        assert 0.05 < score < 0.95  # the test would not see a swapped yes and no otherwise
    handle.remove()
    assert judge.scores(examples[:2], RESPONSES[:2]).isnan().all()  # unhooked its top token is neither: no verdict


def test_micro_batches_give_the_rewards_of_one_response_at_a_time(judge_dir, examples):
    model, processor = load_vlm(judge_dir)
    tokenizer = processor.tokenizer
    favour_verdicts(model, tokenizer("yes")["input_ids"][0], tokenizer("no")["input_ids"][0])
    one = Judge(model, processor, COUNTING.judge_template, 1, 1024).scores(examples, RESPONSES)
    three = Judge(model, processor, COUNTING.judge_template, 3, 1024).scores(examples, RESPONSES)
    every = Judge(model, processor, COUNTING.judge_template, 64, 1024).scores(examples, RESPONSES)
    assert not one.isnan().any() and one.std() > 1e-3
    torch.testing.assert_close(three, one, atol=1e-5, rtol=0)
    torch.testing.assert_close(every, one, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_judge_of_each_family_loads_and_scores(family, tmp_path, examples):
    build(family, str(tmp_path))
    judge = load_reward_model(str(tmp_path), "judge", COUNTING, torch.float32, "cpu", 4, 2048)
    yes, no = judge.yes_ids, judge.no_ids
    favour_verdicts(judge.model, yes[0], no[0])
    scores = judge.scores(examples[:3], RESPONSES[:3])
    assert scores.shape == (3,) and ((scores > 0) & (scores < 1)).all()


def test_a_bad_path_a_text_only_judge_and_an_unreadable_verdict_each_end_in_one_line(tmp_path):
    def message(path, kind="judge"):
        with pytest.raises(SystemExit) as exited:
            load_reward_model(path, kind, COUNTING, torch.float32, "cpu", 4, 1024)
        text = str(exited.value)
        assert "\n" not in text
        return text

    assert message(str(tmp_path / "missing")).startswith(f"--reward-model '{tmp_path / 'missing'}' is not a directory")
    tokenizer = train_tokenizer(512)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")
    assert "without a vision encoder" in message(str(tmp_path / "text"))
    assert message("tiny-judge", "classifier") == "--reward-model tiny-judge is a judge: use --reward-kind judge"

    class OneTokenForEverything:  # a tokenizer that starts every word with the same token
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [7, len(text)]}

    with pytest.raises(SystemExit, match="starts 'yes' and 'no' with the same token"):
        verdict_token_ids(OneTokenForEverything(), "judge")
    with pytest.raises(SystemExit, match="has no tiny judge"):
        load_reward_model("tiny-judge", "judge", tasks.get_task("grounding"), torch.float32, "cpu", 4, 1024)


@dataclasses.dataclass
class Scores:  # a reward model that gives these scores, in order
    values: list
    model: torch.nn.Module = dataclasses.field(default_factory=lambda: torch.nn.Linear(1, 1))

    def scores(self, examples, completions):
        return torch.tensor(self.values[: len(completions)], dtype=torch.float32)


@dataclasses.dataclass
class Batch:  # the fields of a Rollouts batch a Reward reads and writes
    examples: list
    completions: list
    rule_rewards: torch.Tensor | None = None
    model_scores: torch.Tensor | None = None
    reward_seconds: torch.Tensor | None = None

    def __len__(self):
        return len(self.completions)


def test_model_and_format_gate_mixes_and_an_unread_verdict_counted_not_crashed(examples):
    completions = [f"<answer>{examples[0].answer}</answer>", "<answer>9</answer>", "no tags", "<answer>1</answer>"]
    batch = Batch([examples[0]] * 4, completions)
    judge = Scores([0.9, 0.8, 0.7, math.nan])
    rewards = Reward(COUNTING, tasks.norm1000_frame, 0.0, judge, "model")(batch)
    assert rewards.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.0])
    assert batch.rule_rewards.tolist() == [1.0, 0.0, 0.0, float(examples[0].answer == "1")]
    assert batch.reward_seconds.shape == (4,) and (batch.reward_seconds >= 0).all()
    gated = Reward(COUNTING, tasks.norm1000_frame, 0.0, judge, "format-gate")(batch)
    assert gated.tolist() == pytest.approx([0.9, 0.8, 0.0, 0.0])  # "no tags" has no answer for the parser
    metrics = model_metrics(batch.rule_rewards, batch.model_scores, COUNTING.success, "charts")
    agree = 1 + 0 + 0  # right/0.9 agrees; wrong/0.8 and wrong/0.7 do not; the unread one never does
    assert metrics == {"charts/judge_agreement": agree / 4, "charts/judge_unread": 1 / 4}
    rule_only = Reward(COUNTING, tasks.norm1000_frame, 0.5)(Batch([examples[0]] * 2, completions[1:3]))
    assert rule_only.tolist() == [0.5, 0.0]  # the rule with its format bonus


def test_a_classifiers_score_is_the_sigmoid_of_its_logit_in_any_batch(tmp_path, examples):
    tokenizer = train_tokenizer(512)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    classifier = load_reward_model(str(tmp_path), "classifier", COUNTING, torch.float32, "cpu", 3, 1024)
    assert isinstance(classifier, Classifier)
    scores = classifier.scores(examples, RESPONSES)
    for example, response, score in zip(examples, RESPONSES, scores):
        ids = tokenizer(f"{example.question}\n{response.strip()}", return_tensors="pt")  # no chat template: plain
        with torch.no_grad():
            expected = torch.sigmoid(classifier.model(**ids).logits[0, 0])
        assert score.item() == pytest.approx(expected.item(), abs=1e-5)
    assert scores.std() > 1e-4


@pytest.mark.slow
def test_the_tiny_judge_agrees_with_the_rule_on_held_out_responses():
    """The tiny judge (built here, minutes) against the rule on 200 held-out examples it never saw, each with a right,
    a wrong or a junk response (tiny_vlm.judge_examples), and on the answers that policies learned to fool earlier
    judges with (docs/rewards.md)."""
    judge = load_reward_model("tiny-judge", "judge", COUNTING, torch.float32, "cpu", 64, 1024)
    examples, responses, right = judge_examples("counting", "eval", 200, 0)
    scores = judge.scores(examples, responses)
    assert ((scores >= 0.5) == torch.tensor(right)).float().mean() >= 0.9
    # what policies learned to fool earlier judges with, each called right every time by one of them. This judge,
    # built at one thread here, calls 18 % of them right (measured); built by learn.py's run (two threads, AVX2
    # kernels pinned) 5 %, and that run learned (docs/rewards.md).
    hacks = ["<answer>he</answer>", "<answer>;</answer>", "<answer></answer>", "</answer>"]
    fooled = judge.scores([e for e in examples[:50] for _ in hacks], hacks * 50) >= 0.5
    assert fooled.float().mean() <= 0.25, f"the judge calls {fooled.float().mean():.0%} of known hacks right"
