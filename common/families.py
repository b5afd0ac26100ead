"""Random-init checkpoints of the four VLM families vlrl supports, built offline: tiny ones (about a second each)
for the tests, and the Qwen-VL ones at any size (benchmarks/gpu_memory.py builds the published sizes).

Each is the family's real config and model class, at tiny size by default (text: hidden 128, 4 heads of 32, 2 layers;
vision: 2 blocks of 64); the project's own tokenizer (`common.tiny_vlm.train_tokenizer`) carrying the family's
special tokens (a larger vocab_size keeps their ids); and the family's processor with its chat template (the real
one, shortened to the parts a one-image prompt uses). Saved with save_pretrained, so the tests drive it through `--model <dir>` exactly as a user drives
a hub checkpoint.

    qwen2_vl    Qwen2-VL     M-RoPE; pixel_values (patches of all images, D) + image_grid_thw; 14-px patches, 2x2 merge
    qwen2_5_vl  Qwen2.5-VL   as Qwen2-VL, plus windowed attention in the vision tower
    qwen3_vl    Qwen3-VL     interleaved M-RoPE, 16-px patches, DeepStack features; Qwen2-VL's image processor
    idefics3    SmolVLM (v1) / Idefics3: 1-D RoPE; pixel_values (B, crops, C, H, W) + pixel_attention_mask;
                an image is split into up to 2x2 crops of 32 px plus a global view
"""

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from common.tiny_vlm import SPECIAL_TOKENS as QWEN_SPECIAL_TOKENS
from common.tiny_vlm import tokenizer_corpus, train_tokenizer
from common.vlm import image_only_processor_class

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3"]
VOCAB_SIZE = 512
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024)  # fmt: skip
# a Qwen-VL image: 56x56 px at least (4 merged tokens), 112x112 at most (16); real checkpoints allow far more
QWEN_IMAGE_PIXELS = dict(min_pixels=56 * 56, max_pixels=112 * 112)

# Qwen2-VL-Instruct's and Qwen2.5-VL-Instruct's template (default system message included), without vision ids
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL-Instruct's template without tools and reasoning blocks: no default system message
QWEN3_VL_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content.type == 'video' or 'video' in content %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# SmolVLM-Instruct's (Idefics3 processor) template, verbatim
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# SmolVLM's added special tokens: <global-img>, the 6x6 crop-position tags, the image markers, the end of a turn
IDEFICS3_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<global-img>"]
IDEFICS3_SPECIAL_TOKENS += [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
IDEFICS3_SPECIAL_TOKENS += ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def qwen_tokenizer():
    # Qwen2.5-VL and Qwen3-VL add <tool_call>, <think>, ... too, but as non-special tokens: left out here
    return train_tokenizer(VOCAB_SIZE, tokenizer_corpus(), QWEN_SPECIAL_TOKENS, "<|im_end|>", "<|endoftext|>")


def qwen_ids(tokenizer):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])  # fmt: skip
    text = dict(vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])  # fmt: skip
    return special, text


def save(model, processor, out_dir, eos_id, pad_id):
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos_id, pad_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def qwen2_image_processor(patch_size=14, **kwargs):
    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2, **kwargs)


QWEN_FAMILIES = {  # model_type: (config class, model class, image processor, chat template)
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, qwen2_image_processor, QWEN2_VL_TEMPLATE),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, qwen2_image_processor, QWEN2_VL_TEMPLATE),
    # Qwen3-VL uses Qwen2-VL's image processor with 16-px patches (a multiple of 32 px per side) and mean/std 0.5
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                 lambda **kw: qwen2_image_processor(16, image_mean=[0.5] * 3, image_std=[0.5] * 3, **kw), QWEN3_VL_TEMPLATE),
}  # fmt: skip
TINY_QWEN = {  # model_type: (vision config, rope parameters, text extras, image pixels) at tiny size
    "qwen2_vl": (
        dict(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2, hidden_size=TEXT["hidden_size"], patch_size=14,
             spatial_merge_size=2, temporal_patch_size=2),
        {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},  # sums to head_dim / 2
        {}, QWEN_IMAGE_PIXELS,
    ),
    "qwen2_5_vl": (
        # window_size 56 px = 2x2 merged tokens per attention window; block 1 attends over the whole image
        dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=TEXT["hidden_size"],
             patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        {}, QWEN_IMAGE_PIXELS,
    ),
    "qwen3_vl": (
        # 8x8 learned position embeddings, interpolated to each image's grid (as the real 48x48)
        dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=TEXT["hidden_size"],
             patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
             deepstack_visual_indexes=[0]),
        {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True},
        {"head_dim": 32}, dict(min_pixels=64 * 64, max_pixels=128 * 128),
    ),
}  # fmt: skip


def qwen_vlm(model_type: str, text: dict, vision: dict, rope: dict, image_pixels: dict):
    """(config, processor) of a Qwen-VL family member with these text/vision sizes, our tokenizer with Qwen's
    special tokens (the config's token ids are the tokenizer's; `text` may raise vocab_size above it), and the
    family's image processor and chat template. Build the model with `model_class(config)`."""
    config_class, _, image_processor, template = QWEN_FAMILIES[model_type]
    tokenizer = qwen_tokenizer()
    special, ids = qwen_ids(tokenizer)
    tie = {k: text[k] for k in ["tie_word_embeddings"] if k in text}  # Qwen3-VL reads it at the top level only
    config = config_class(text_config={**ids, **text, "rope_parameters": rope}, vision_config=vision, **special, **tie)
    processor = image_only_processor_class(model_type)(image_processor(**image_pixels), tokenizer, chat_template=template)
    return config, processor


def build_qwen(out_dir, model_type):
    """A tiny Qwen-VL family member, saved: the family's config at tiny size, tokenizer, processor."""
    vision, rope, text_extra, pixels = TINY_QWEN[model_type]
    config, processor = qwen_vlm(model_type, {**TEXT, **text_extra}, vision, rope, pixels)
    torch.manual_seed(0)
    model = QWEN_FAMILIES[model_type][1](config)
    save(model, processor, out_dir, processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id)


def build_idefics3(out_dir):
    # SmolVLM-Instruct's tokenizer: eos <end_of_utterance> ends a turn, pad <|im_end|>
    extra = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
             "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}  # fmt: skip
    tokenizer = train_tokenizer(VOCAB_SIZE, tokenizer_corpus(), IDEFICS3_SPECIAL_TOKENS, "<end_of_utterance>", "<|im_end|>", extra)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ["<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<image>"]}
    config = Idefics3Config(
        text_config=dict(model_type="llama", **TEXT, vocab_size=len(tokenizer), bos_token_id=ids["<|im_start|>"],
                         eos_token_id=ids["<end_of_utterance>"], pad_token_id=ids["<|im_end|>"]),
        # SigLIP at 32 px with 8-px patches: 16 patches per crop, pixel shuffle by 2 → 4 image tokens per crop
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        scale_factor=2, image_token_id=ids["<image>"], pad_token_id=ids["<|im_end|>"],
    )  # fmt: skip
    # longest edge resized to 64 px, then split into 32-px crops (up to 2x2) plus the whole image at 32x32
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                                image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])  # fmt: skip
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    torch.manual_seed(0)
    save(Idefics3ForConditionalGeneration(config), processor, out_dir, ids["<end_of_utterance>"], ids["<|im_end|>"])


def build(family: str, out_dir: str):
    build_idefics3(out_dir) if family == "idefics3" else build_qwen(out_dir, family)
