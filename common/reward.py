"""The Reward role: what scores a response. By default the task's rule (common/tasks.py: is the count right? how
well does the box overlap?); with --reward-model, a model loaded in the training process, on the policy's device: a
generative VLM judge (its P(yes) to the task's judge prompt) or a sequence classifier (common/judges.py).

--reward-mix model uses the model's score alone (a judge that gave no verdict scores 0); format-gate keeps it only
where the task's parser reads an answer (the rule gates the format, the model scores the content), else 0. Either way
the rule is still computed and logged beside the model: charts/accuracy is the rule's, and charts/judge_agreement
and eval/judge_agreement say how often the model and the rule agree on right vs wrong. A policy that learns to please
a judge without being right shows up there. Under torchrun each rank holds its own replica of the reward model and
scores its own rows.
"""

import time

import torch

from common.judges import Classifier, Judge, model_metrics
from common.tiny_vlm import tiny_judge_dir
from common.vlm import load_vlm


def load_reward_model(path: str | None, kind: str, task, dtype: torch.dtype, device: str, batch_size: int,
                      max_tokens: int):  # fmt: skip
    """--reward-model as a Judge or a Classifier (--reward-kind), or None (the task's rule). 'tiny-judge' is the
    embedded tiny judge of the task (common/tiny_vlm.py), built and cached like the tiny policy."""
    if path is None:
        return None
    if kind not in ("judge", "classifier"):
        raise SystemExit(f"--reward-kind {kind}: choose judge or classifier")
    if path == "tiny-judge":
        if kind != "judge":
            raise SystemExit("--reward-model tiny-judge is a judge: use --reward-kind judge")
        path = tiny_judge_dir(task.name)
    if kind == "classifier":
        return Classifier(path, dtype, device, batch_size, max_tokens)
    if task.judge_template is None:
        raise SystemExit(f"--task {task.name} has no judge prompt (judge_template in common/tasks.py): add one, or "
                         "use --reward-kind classifier")  # fmt: skip
    model, processor = load_vlm(path, dtype, device, flag="--reward-model")
    return Judge(model.eval().requires_grad_(False), processor, task.judge_template, batch_size, max_tokens, path)


class Reward:
    """reward(batch) -> the batch's rewards (N,), filling in its rule_rewards, model_scores and reward_seconds; the
    task's rule alone when `model` is None (module docstring)."""

    def __init__(self, task, box_frame, format_reward: float = 0.0, model=None, mix: str = "model"):
        if mix not in ("model", "format-gate"):
            raise SystemExit(f"--reward-mix {mix}: choose model or format-gate")
        self.task, self.rule, self.format_reward = task, task.reward_fn(box_frame), format_reward
        self.model, self.mix = model, mix

    def rule_rewards(self, examples, completions, format_reward: float = 0.0) -> torch.Tensor:
        return torch.tensor([self.rule(c, e.answer, format_reward) for c, e in zip(completions, examples)])

    def __call__(self, batch) -> torch.Tensor:
        start = time.time()
        batch.rule_rewards = self.rule_rewards(batch.examples, batch.completions, self.format_reward)  # (N,)
        rewards = batch.rule_rewards
        if self.model is not None:
            batch.model_scores = self.model.scores(batch.examples, batch.completions)  # (N,), NaN: no verdict
            rewards = batch.model_scores.nan_to_num(0.0)
            if self.mix == "format-gate":  # the rule's parser must read an answer
                rewards = rewards * torch.tensor([self.task.parse(c) is not None for c in batch.completions])
        batch.reward_seconds = torch.full((len(batch),), (time.time() - start) / max(len(batch), 1))
        return rewards

    def evaluation(self, examples, completions) -> list[tuple[float, float]]:
        """(rule reward, model score or NaN) of each held-out response (greedy; no format bonus)."""
        rule = self.rule_rewards(examples, completions).tolist()
        if self.model is None:
            return [(r, float("nan")) for r in rule]
        return list(zip(rule, self.model.scores(examples, completions).tolist()))

    def summarize(self, scored: list[tuple[float, float]], prefix: str) -> dict:
        """<prefix>/accuracy (+ the task's metric) from the rule, and with a model its agreement with the rule."""
        rule = [r for r, _ in scored]
        out = self.task.summarize(rule, prefix)
        if self.model is not None:
            out.update(model_metrics(torch.tensor(rule), torch.tensor([s for _, s in scored]), self.task.success, prefix))
        return out
