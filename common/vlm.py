"""Loading a VLM the real way, building its prompts, and scoring responses.

Everything here goes through transformers' Auto classes (`AutoModelForImageTextToText`, `AutoProcessor`), so
a hub id and a local directory load the same way, and the embedded tiny model is loaded exactly like a real
checkpoint. What the training scripts need from a model is three things: a batch of prompts
(`build_prompts`), sampled responses (`generate`), and per-token log-probs of responses (`response_logprobs`).
"""

import inspect
import itertools
import os

import huggingface_hub.constants
import torch
import torch.nn.functional as F
import transformers
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from common.dist import is_sharded, unwrap


def image_only_processor_class(model_type: str):
    """The processor class of `model_type` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) without its video processor.

    These processors require a video processor, and transformers' video processors need torchvision, which has
    no CPU wheel matching our torch. The image path (resize, patching, `<|image_pad|>` expansion,
    `mm_token_type_ids`) is the parent's, unchanged. The subclass keeps the parent's name, so save_pretrained
    records the parent as `processor_class` and the checkpoint loads anywhere (with video where torchvision is)."""
    parent = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])
    if "video_processor" not in inspect.signature(parent.__init__).parameters:
        raise ValueError(f"{parent.__name__} has no video processor to leave out")

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        parent.__init__(self, image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    return type(parent.__name__, (parent,), {"__init__": __init__, "__doc__": f"{parent.__name__}, images only."})


Qwen2VLImageOnlyProcessor = image_only_processor_class("qwen2_vl")  # the embedded tiny model's (common/tiny_vlm.py)


def load_processor(path: str, min_pixels: int | None = None, max_pixels: int | None = None, flag: str = "--model"):
    """The checkpoint's processor (left padding; --min/--max-pixels applied). flag: the option that named `path`, for
    the error lines (--model, --reward-model)."""
    model_type = vision_language_model_type(path, flag)
    try:
        processor = auto_processor(path, model_type)
    except (OSError, ValueError) as e:
        raise could_not_load(path, e, flag)
    if not hasattr(processor, "image_processor"):
        raise SystemExit(f"{flag} '{path}' has no image processor: pass a vision-language checkpoint")
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    # not from_pretrained(min_pixels=, max_pixels=): the tokenizer would save them too, and override vLLM's size later
    set_image_size_limits(processor, min_pixels, max_pixels)
    return processor


def auto_processor(path: str, model_type: str):
    """AutoProcessor; without torchvision, the Qwen-VL processors without their video processor."""
    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, OSError, ValueError) as e:
        if "video" not in str(e).lower() and "torchvision" not in str(e).lower():
            raise
        if model_type not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            raise SystemExit(f"cannot load the processor of '{path}' without torchvision: pip install torchvision")
        print(f"note: torchvision is missing, using the {model_type} processor without video support")
        return image_only_processor_class(model_type).from_pretrained(path)


def vision_language_model_type(model: str, flag: str = "--model") -> str:
    """The model_type of --model, read from its config before anything else loads, so that what cannot be a VLM
    exits with one line saying why (the processor's and the weights' errors speak of missing files)."""
    # `org/name` is a hub id; a path that is not a directory is a typo, not something to look up on the hub
    is_path = os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1
    if is_path and not os.path.isdir(model):
        raise SystemExit(f"{flag} '{model}' is not a directory; pass an existing checkpoint dir or a hub id")
    try:
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        if offline and not os.path.isdir(model) and not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise SystemExit(
                f"{flag} '{model}': not in the Hugging Face cache and HF_HUB_OFFLINE=1: download it while online "
                f"(hf download {model}) or pass a local dir"
            )
        model_type = AutoConfig.from_pretrained(model).model_type
    except (OSError, ValueError) as e:
        raise could_not_load(model, e, flag)
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise SystemExit(
            f"{flag} '{model}' is a {model_type} checkpoint without a vision encoder: pass a vision-language checkpoint "
            "(README: Models)"
        )
    return model_type


def could_not_load(model: str, error: Exception, flag: str = "--model") -> SystemExit:
    reason = str(error).splitlines()[0]  # the whole first line: a line cut mid-word hides what to do
    return SystemExit(f"could not load {flag} '{model}': {reason} (pass a vision-language checkpoint dir or hub id)")


