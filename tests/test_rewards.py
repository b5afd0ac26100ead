"""The counting reward on adversarial completions: only one well-formed <answer>N</answer> block earns reward."""

import random

import pytest

from common.tasks import counting_reward, parse_answer


@pytest.mark.parametrize(
    "completion",
    [
        "<answer>3</answer>",
        " <answer> 3 </answer> ",
        "<answer>\n3\n</answer>\n",
        "I see a red circle, a blue square and a green triangle. <answer>3</answer>",
        "<answer>03</answer>",  # documented: a lone integer, compared as a number
    ],
)
def test_correct_answer_block_earns_full_reward(completion):
    assert counting_reward(completion, "3", format_reward=0.1) == 1.0
    assert counting_reward(completion, "3", format_reward=0.0) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "3",
        "the answer is 3",
        "<answer></answer>",
        "<answer> </answer>",
        "<answer>3</answer><answer>3</answer>",
        "<answer>3</answer> <answer>4</answer>",
        "<answer>3 or 4</answer>",
        "<answer>3 4</answer>",
        "<answer>3.0</answer>",
        "<answer>3.5</answer>",
        "<answer>-3</answer>",
        "<answer>+3</answer>",
        "<answer>three</answer>",
        "<answer>\u0663</answer>",  # ARABIC-INDIC DIGIT THREE: int() accepts it, the format does not
        "<answer>3",
        "3</answer>",
        "</answer>3<answer>",
        "<answer>3</answer> because I counted",
        "<answer>3</answer>.",
        "<answer><answer>3</answer></answer>",
        "<answer>3</answer></answer>",
        "<Answer>3</Answer>",
    ],
)
def test_malformed_completion_earns_nothing_not_even_format_reward(completion):
    assert counting_reward(completion, "3", format_reward=0.1) == 0.0
    assert counting_reward(completion, "3", format_reward=0.0) == 0.0


@pytest.mark.parametrize("format_reward", [0.1, 0.0])
@pytest.mark.parametrize("completion", ["<answer>4</answer>", "<answer>0</answer>", "reasoning <answer> 30 </answer>"])
def test_wrong_but_well_formed_answer_earns_exactly_format_reward(completion, format_reward):
    assert counting_reward(completion, "3", format_reward=format_reward) == format_reward


@pytest.mark.parametrize(
    "completion, content",
    [
        ("<answer> 3 </answer>", "3"),
        ("think first\n<answer>twelve</answer>  \n", "twelve"),
        ("<answer></answer>", ""),
        ("<answer>3</answer><answer>3</answer>", None),
        ("<answer><answer>3</answer>", None),
        ("<answer>3", None),
        ("<answer>3</answer>x", None),
        ("no block at all", None),
    ],
)
def test_parse_answer_returns_the_single_block_content_or_none(completion, content):
    assert parse_answer(completion) == content


def oracle_reward(completion: str, answer: str, format_reward: float) -> float:
    """The reward rule written out with str methods, independently of common.tasks' regular expressions."""
    if completion.count("<answer>") != 1 or completion.count("</answer>") != 1:
        return 0.0
    start, end = completion.index("<answer>") + len("<answer>"), completion.index("</answer>")
    if end < start or completion[end + len("</answer>") :].strip():
        return 0.0
    content = completion[start:end].strip()
    if not 1 <= len(content) <= 6 or any(ch not in "0123456789" for ch in content):
        return 0.0
    return 1.0 if int(content) == int(answer) else format_reward


def test_reward_fuzz_never_raises_and_matches_the_rule():
    rng = random.Random(1234)
    fragments = ["<answer>", "</answer>", "<answer", "answer>", "<", ">", "/", " ", "\n", ".", "-", "a", "x", "3"]
    fragments += list("0123456789")
    seen = {0.0: 0, 0.1: 0, 1.0: 0}
    for _ in range(4000):
        pieces = [rng.choice(fragments) for _ in range(rng.randint(0, 8))]
        if rng.random() < 0.5:  # half the cases around one block, so every reward level is reached
            middle = "".join(rng.choice(" 0123456789") for _ in range(rng.randint(0, 3)))
            cut = rng.randint(0, len(pieces))
            suffix = pieces[cut:] if rng.random() < 0.3 else []  # mostly nothing after the block
            pieces = pieces[:cut] + ["<answer>", middle, "</answer>"] + suffix
        completion = "".join(pieces)
        reward = counting_reward(completion, "3", format_reward=0.1)
        assert reward in seen, (completion, reward)
        assert reward == oracle_reward(completion, "3", 0.1), completion
        seen[reward] += 1
    assert min(seen.values()) >= 50, seen  # the fuzz exercised all three outcomes
