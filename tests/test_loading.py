"""--model as people pass it: a hub id out of the Hugging Face cache (offline), and the one-line errors for an id
that is not cached and for a text-only checkpoint."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from common.vlm import load_processor, load_vlm

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def script(end_to_end_script):
    """The scripts run here: GRPO and each script that changes one of its TRY NOT TO MODIFY blocks (conftest.py)."""
    return end_to_end_script


@pytest.fixture(scope="module")
def hf_home(tiny_model_dir, tmp_path_factory):
    """An HF_HOME whose hub cache holds the tiny checkpoint as `org/name`, laid out as huggingface_hub lays out a
    download: content-addressed blobs, a snapshot folder of symlinks into them, and refs/main naming the snapshot."""
    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / REVISION).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for name in os.listdir(tiny_model_dir):
        blob = hashlib.sha256(open(os.path.join(tiny_model_dir, name), "rb").read()).hexdigest()
        shutil.copy(os.path.join(tiny_model_dir, name), repo / "blobs" / blob)
        os.symlink(f"../../blobs/{blob}", repo / "snapshots" / REVISION / name)
    return home


def run(args, repo_root, hf_home, tmp_path):
    """`python <args>` from the repo root, offline, with this Hugging Face cache (read when huggingface_hub is
    imported, hence a fresh process)."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "VLRL_CACHE": str(tmp_path / "vlrl")}
    return subprocess.run([sys.executable, *args], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)


def test_a_hub_id_loads_from_the_offline_cache(repo_root, hf_home, tiny_model_dir, tmp_path):
    snapshot = hf_home / "hub" / "models--org--name" / "snapshots" / REVISION
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    code = (
        "from common.rollout import transformers_backend_checkpoint; from common.vlm import load_vlm\n"
        "model, processor = load_vlm('org/name')\n"
        "print(type(model).__name__, type(processor).__name__, model.config.text_config.vocab_size)\n"
        f"transformers_backend_checkpoint('org/name', processor, {str(engine_dir)!r})  # vLLM's copy of the files\n"
    )
    out = run(["-c", code], repo_root, hf_home, tmp_path)
    assert out.returncode == 0, out.stderr
    vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))  # the tiny checkpoint's own
    assert out.stdout.splitlines()[-1] == f"Qwen2VLForConditionalGeneration Qwen2VLProcessor {vocab}"
    weights = engine_dir / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (snapshot / "model.safetensors").resolve()


def test_the_script_trains_a_hub_id_from_the_offline_cache(script, repo_root, hf_home, tmp_path):
    args = ["--model", "org/name", "--total-steps", "1", "--eval-size", "4", "--train-size", "8", "--prompts-per-step", "2"]
    args += [*script.optional("--group-size", "2"), "--max-new-tokens", "4", "--output-dir", str(tmp_path / "runs")]
    out = run([script.path, *args], repo_root, hf_home, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]


def test_a_hub_id_missing_from_the_offline_cache_exits_with_one_line_naming_the_download(repo_root, hf_home, tmp_path):
    out = run(["-c", "from common.vlm import load_vlm; load_vlm('org/missing')"], repo_root, hf_home, tmp_path)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "--model 'org/missing': not in the Hugging Face cache and HF_HUB_OFFLINE=1: download it while online "
        "(hf download org/missing) or pass a local dir"
    ]


@pytest.mark.parametrize("path", ["/nonexistent/model", "./model", "runs/run1/model"])
def test_a_path_that_is_not_a_directory_exits_naming_it(path):
    with pytest.raises(SystemExit, match=f"^--model '{path}' is not a directory"):
        load_vlm(path)


@pytest.fixture(scope="module")
def text_only_dir(tiny_model_dir, tmp_path_factory):
    """A tiny random Qwen2ForCausalLM saved with the VLM's tokenizer, whose tokenizer_config.json names the
    Qwen2-VL processor (as a language model cut out of a VLM would)."""
    path = tmp_path_factory.mktemp("text-only")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def text_only_message(path):
    return (
        f"--model '{path}' is a qwen2 checkpoint without a vision encoder: pass a vision-language checkpoint "
        "(README: Models)"
    )


@pytest.mark.parametrize("load", [load_vlm, load_processor])
def test_a_text_only_checkpoint_exits_asking_for_a_vision_language_one(text_only_dir, load):
    with pytest.raises(SystemExit) as exited:
        load(text_only_dir)
    assert str(exited.value) == text_only_message(text_only_dir)


def test_the_script_on_a_text_only_checkpoint_prints_one_line(script, repo_root, hf_home, text_only_dir, tmp_path):
    args = [script.path, "--model", text_only_dir, "--train-size", "16", "--eval-size", "4", "--output-dir", str(tmp_path / "runs")]
    out = run(args, repo_root, hf_home, tmp_path)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [text_only_message(text_only_dir)]


def test_a_checkpoint_without_its_processor_files_exits_with_the_whole_reason(tiny_model_dir, tmp_path):
    shutil.copy(os.path.join(tiny_model_dir, "config.json"), tmp_path)  # a VLM's config, nothing else
    with pytest.raises(SystemExit) as exited:
        load_vlm(str(tmp_path))
    message = str(exited.value)
    assert "\n" not in message and message.startswith(f"could not load --model '{tmp_path}'")
    # transformers' sentence uncut (it is longer than the 160 characters once kept): it names the missing file
    assert f"make sure '{tmp_path}' is the correct path to a directory containing a preprocessor_config.json file" in message