def set_image_size_limits(processor, min_pixels: int | None, max_pixels: int | None):
    """--min-pixels / --max-pixels: the Qwen-VL image processors resize each image, keeping its aspect ratio, to
    sides that are multiples of patch_size * merge_size and an area within [min_pixels, max_pixels]; fewer
    pixels = fewer image tokens. None keeps the checkpoint's own bound. transformers 5.x stores the bounds as
    `size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}` (areas, despite the names).
    By hand, not `from_pretrained(path, min_pixels=..., max_pixels=...)`: that sets `size` too, but it also passes
    them to the tokenizer, whose saved config then feeds them into every processor call of a trained checkpoint,
    where they override the `size` vLLM passes (its mm_processor_kwargs) with a deprecated call-time argument."""
    if min_pixels is None and max_pixels is None:
        return
    image_processor = processor.image_processor
    if not hasattr(image_processor, "merge_size"):  # Idefics3/SmolVLM size images by their longest edge instead
        raise SystemExit(
            f"--min-pixels/--max-pixels apply to Qwen-VL processors; {type(image_processor).__name__} sizes images "
            "by their longest edge ('size' and 'max_image_size' in the checkpoint's preprocessor_config.json)"
        )
    size = dict(image_processor.size)
    size["shortest_edge"] = min_pixels if min_pixels is not None else size["shortest_edge"]
    size["longest_edge"] = max_pixels if max_pixels is not None else size["longest_edge"]
    if size["shortest_edge"] > size["longest_edge"]:
        raise SystemExit(f"--min-pixels {size['shortest_edge']} > --max-pixels {size['longest_edge']}: lower one of them")
    image_processor.size = size


def load_vlm(model: str, dtype: torch.dtype = torch.float32, device: str = "cpu", min_pixels=None, max_pixels=None,
             flag: str = "--model"):  # fmt: skip
    """(model, processor) from a hub id or a local directory. min_pixels/max_pixels: see set_image_size_limits.
    flag: the option that named `model`, for the error lines."""
    processor = load_processor(model, min_pixels, max_pixels, flag)
    try:
        vlm = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        raise could_not_load(model, e, flag)
    return vlm, processor


def stop_token_id(processor) -> int:
    """The token that ends a response: the tokenizer's EOS, which chat checkpoints set to their end-of-turn token
    (`<|im_end|>` in Qwen2-VL, Qwen2.5-VL and Qwen3-VL Instruct, `<end_of_utterance>` in SmolVLM-Instruct).
    Generation stops on it, what follows it is masked, and it is never suppressed."""
    return processor.tokenizer.eos_token_id


def box_convention(model_type: str) -> str:
    """How a family writes box coordinates: "norm1000" (0-1000 relative to the image's width and height) or
    "pixels" (absolute pixels of the resized model input, see model_input_size). Checked 2026-11 in the
    QwenLM/Qwen3-VL (formerly Qwen2.5-VL) issue tracker:
    - qwen2_vl: 0-1000, `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` (#189, #1485).
    - qwen2_5_vl: absolute pixels of the image as finally input to the model, i.e. after the processor's resize
      (Qwen team member ShuaiBai623 in #940 and #957).
    - qwen3_vl: 0-1000 again. The Qwen3-VL cookbook: "Qwen3-VL's default coordinate system has been changed from
      the absolute coordinates used in Qwen2.5-VL to relative coordinates ranging from 0 to 1000" (quoted in
      #1741; its code maps back with bbox_2d / 1000 * width, quoted in #1623).
    - idefics3 (SmolVLM): no native grounding format; norm1000 is our choice (most VLMs' convention)."""
    if model_type not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3"):
        raise SystemExit(f"no box convention known for model type '{model_type}'; add it to common/vlm.py box_convention")
    return "pixels" if model_type == "qwen2_5_vl" else "norm1000"


def box_frame(model, processor):
    """A function (width, height) -> the extent of the frame this model writes box coordinates in, for an original
    image of that size: (1000, 1000) for 0-1000 families, the resized input's (w, h) for absolute-pixel ones.
    The grounding reward maps a predicted x back to the original image as x * width / frame_width."""
    model_type = model.config.model_type

    def frame(width: int, height: int):
        if box_convention(model_type) == "norm1000":
            return 1000, 1000
        return model_input_size(processor, width, height)

    return frame


