"""Reward models, scored in the training process (common/reward.py says how they become rewards):

- Judge: a generative VLM shown the image and a prompt ending in a yes/no question. Its score is its probability of
  answering yes, read from ONE forward pass over the prompt (no sampling: greedy and deterministic):
  P(yes) / (P(yes) + P(no)), P(yes) summing the first tokens of "yes" and "Yes" ("no", "No" likewise). A judge whose
  most likely first token is neither gave no verdict: its score is NaN.
- Classifier: an AutoModelForSequenceClassification reward model, shown the question and the response as a chat (and
  the image, if it has an image processor). One label: sigmoid(logit); two: the softmax's second ("good") class.

Both score in micro-batches under torch.no_grad.
"""

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from common.vlm import build_prompts, load_processor

VERDICTS = {"yes": ("yes", "Yes"), "no": ("no", "No")}  # how a judge may begin its answer


def verdict_token_ids(tokenizer, source: str) -> tuple[list[int], list[int]]:
    """(the first token ids of the yes words, of the no words): a verdict is read from the first token only.
    One line ends the run if the two sets share a token (the verdict could not be read)."""
    first = {label: sorted({tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words})
             for label, words in VERDICTS.items()}  # fmt: skip
    if set(first["yes"]) & set(first["no"]):
        raise SystemExit(f"--reward-model {source}: its tokenizer starts 'yes' and 'no' with the same token, so its "
                         "verdict cannot be read from one token: use another judge or --reward-kind classifier")
    return first["yes"], first["no"]


class Judge:
    """A generative VLM judge: `scores(examples, completions)` are its P(yes) for each response (module docstring)."""

    def __init__(self, model, processor, template: str, batch_size: int, max_tokens: int, source: str = "judge"):
        """model, processor: a loaded VLM (common.vlm.load_vlm); template: the prompt, with {question}, {response}
        and {reference} (the example's answer) to fill in; max_tokens: a prompt's bound; source: its name in errors."""
        self.model, self.processor = model, processor
        self.template, self.batch_size, self.max_tokens = template, batch_size, max_tokens
        self.yes_ids, self.no_ids = verdict_token_ids(processor.tokenizer, source)

    def prompt(self, example, completion: str) -> str:
        return self.template.format(question=example.question, response=completion.strip(), reference=example.answer)

    @torch.no_grad()
    def scores(self, examples: list, completions: list[str]) -> torch.Tensor:
        """(N,) P(yes) of each response, NaN where the judge gave no verdict; micro-batches of batch_size."""
        out = []
        for i in range(0, len(examples), self.batch_size):
            rows = range(i, min(i + self.batch_size, len(examples)))
            texts = [self.prompt(examples[j], completions[j]) for j in rows]
            prompts = build_prompts(self.processor, [examples[j].image for j in rows], texts, self.max_tokens,
                                    flag="--reward-max-tokens").to(self.model.device)  # fmt: skip
            logits = self.model(**prompts, use_cache=False, logits_to_keep=1).logits[:, -1].float()  # (n, V)
            probs = torch.softmax(logits, dim=-1)
            p_yes, p_no = probs[:, self.yes_ids].sum(-1), probs[:, self.no_ids].sum(-1)
            read = torch.isin(logits.argmax(-1), torch.tensor(self.yes_ids + self.no_ids, device=logits.device))
            out.append(torch.where(read, p_yes / (p_yes + p_no), torch.nan).cpu())
        return torch.cat(out) if out else torch.zeros(0)


class Classifier:
    """A sequence-classification reward model: `scores(examples, completions)` in [0, 1] (module docstring)."""

    def __init__(self, path: str, dtype: torch.dtype, device: str, batch_size: int, max_tokens: int):
        """Loads `path` (a hub id or a checkpoint dir) in `dtype` on `device`."""
        try:
            config = AutoConfig.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device)
        except (OSError, ValueError) as e:
            raise SystemExit(f"could not load --reward-model '{path}' as a classifier: {str(e).splitlines()[0]} (pass "
                             "an AutoModelForSequenceClassification checkpoint, or --reward-kind judge)") from None
        self.model.eval().requires_grad_(False)
        if config.num_labels not in (1, 2):
            raise SystemExit(f"--reward-model {path} has {config.num_labels} labels: a reward classifier has 1 (a "
                             "score) or 2 (bad, good)")  # fmt: skip
        self.vision = hasattr(config, "vision_config")
        self.processor = load_processor(path, flag="--reward-model") if self.vision else AutoTokenizer.from_pretrained(path)
        self.tokenizer = self.processor.tokenizer if self.vision else self.processor
        self.tokenizer.padding_side = "left"  # the classifier reads the last non-padding token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.model.config.pad_token_id is None:
            raise SystemExit(f"--reward-model {path}: neither its config nor its tokenizer has a pad token id, which "
                             "a classifier needs to find each row's last token: set pad_token_id in its config.json")
        self.batch_size, self.max_tokens = batch_size, max_tokens

    def chat(self, example, completion: str) -> str:
        question = [{"type": "image"}, {"type": "text", "text": example.question}] if self.vision else example.question
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": completion.strip()}]
        if getattr(self.processor, "chat_template", None) is None:  # a plain text model: question and response
            return f"{example.question}\n{completion.strip()}"
        return self.processor.apply_chat_template(messages, tokenize=False)

    @torch.no_grad()
    def scores(self, examples: list, completions: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(examples), self.batch_size):
            rows = range(i, min(i + self.batch_size, len(examples)))
            texts = [self.chat(examples[j], completions[j]) for j in rows]
            if self.vision:
                inputs = self.processor(text=texts, images=[[examples[j].image] for j in rows], padding=True,
                                        return_tensors="pt")  # fmt: skip
            else:
                inputs = self.tokenizer(texts, padding=True, return_tensors="pt")
            if inputs["input_ids"].shape[1] > self.max_tokens:
                raise SystemExit(f"a reward-model input has {inputs['input_ids'].shape[1]} tokens > "
                                 f"--reward-max-tokens {self.max_tokens}: raise it")  # fmt: skip
            logits = self.model(**inputs.to(self.model.device)).logits.float()  # (n, labels)
            out.append((torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else logits.softmax(-1)[:, 1]).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def model_metrics(rule: torch.Tensor, scores: torch.Tensor, success: float, prefix: str) -> dict:
    """<prefix>/judge_agreement: the share of responses the model and the rule call alike (model: score >= 0.5 is
    right; rule: reward >= the task's success), a response the judge gave no verdict on counting as a disagreement;
    <prefix>/judge_unread: the share it gave none on (NaN scores)."""
    n = max(len(rule), 1)
    agree = ((scores >= 0.5) == (rule >= success)) & ~scores.isnan()
    return {f"{prefix}/judge_agreement": agree.sum().item() / n, f"{prefix}/judge_unread": scores.isnan().sum().item() / n}
