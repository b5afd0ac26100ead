"""Shared fixtures: the repo root on sys.path (so `import common` works), a randomly initialised tiny Qwen2-VL
saved to disk once per session, and the algorithm scripts algos/*_vlm.py as modules (algos/ is not a package):
`script` is each of them in turn, so a new script is run by the smoke and CLI tests as soon as it exists;
`end_to_end_script` is GRPO and every script that changes one of GRPO's `# TRY NOT TO MODIFY` blocks, for the slow
tests of what those blocks do (every family, signals, resume, hub ids); `grpo` is algos/grpo_vlm.py alone, for the
tests of GRPO's own math and flags."""

import atexit
import dataclasses
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

# One thread per process, this one and every script, torchrun and vLLM process it starts (they inherit it): the tiny
# models gain nothing from a second thread, and two processes of two threads each on a 2-core machine spin against
# each other (a step measured 0.5 s alone, 19 s so). Set before torch is imported, which reads it then.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

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
from common.vlm import build_prompts, generate, load_vlm  # noqa: E402

SCRIPTS = sorted((REPO_ROOT / "algos").glob("*_vlm.py"))
TEMPLATE = REPO_ROOT / "algos" / "grpo_vlm.py"


SHARED, ALGO = "# TRY NOT TO MODIFY", "# ALGO LOGIC"  # CleanRL's markers: what a new algorithm keeps, what it changes


def marked_blocks(path: Path, marker: str) -> list[list[tuple[int, str]]]:
    """The script's blocks that start with `marker` (SHARED or ALGO), each as its (line number, line) pairs: the marker
    line and every line after it up to the next marker (either one) or the first line indented less than the marker
    (the end of the enclosing code block)."""
    blocks, current, indent = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped, depth = line.lstrip(), len(line) - len(line.lstrip())
        if stripped.startswith((SHARED, ALGO)) or (current is not None and stripped and depth < indent):
            if current is not None:
                blocks.append(current)
            current, indent = ([(number, line)], depth) if stripped.startswith(marker) else (None, 0)
        elif current is not None:
            current.append((number, line))
    return blocks + ([current] if current is not None else [])


def shared_blocks(path: Path) -> list[str]:
    """The script's `# TRY NOT TO MODIFY` blocks (what a new algorithm leaves as the template has it), each as its
    text (marked_blocks)."""
    return ["\n".join(line for _, line in block).rstrip() for block in marked_blocks(path, SHARED)]


# GRPO's slow end-to-end tests (every model family through vLLM, signals, SIGKILL and resume, hub ids, the other
# tasks) test what its TRY NOT TO MODIFY blocks do. A script with the same blocks, verbatim, runs the same code
# there, so it runs only the quick tests (smoke, flags, --help); a script that changes a block runs them all.
END_TO_END_SCRIPTS = [path for path in SCRIPTS if path == TEMPLATE or shared_blocks(path) != shared_blocks(TEMPLATE)]


def load_script(path: Path) -> ModuleType:
    """algos/<name>.py as the module <name> (its `__main__` guard makes importing it side-effect free), once. It is
    registered in sys.modules: tyro reads the Args docstrings from the source through it (--help)."""
    if path.stem not in sys.modules:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    return sys.modules[path.stem]


@dataclasses.dataclass(frozen=True)
class Script:
    """One algorithm script: `path` as a user types it (algos/grpo_vlm.py), `module` the file imported."""

    path: str
    module: ModuleType

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def optional(self, *flags: str) -> list[str]:
        """`flags` if the script takes the first of them, else none: for an algorithm's own flag (GRPO's --group-size
        2 keeps a test's budget tiny) in a test that every script runs."""
        field = flags[0].removeprefix("--no-").removeprefix("--").replace("-", "_")
        return list(flags) if field in {f.name for f in dataclasses.fields(self.module.Args)} else []


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


@pytest.fixture(scope="session", params=SCRIPTS, ids=[path.stem for path in SCRIPTS])
def script(request) -> Script:
    """Each algos/*_vlm.py in turn (test ids: [grpo_vlm], ...)."""
    return Script(str(request.param.relative_to(REPO_ROOT)), load_script(request.param))


