"""The embedded tiny VLM's cache: a build that is interrupted, or was killed, leaves no folder behind."""

import os
import signal
import subprocess
import sys
import time

from common.tiny_vlm import remove_stale_builds


def test_ctrl_c_during_the_build_leaves_nothing_in_the_cache(repo_root, tmp_path):
    cache = tmp_path / "cache"
    code = "from common.tiny_vlm import tiny_model_dir; tiny_model_dir('counting')"
    env = {**os.environ, "VLRL_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    # SIGINT as a terminal delivers it: a suite run in the background (`pytest &`) ignores SIGINT, and so would the child
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    build = subprocess.Popen([sys.executable, "-u", "-c", code], cwd=repo_root, env=env, stdout=subprocess.PIPE, text=True,
                             preexec_fn=default_sigint)  # fmt: skip
    try:
        assert "building the embedded tiny VLM" in build.stdout.readline()
        deadline = time.time() + 120
        while not (cache.exists() and any(".tmp" in p for p in os.listdir(cache))):  # the half-built model is there
            assert time.time() < deadline and build.poll() is None, "the build never wrote its folder"
            time.sleep(0.2)
        time.sleep(1)  # into the warm start
        build.send_signal(signal.SIGINT)
        assert build.wait(timeout=60) != 0  # KeyboardInterrupt
    finally:
        build.kill()
    assert os.listdir(cache) == []


def test_a_build_folder_whose_process_is_gone_is_removed(tmp_path):
    path = tmp_path / "tiny-qwen2-vl-counting-0123456789"
    dead_pid = 2**22 + 1  # above Linux's pid_max (4194304 at most): no process has it
    for folder in (f"{path}.tmp{dead_pid}", f"{path}.tmp{os.getpid()}", f"{tmp_path}/other.tmp{dead_pid}"):
        os.makedirs(os.path.join(folder, "sub"))
    remove_stale_builds(str(path))
    # the running build (this process) and another model's folder stay
    assert sorted(os.listdir(tmp_path)) == sorted([f"{path.name}.tmp{os.getpid()}", f"other.tmp{dead_pid}"])


def test_building_the_model_leaves_the_callers_random_state_as_it_was(tmp_path, monkeypatch):
    """A first run (which builds the model) must sample what the same run does with the model cached."""
    import random

    import torch

    from common import tiny_vlm

    monkeypatch.setenv("VLRL_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_vlm, "warm_start", lambda *args, **kwargs: torch.manual_seed(0))  # seeds, as the real one
    torch.manual_seed(1)
    random.seed(1)
    before = torch.get_rng_state(), random.getstate()
    tiny_vlm.tiny_model_dir("counting")  # builds: random init under its own seed, then the warm start
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