def model_input_size(processor, width: int, height: int) -> tuple[int, int]:
    """(width, height) of a width x height image as the model sees it, after the processor's resize.

    Qwen-VL: `smart_resize` to multiples of patch_size * merge_size with an area in [min_pixels, max_pixels].
    Idefics3/SmolVLM: the longest edge scaled to size["longest_edge"], then each side rounded up to whole crops of
    max_image_size (the crops tile that image; the extra global view is the whole image squeezed to one crop)."""
    image_processor = processor.image_processor
    if hasattr(image_processor, "merge_size"):
        factor = image_processor.patch_size * image_processor.merge_size
        size = image_processor.size
        h, w = smart_resize(height, width, factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        return w, h
    if hasattr(image_processor, "max_image_size"):
        crop = image_processor.max_image_size["longest_edge"]
        _, rows, cols = image_processor.get_number_of_image_patches(height, width, {})
        return (cols * crop, rows * crop) if rows else (crop, crop)  # (0, 0) crops: fits one crop, resized to it
    raise SystemExit(f"model_input_size does not know {type(image_processor).__name__}; add it to common/vlm.py")


def suppressed_token_ids(processor) -> list[int]:
    """Special tokens a response must never contain (image/video pads, vision markers, ...), all but EOS.

    Sampling at temperature 1 over the full vocabulary emits them otherwise, and the next forward fails on
    image tokens without an image. The same ids are masked when scoring, so the policy we train is the
    policy we sample from."""
    tok = processor.tokenizer
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    return sorted(special - {stop_token_id(processor)})


def build_prompts(processor, images, questions, max_prompt_tokens: int, flag: str = "--max-prompt-tokens"):
    """Chat-template prompts with one image each, tokenised and left-padded into one batch. flag: the option that
    bounds them, for the error line."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in questions
    ]
    batch = processor(text=texts, images=[[im] for im in images], padding=True, return_tensors="pt")
    longest = int(batch["attention_mask"].sum(1).max())
    if longest > max_prompt_tokens:
        raise SystemExit(
            f"a prompt has {longest} tokens (image tokens included) > {flag} {max_prompt_tokens}; "
            f"truncating would cut image tokens: raise {flag} or lower --max-pixels"
        )
    return batch


@torch.no_grad()
def generate(model, processor, prompts, num_samples: int, max_new_tokens: int, temperature: float, greedy: bool):
    """Sample `num_samples` responses per prompt. Returns response ids (B*G, T) padded with EOS after EOS.

    Sampling is over the full distribution (top_k=0, top_p=1): the loss assumes the sampling policy is the
    model's softmax(logits / temperature) with `suppressed_token_ids` removed, nothing else."""
    eos = stop_token_id(processor)
    out = model.generate(
        **prompts,
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_k=0 if not greedy else None,
        top_p=1.0 if not greedy else None,
        num_return_sequences=num_samples,
        max_new_tokens=max_new_tokens,
        suppress_tokens=suppressed_token_ids(processor),
        eos_token_id=eos,
        pad_token_id=eos,
        synced_gpus=is_sharded(model),  # FSDP2 under torchrun: every rank decodes until all are done (a forward is a
    )  # collective)
    return out[:, prompts["input_ids"].shape[1] :]


def response_mask(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for response tokens up to and including the first EOS, 0 after it. (B, T) float."""
    is_eos = (response_ids == eos_id).int()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    return (~after_eos).float()


def take_rows(inputs, indices):
    """Rows `indices` of a processor batch, images included. The image layouts:
    - Qwen-VL: pixel_values (patches of all images, D) + image_grid_thw (images, 3): each image's block of patch rows
      is gathered by its grid; a row has one image, or `images_per_row` of them (an agentic episode's tool images,
      common/agent.py);
    - Idefics3/SmolVLM: pixel_values (B, crops, C, H, W) + pixel_attention_mask (B, crops, H, W), zero-padded to
      the batch's most crops (the model drops all-zero crops), and Gemma 3-like (B, C, H, W): row i is sample i's,
      like every other key."""
    indices = torch.as_tensor(list(indices), dtype=torch.long)
    if "image_grid_thw" not in inputs:
        return {k: v[indices] for k, v in inputs.items()}
    out = {k: v[indices] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    per_row = inputs.get("images_per_row", torch.ones(len(inputs["input_ids"]), dtype=torch.long)).tolist()
    first = [0, *itertools.accumulate(per_row)]  # each row's first image
    images = [j for i in indices.tolist() for j in range(first[i], first[i] + per_row[i])]
    blocks = inputs["pixel_values"].split(inputs["image_grid_thw"].prod(-1).tolist())
    out["pixel_values"] = torch.cat([blocks[j] for j in images]) if images else inputs["pixel_values"][:0]
    out["image_grid_thw"] = inputs["image_grid_thw"][images]
    return out


def cat_inputs(first, second, pad_token_id: int):
    """One processor batch of two: the rows of `first`, then those of `second`, as if processed together (`take_rows`'s
    image layouts). Per-token keys (input_ids, attention_mask, mm_token_type_ids, ...) are left-padded to the wider
    width, input_ids with `pad_token_id` and the others with 0; Qwen-VL's patches and grids are concatenated in row
    order (`images_per_row` 1 for a batch without it); Idefics3's crops are zero-padded to the most crops."""
    qwen, idefics = "image_grid_thw" in first, "pixel_attention_mask" in first
    if qwen and ("images_per_row" in first or "images_per_row" in second):
        first, second = ({"images_per_row": torch.ones(len(b["input_ids"]), dtype=torch.long), **b} for b in (first, second))
    width = max(first["input_ids"].shape[1], second["input_ids"].shape[1])

    def pad(x, dim1: int, left: bool, value=0):  # x's dim 1 to dim1 entries
        extra = dim1 - x.shape[1]
        return F.pad(x, (0, 0) * (x.dim() - 2) + ((extra, 0) if left else (0, extra)), value=value)

    out = {}
    for key, a in first.items():
        b = second[key]
        if qwen and key in ("pixel_values", "image_grid_thw", "images_per_row"):
            out[key] = torch.cat([a, b])  # one entry per image (per row for images_per_row)
        elif idefics and key in ("pixel_values", "pixel_attention_mask"):  # (B, crops, ...)
            crops = max(a.shape[1], b.shape[1])
            out[key] = torch.cat([pad(a, crops, left=False), pad(b, crops, left=False)])
        elif not key.startswith("pixel") and a.dim() >= 2:  # per token, as the prompts: left-padded
            value = pad_token_id if key == "input_ids" else 0
            out[key] = torch.cat([pad(a, width, left=True, value=value), pad(b, width, left=True, value=value)])
        else:
            out[key] = torch.cat([a, b])  # one entry per row (Gemma 3-like pixel_values (B, C, H, W))
    return out


def response_logprobs(model, prompts, response_ids, mask, suppressed_ids, temperature: float = 1.0, hidden_states: bool = False):
    """log π(response token | image, prompt, earlier tokens) for every response position, in one forward pass
    over prompt + response. prompts: (B, P) left-padded batch with image inputs; response_ids, mask: (B, T).
    Returns (B, T); positions where mask == 0 hold 0. With hidden_states, returns (log-probs, hidden): hidden
    (B, T, H) is the last hidden state (after the final norm: the LM head's input) at the position whose logits
    give log π(response token t), for a value head (algos/ppo_vlm.py); read from the LM head's input, so only
    those T positions are kept, whatever the family. Rows that share a prompt (a group's G responses, next to each
    other) are scored in one row of the forward, their prompt and image once (shared_prompt_forward)."""
    for module in model.modules():  # generate caches its batch's M-RoPE offsets on the model: never reuse them
        if hasattr(module, "rope_deltas"):
            module.rope_deltas = None
    runs = shared_prompt_runs(model, prompts)
    if runs is not None:
        logits, hidden = shared_prompt_forward(model, prompts, response_ids, mask, runs, hidden_states)
    else:
        logits, hidden = one_row_each_forward(model, prompts, response_ids, mask, hidden_states)
    logits = logits.float() / temperature  # (B, T, V)
    logits[..., suppressed_ids] = float("-inf")  # the policy we sampled from never emits these
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))
    return (logprobs, hidden) if hidden_states else logprobs