@pytest.fixture(scope="session", params=END_TO_END_SCRIPTS, ids=[path.stem for path in END_TO_END_SCRIPTS])
def end_to_end_script(request) -> Script:
    """GRPO, and each script whose TRY NOT TO MODIFY blocks are not GRPO's (END_TO_END_SCRIPTS)."""
    return Script(str(request.param.relative_to(REPO_ROOT)), load_script(request.param))


@pytest.fixture(scope="session")
def grpo() -> ModuleType:
    """algos/grpo_vlm.py as a module: GRPO's pure functions, and runs that use GRPO's own flags."""
    return load_script(REPO_ROOT / "algos" / "grpo_vlm.py")


@pytest.fixture(scope="session")
def make_prompts(tiny_vlm):
    """make_prompts(questions, first=0): a left-padded prompt batch of the held-out counting images first,
    first + 1, ..., one per question. Different question lengths → different amounts of left padding."""

    def make(questions, first=0, max_prompt_tokens=512, processor=tiny_vlm[1]):
        images = [e.image for e in tasks.load_task("counting", "eval", first + len(questions))[first:]]
        return build_prompts(processor, images, questions, max_prompt_tokens)

    return make


@pytest.fixture(scope="session")
def sample_with_scores():
    """sample_with_scores(model, processor, prompts, G, max_new_tokens, temperature): common.vlm.generate's sampled
    responses (B*G, T), as the trainer samples them, and the processed logits HF sampled each token from (B*G, T, V),
    recorded by asking `generate` for its scores. Whatever settings common.vlm.generate passes, log_softmax of these
    scores is the distribution the tokens were drawn from."""

    def sample(model, processor, prompts, num_samples, max_new_tokens, temperature):
        recorded, generate_as_configured = {}, model.generate

        def generate_with_scores(**kwargs):
            out = generate_as_configured(**kwargs, output_scores=True, return_dict_in_generate=True)
            recorded["scores"] = torch.stack(out.scores, dim=1).float()
            return out.sequences

        model.generate = generate_with_scores
        try:
            responses = generate(model, processor, prompts, num_samples, max_new_tokens, temperature, greedy=False)
        finally:
            del model.generate  # the class's method again
        return responses, recorded["scores"]

    return sample


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from a second thread, and loses much on a busy CPU
    yield
    torch.set_num_threads(threads)


TOOL_CALL = "<tool>zoom(2)</tool>"  # what force_tool_call makes an episode's first turn


@pytest.fixture
def force_tool_call(monkeypatch):
    """force_tool_call(processor, engine=None): from now on, every episode's first turn (common/agent.py) is
    TOOL_CALL + the end-of-turn token, as if sampled (a random tiny model never calls a tool by itself); later turns
    are sampled as usual, by HF generate or by `engine`. Returns the list of (context, returned ids) of every turn, in
    order. A first turn is one whose context holds one image per episode (the zoom tool adds an image per call)."""
    import common.agent

    def install(processor, engine=None):
        calls, call_ids = [], processor.tokenizer(TOOL_CALL + processor.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        real = engine.generate if engine is not None else common.agent.generate

        def generate_turn(*args):
            context = args[1] if engine is not None else args[2]
            ids = real(*args)
            if len(context["image_grid_thw"]) == len(context["input_ids"]):
                ids = torch.tensor([call_ids] * len(context["input_ids"]), device=ids.device)
            calls.append((context, ids))
            return ids

        if engine is not None:
            monkeypatch.setattr(engine, "generate", generate_turn)
        else:
            monkeypatch.setattr(common.agent, "generate", generate_turn)
        return calls

    return install


# The quick tier, `pytest -m "not slow"` (README): every algorithm's math, the tasks and rewards, the in-process
# steps, and one smoke run of every script; `slow` are the tests that start model families, torchrun, vLLM or the
# end-to-end runs of the template's shared blocks, and CI runs them too (plain `pytest`).
SLOW_MODULES = {"test_dist", "test_families", "test_rollout", "test_loading", "test_benchmarks", "test_startup"}


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLOW_MODULES or "end_to_end_script" in item.fixturenames or item.get_closest_marker("slow_test"):
            item.add_marker(pytest.mark.slow)
