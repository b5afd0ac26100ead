"""Every process the trainer starts treats a CUDA-only torchvision (torchaudio, torchcodec) as absent, vLLM's helper
processes included (common/startup/sitecustomize.py), with vLLM's cache empty as on a new machine."""

import os
import subprocess
import sys

import pytest

import common

BROKEN_HERE = [name for name in ("torchvision", "torchaudio", "torchcodec") if name in sys.modules and sys.modules[name] is None]


def run_python(code: str, repo_root, **env):
    return subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


def test_a_child_process_hides_what_this_process_hid_without_importing_common(repo_root):
    if not BROKEN_HERE:
        pytest.skip("torchvision, torchaudio and torchcodec import here (or are not installed): nothing is hidden")
    # how transformers decides that a package is there; the child never imports common
    code = f"import importlib.util; print('found:', importlib.util.find_spec({BROKEN_HERE[0]!r}) is not None)"
    result = run_python(code, "/")  # not the repo root: `common` is not importable there
    assert result.returncode == 0 and "found: False" in result.stdout, result.stderr[-2000:]
    assert common.STARTUP_DIR in os.environ["PYTHONPATH"].split(os.pathsep)


def test_datasets_imported_before_common_still_builds_an_image_column(repo_root):
    if "torchcodec" not in BROKEN_HERE:
        pytest.skip("torchcodec imports here (or is not installed): datasets never tries a hidden one")
    # once "No module named 'torchcodec.decoders'": datasets had found torchcodec before common hid it
    code = (
        "import datasets, common\n"
        "from PIL import Image\n"
        "features = datasets.Features({'image': datasets.Image()})\n"
        "rows = datasets.Dataset.from_dict({'image': [Image.new('RGB', (4, 4))]}, features=features)\n"
        "print('size:', rows[0]['image'].size)\n"
    )
    result = run_python(code, repo_root, PYTHONPATH="")  # as a user's own script starts: no start-up file yet
    assert result.returncode == 0 and "size: (4, 4)" in result.stdout, result.stderr[-2000:]


def test_vllm_inspects_a_model_class_in_its_helper_process_with_an_empty_cache(repo_root, tmp_path):
    """vLLM answers 'what can this model class do' in a fresh `python -m vllm.model_executor.models.registry` unless
    $VLLM_CACHE_ROOT/modelinfos holds the answer; on a new machine it does not. The architecture is the one the engine
    runs the Qwen-VLs with here (vLLM's Transformers backend)."""
    code = (
        "import common\n"
        "from vllm.model_executor.models.registry import ModelRegistry\n"
        "info = ModelRegistry._try_inspect_model_cls('TransformersMultiModalForCausalLM')\n"
        "print('multimodal:', info is not None and info.supports_multimodal)\n"
    )
    result = run_python(code, repo_root, VLLM_CACHE_ROOT=str(tmp_path))
    assert result.returncode == 0 and "multimodal: True" in result.stdout, result.stderr[-3000:]
    assert list((tmp_path / "modelinfos").glob("*.json")), "the answer did not come from vLLM's helper process"


def test_without_the_start_up_file_vllm_fails_with_a_line_that_names_the_fix(repo_root, tiny_model_dir, tmp_path):
    if not BROKEN_HERE:
        pytest.skip("no CUDA-only torchvision here: vLLM's helper process does not need the start-up file")
    code = (
        "import os, torch, common\n"
        "os.environ['PYTHONPATH'] = ''  # as if the start-up folder were dropped after `import common`\n"
        "from common.rollout import VLLMRollout\n"
        "from common.vlm import load_processor\n"
        f"VLLMRollout({tiny_model_dir!r}, load_processor({tiny_model_dir!r}), torch.float32, seed=0, max_model_len=256)\n"
    )
    result = run_python(code, repo_root, VLLM_CACHE_ROOT=str(tmp_path))
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "failed" not in last and "pip uninstall torchvision" in last and "PYTHONPATH" in last, last