def attended_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T): every response token up to the last one trained on. In an agentic episode that includes the tool's
    turns (mask 0: read, not trained on); in a one-turn response it is the mask itself."""
    return mask.flip(1).cummax(1).values.flip(1)


def forward_keeping(model, inputs: dict, keep, hidden_states: bool):
    """model(**inputs)'s logits at the positions `keep` (logits_to_keep: a count from the end, or indices), and with
    hidden_states the LM head's input there (recorded as the forward passes it), else None."""
    captured = []
    head = unwrap(model).get_output_embeddings() if hidden_states else None  # (a DDP wrapper's model's)
    hook = head.register_forward_hook(lambda m, args, out: captured.append(args[0])) if hidden_states else None
    try:
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    finally:
        if hook is not None:
            hook.remove()
    return logits, captured[0] if hidden_states else None


def one_row_each_forward(model, prompts, response_ids, mask, hidden_states: bool):
    """Each row's prompt + response as one row of the forward: (logits (B, T, V) predicting each response token,
    the LM head's input there (B, T, H) or None)."""
    inputs = dict(prompts)
    tool_images = inputs.pop("images_per_row", None) is not None  # take_rows's, not the model's: an agentic batch
    inputs["input_ids"] = torch.cat([prompts["input_ids"], response_ids], dim=1)
    attended = attended_positions(mask).to(prompts["attention_mask"].dtype)
    inputs["attention_mask"] = torch.cat([prompts["attention_mask"], attended], dim=1)
    for key in ("mm_token_type_ids", "token_type_ids"):  # per-token modality (Qwen-VL M-RoPE, Gemma 3's image
        if key in prompts:  # attention): response tokens are text, type 0, but a tool's image in an agentic episode
            types = response_ids == unwrap(model).config.image_token_id if tool_images else torch.zeros_like(response_ids)
            inputs[key] = torch.cat([prompts[key], types.to(prompts[key].dtype)], dim=1)
    # Rotary positions: Qwen-VL's M-RoPE derives 3-D positions from input_ids, mm_token_type_ids, image_grid_thw and
    # the attention mask. 1-D RoPE (Idefics3/SmolVLM) needs nothing: the forward numbers left padding too, generate
    # does not, and a constant shift of every position leaves RoPE attention unchanged.
    T = response_ids.shape[1]  # logits at position i predict token i + 1: keep the T + 1 last, drop the last one
    logits, hidden = forward_keeping(model, inputs, T + 1, hidden_states)
    return logits[:, :-1], hidden[:, :-1] if hidden is not None else None


