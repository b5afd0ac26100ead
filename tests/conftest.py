"""Shared fixtures: the repo root on sys.path (so `import common` works), a randomly initialised tiny Qwen2-VL
saved to disk once per session, and the pure functions of algos/grpo_vlm.py (algos/ is not a package)."""

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# The suite runs as on a new machine even on a warm one: vLLM's cache (its `modelinfos` once hid a bug that failed
# every fresh machine), Hugging Face's and ours start empty, in a folder of their own. Set before anything imports
# vLLM or huggingface_hub, which read these variables at import.
_CACHES = tempfile.mkdtemp(prefix="vlrl-test-caches-")
atexit.register(shutil.rmtree, _CACHES, ignore_errors=True)
for _variable in ("VLLM_CACHE_ROOT", "HF_HOME", "VLRL_CACHE"):
    os.environ[_variable] = os.path.join(_CACHES, _variable.lower())

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from common import tasks  # noqa: E402
from common.tiny_vlm import build_random_tiny_vlm  # noqa: E402
from common.vlm import build_prompts, load_vlm  # noqa: E402


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random tiny Qwen2-VL checkpoint (tokenizer, processor, weights); no warm start, so it is fast."""
    path = tmp_path_factory.mktemp("tiny-random-vlm")
    build_random_tiny_vlm(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_vlm(tiny_model_dir):
    """(model in eval mode, processor) loaded from `tiny_model_dir` the way the scripts load a checkpoint."""
    model, processor = load_vlm(tiny_model_dir)
    return model.eval(), processor


@pytest.fixture(scope="session")
def grpo():
    """algos/grpo_vlm.py as a module (its `__main__` guard makes importing it side-effect free)."""
    spec = importlib.util.spec_from_file_location("grpo_vlm", REPO_ROOT / "algos" / "grpo_vlm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def make_prompts(tiny_vlm):
    """make_prompts(questions, first=0): a left-padded prompt batch of the held-out counting images first,
    first + 1, ..., one per question. Different question lengths → different amounts of left padding."""

    def make(questions, first=0, max_prompt_tokens=512, processor=tiny_vlm[1]):
        images = [e.image for e in tasks.load_task("counting", "eval", first + len(questions))[first:]]
        return build_prompts(processor, images, questions, max_prompt_tokens)

    return make
