"""The rewards on adversarial completions: only one well-formed answer earns reward (counting: one
<answer>N</answer> block; math: one \\boxed{}; grounding: one <answer>[x1, y1, x2, y2]</answer> box)."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.tasks import counting_reward, grounding_reward, iou, math_reward, parse_answer, parse_box, parse_boxed


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


# ---------------------------------------------------------------------------------------------- math
@pytest.mark.parametrize(
    "completion, answer",
    [
        ("\\boxed{12}", "12"),
        ("The sum is 5 + 7. \\boxed{12}", "12"),
        ("\\boxed{ 12 }\n", "12"),
        ("\\boxed{12.0}", "12"),  # math-verify: numerically equal
        ("\\boxed{\\frac{24}{2}}", "12"),
        ("\\boxed{\\sqrt{18}}", "3\\sqrt{2}"),  # Geometry3K-style answers: symbolic equality
        ("\\boxed{{12}}", "12"),  # nested braces balance
    ],
)
def test_math_answer_equal_as_mathematics_earns_full_reward(completion, answer):
    assert math_reward(completion, answer, format_reward=0.1) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "", "12", "the answer is 12", "\\boxed{}", "\\boxed{ }", "\\boxed{12", "\\boxed12", "boxed{12}",
        "\\boxed{12}\\boxed{12}", "\\boxed{12} \\boxed{13}", "\\boxed{12} because", "\\boxed{12}}",
        "\\boxed{12}.", "\\Boxed{12}", "\\boxed{{12}", "<answer>12</answer>",
    ],
)  # fmt: skip
def test_math_malformed_completion_earns_nothing(completion):
    assert math_reward(completion, "12", format_reward=0.1) == 0.0


@pytest.mark.parametrize("completion", ["\\boxed{13}", "\\boxed{-12}", "x \\boxed{\\frac{1}{2}}", "\\boxed{12+1}"])
def test_math_wrong_but_well_formed_answer_earns_exactly_format_reward(completion):
    assert math_reward(completion, "12", format_reward=0.1) == 0.1
    assert math_reward(completion, "12", format_reward=0.0) == 0.0


@pytest.mark.parametrize(
    "completion, content",
    [("\\boxed{7}", "7"), ("a \\boxed{\\frac{1}{2}} ", "\\frac{1}{2}"), ("\\boxed{{7}}", "{7}"), ("\\boxed{7", None),
     ("\\boxed{}", None), ("\\boxed{7} x", None), ("\\boxed{7}\\boxed{7}", None), ("7", None)],
)  # fmt: skip
def test_parse_boxed_returns_the_single_balanced_content_or_none(completion, content):
    assert parse_boxed(completion) == content


# ---------------------------------------------------------------------------------------------- grounding
TRUTH = json.dumps({"box": [10, 20, 30, 60], "image_size": [100, 200]})  # pixels of a 100 x 200 original


def test_iou_hand_computed():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges: no overlap
    assert iou([0, 0, 10, 10], [2, 2, 4, 4]) == pytest.approx(4 / 100)


def test_grounding_maps_normalised_boxes_back_to_the_original_image():
    # 0-1000 frame: x = 100 * 100 / 1000 = 10, y = 100 * 200 / 1000 = 20, ...
    assert grounding_reward("<answer>[100, 100, 300, 300]</answer>", TRUTH) == pytest.approx(1.0)
    # shifted right by 10 original pixels = 100 normalised units: overlap 10x40 of union 30x40 → 1/3
    assert grounding_reward("<answer>[200, 100, 400, 300]</answer>", TRUTH) == pytest.approx(1 / 3)


def test_grounding_maps_resized_pixel_boxes_back_to_the_original_image():
    resized = lambda w, h: (w // 2, h // 2)  # noqa: E731 - the model saw a 50 x 100 input
    assert grounding_reward("<answer>[5, 10, 15, 30]</answer>", TRUTH, box_frame=resized) == pytest.approx(1.0)
    assert grounding_reward("<answer>[10, 10, 20, 30]</answer>", TRUTH, box_frame=resized) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "completion",
    [
        "", "[100, 100, 300, 300]", "<answer></answer>", "<answer>[100, 100, 300]</answer>",
        "<answer>[100, 100, 300, 300, 1]</answer>", "<answer>[300, 100, 100, 300]</answer>",  # x2 < x1
        "<answer>[100, 100, 100, 300]</answer>",  # empty box
        "<answer>100, 100, 300, 300</answer>", "<answer>[a, 100, 300, 300]</answer>",
        "<answer>[100, 100, 300, 300]</answer><answer>[100, 100, 300, 300]</answer>",
        "<answer>[100, 100, 300, 300]</answer> done", "<answer>[1e3, 100, 300, 300]</answer>",
        "<answer>[100, 100, 300, 300]", "<answer>[nan, 100, 300, 300]</answer>",
    ],
)  # fmt: skip
def test_grounding_malformed_box_earns_nothing(completion):
    assert grounding_reward(completion, TRUTH, format_reward=0.1) == 0.0


def test_grounding_well_formed_box_earns_its_iou_or_at_least_format_reward():
    far = "<answer>[900, 900, 950, 950]</answer>"
    assert grounding_reward(far, TRUTH, format_reward=0.0) == 0.0
    assert grounding_reward(far, TRUTH, format_reward=0.1) == 0.1
    assert grounding_reward("<answer>[100.5, 100, 300, 300.0]</answer>", TRUTH) == pytest.approx(1.0, abs=0.01)


# ---------------------------------------------------------------------------------------------- fuzz
PIECES = ["<answer>", "</answer>", "\\boxed{", "{", "}", "[", "]", ",", ", ", " ", "\n", ".", "-", "1", "12", "100",
          "300", "nan", "\\frac{1}{2}", "\\sqrt{", "^", "x", "\\", "$", "e", "inf", "\u0663"]  # fmt: skip
adversarial = st.one_of(st.text(max_size=40), st.lists(st.sampled_from(PIECES), max_size=14).map("".join))


@settings(max_examples=300, deadline=None)
@given(adversarial)
def test_fuzz_counting_reward_never_raises_and_stays_in_range(completion):
    assert counting_reward(completion, "3", format_reward=0.1) in (0.0, 0.1, 1.0)


@settings(max_examples=300, deadline=None)
@given(adversarial)
def test_fuzz_math_reward_never_raises_and_stays_in_range(completion):
    assert math_reward(completion, "12", format_reward=0.1) in (0.0, 0.1, 1.0)


@settings(max_examples=300, deadline=None)
@given(adversarial)
def test_fuzz_grounding_reward_never_raises_and_stays_in_range(completion):
    reward = grounding_reward(completion, TRUTH, format_reward=0.1)
    assert reward == 0.0 or 0.1 <= reward <= 1.0
    assert (reward == 0.0) == (parse_box(completion) is None)