def rope_index_module(model):
    """The module with Qwen-VL's get_rope_index (its M-RoPE positions), or None (another family)."""
    return next((m for m in unwrap(model).modules() if hasattr(m, "get_rope_index")), None)


def shared_prompt_runs(model, prompts) -> list[int] | None:
    """The lengths of the runs of consecutive rows whose prompt, image included, is the same (a rollout's G responses
    to one prompt), when there is one longer than 1 and shared_prompt_forward serves this model: a Qwen-VL family
    (M-RoPE positions from get_rope_index), one image per row, attention through sdpa or eager (a 4-D mask).
    Else None."""
    if rope_index_module(model) is None or "images_per_row" in prompts:
        return None
    if "mm_token_type_ids" not in prompts or "image_grid_thw" not in prompts:
        return None
    if getattr(unwrap(model).config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return None
    ids, grid = prompts["input_ids"], prompts["image_grid_thw"]
    if len(grid) != len(ids):
        return None
    blocks = prompts["pixel_values"].split(grid.prod(-1).tolist())
    runs = [1]
    for i in range(1, len(ids)):
        if all(torch.equal(x[i], x[i - 1]) for x in (ids, prompts["attention_mask"], grid, blocks)):
            runs[-1] += 1
        else:
            runs.append(1)
    return runs if max(runs) > 1 else None


def shared_prompt_forward(model, prompts, response_ids, mask, runs: list[int], hidden_states: bool):
    """one_row_each_forward's result, with each run of rows that share a prompt packed into one row of the forward:
    [prompt | response 1 | response 2 | ... ], a 4-D attention mask letting each response token see the prompt and
    its own earlier tokens only, and each response's M-RoPE positions those it has after the prompt alone. The
    prompt, its image included, goes through the model once per run instead of once per response (G times less
    prompt work, forward and backward); the log-probs are the same up to float rounding (tests/test_vlm.py)."""
    T, device = response_ids.shape[1], response_ids.device
    P, U, G = prompts["input_ids"].shape[1], len(runs), max(runs)
    first = [0, *itertools.accumulate(runs)][:-1]  # each run's first row
    prompt = take_rows(prompts, first)  # (U, P) and one image per run
    # where each response sits in the packed rows: run u's j-th response is row first[u] + j, slot j of row u
    slot_rows = [first[u] + j if j < runs[u] else first[u] for u in range(U) for j in range(G)]  # U*G rows
    slot_rows = torch.tensor(slot_rows, device=device)
    slot_used = torch.tensor([j < runs[u] for u in range(U) for j in range(G)], device=device).view(U, G, 1)
    packed_ids = response_ids[slot_rows].view(U, G * T)
    attended = (attended_positions(mask)[slot_rows].view(U, G, T) * slot_used).bool()  # (U, G, T)
    # positions: the prompt's from the family's own rule; a response token t comes after the prompt's last one
    prompt_valid = prompt["attention_mask"].bool()  # (U, P)
    positions, _ = rope_index_module(model).get_rope_index(
        input_ids=prompt["input_ids"], mm_token_type_ids=prompt["mm_token_type_ids"],
        image_grid_thw=prompt["image_grid_thw"], attention_mask=prompt["attention_mask"])  # (3, U, P)  # fmt: skip
    start = positions.masked_fill(~prompt_valid, -1).amax(dim=(0, 2)) + 1  # (U,)
    response_positions = (start.view(U, 1, 1) + torch.arange(T, device=device)).repeat(1, G, 1)  # (U, G, T)
    response_positions = response_positions.view(1, U, G * T).expand(3, -1, -1)
    # the mask (U, 1, L, L), L = P + G*T: True where a query may attend a key
    L = P + G * T
    key_valid = torch.cat([prompt_valid, attended.view(U, G * T)], dim=1)  # (U, L)
    segment = torch.cat([torch.full((P,), -1), torch.arange(G).repeat_interleave(T)]).to(device)  # -1: the prompt
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    visible = causal & ((segment.view(1, L) == -1) | (segment.view(L, 1) == segment.view(1, L)))  # (L, L)
    allowed = visible & key_valid.view(U, 1, L)  # (U, L, L)
    allowed |= torch.eye(L, dtype=torch.bool, device=device) & ~allowed.any(-1, keepdim=True)  # a padding query: itself
    dtype = next(unwrap(model).parameters()).dtype
    attention = torch.zeros(U, 1, L, L, dtype=dtype, device=device).masked_fill(~allowed.unsqueeze(1), torch.finfo(dtype).min)
    inputs = {**prompt, "input_ids": torch.cat([prompt["input_ids"], packed_ids], dim=1),
              "attention_mask": attention, "position_ids": torch.cat([positions, response_positions], dim=2),
              "mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(packed_ids).to(
                  prompt["mm_token_type_ids"].dtype)], dim=1)}  # fmt: skip
    # the logits that predict response j's token t: at the prompt's last position for t = 0, else at its token t - 1
    predicting = torch.tensor([P - 1 if t == 0 else P + j * T + t - 1 for j in range(G) for t in range(T)], device=device)
    logits, hidden = forward_keeping(model, inputs, predicting, hidden_states)  # (U, G*T, V)
    used = slot_used.view(U * G).nonzero().squeeze(1)  # the packed slots that hold a row, in row order
    logits = logits.reshape(U * G, T, -1)[used]
    return logits, hidden.reshape(U * G, T, -1)[used] if hidden is not None else None


# Where each family keeps its vision encoder (transformers attribute names): Qwen2-VL, Qwen2.5-VL, Qwen3-VL
# `model.model.visual` (its patch merger, the projector, lives inside it); Gemma 3, LLaVA, LLaVA-OneVision
# `model.model.vision_tower`; Idefics3, SmolVLM `model.model.vision_model` (their projectors, Gemma 3's
# `multi_modal_projector` and Idefics3's `connector`, sit outside the tower). Add a family's name here.
VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model")


def vision_tower(model) -> tuple[str, torch.nn.Module]:
    """(dotted name, module) of the vision encoder, e.g. ("model.visual", ...): the first module, outermost
    first, whose attribute name is in VISION_TOWER_NAMES. Works on a peft-wrapped model too."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in VISION_TOWER_NAMES:
            return name, module
    raise SystemExit(f"no vision tower ({', '.join(VISION_TOWER_NAMES)}) in {type(model).__name__}: add its name to common/vlm.py")
