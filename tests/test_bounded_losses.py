"""Every script's loss stays finite when a token has drifted far from the policy that sampled it (or from the
reference): the log-ratios are clamped at ±20, as verl clamps them, so such a step is bounded instead of skipped for
an infinite loss (exp(20) is finite in float32 and bfloat16). Each algorithm's own numbers: tests/test_<algorithm>_math.py."""

import pytest
import torch
from conftest import REPO_ROOT, load_script

# log pi / pi_old = +149.5 and +150 (exp overflows float32, and so does their mean GSPO exponentiates); token 1
# also has log pi_ref / pi = +149.5 (the k3 KL's exp overflows)
LOGPROBS, OLD, REF = [[-0.5, -150.0]], [[-150.0, -300.0]], [[-0.5, -0.5]]
LOSSES = {  # script: its loss from (log-probs, old, ref, a negative advantage per sequence, mask)
    "grpo_vlm": lambda m, lp, old, ref, adv, mask: m.grpo_loss(lp, old, ref, adv, mask, 0.2, 0.1)[0],
    "rloo_vlm": lambda m, lp, old, ref, adv, mask: m.rloo_loss(lp, old, ref, adv, mask, 0.2, 0.1)[0],
    "dapo_vlm": lambda m, lp, old, ref, adv, mask: m.dapo_loss(lp, old, adv, mask, 0.2, 0.28)[0],
    "opo_vlm": lambda m, lp, old, ref, adv, mask: m.opo_loss(lp, old, adv, mask)[0],
    "gspo_vlm": lambda m, lp, old, ref, adv, mask: m.gspo_loss(lp, old, adv, mask, 3e-4, 4e-4)[0],
    "ppo_vlm": lambda m, lp, old, ref, adv, mask: m.ppo_loss(lp, old, adv.unsqueeze(1).expand_as(lp), mask, 0.2)[0],
}


@pytest.mark.parametrize("name", LOSSES)
def test_a_drifted_token_gives_a_finite_loss_and_gradient(name):
    module = load_script(REPO_ROOT / "algos" / f"{name}.py")
    logprobs = torch.tensor(LOGPROBS, requires_grad=True)
    loss = LOSSES[name](module, logprobs, torch.tensor(OLD), torch.tensor(REF), torch.tensor([-1.0]), torch.ones(1, 2))
    assert torch.isfinite(loss), loss
    loss.backward()
    assert torch.isfinite(logprobs.grad).all(), logprobs.grad
