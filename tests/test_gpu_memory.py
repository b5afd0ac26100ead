"""benchmarks/gpu_memory.py at tiny size on the CPU: every recipe runs the GRPO step and reports predicted and
measured rows of the same shape, and where the arithmetic is exact (the bytes of tensors that exist) it equals
what is measured. The full sizes need a GPU: docs/memory.md has the measured table and the command."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_memory  # noqa: E402

MiB = 2**20


@pytest.fixture(scope="module")
def results():
    return gpu_memory.main(gpu_memory.Args(size="tiny", recipes=tuple(gpu_memory.RECIPES)))


def test_every_recipe_reports_predicted_and_measured_rows(results, capsys):
    assert [r["recipe"] for r in results] == list(gpu_memory.RECIPES)
    for r in results:
        assert set(r["measured"]["parts"]) >= {"weights", "gradients", "optimizer state", "reference model"}
        assert set(r["predicted"]) >= set(r["measured"]["parts"]) - {"rollout engine", "reward model"}  # neither in this step
        assert 0 < r["measured"]["response tokens"] <= r["B"] * r["G"] * r["max_new_tokens"]
        assert r["measured"]["rollout s"] > 0 and r["measured"]["training s"] >= r["measured"]["optimizer step s"] >= 0
        assert r["predicted"]["kv cache"] > 0 and r["predicted"]["activations"] > 0
    table = gpu_memory.report(results, "MiB")
    assert table.count("\n| 4b-full-offload |") == 2  # one row in each table
    assert len({row.count("|") for row in table.split("\n\n")[0].splitlines()}) == 1  # every row has every column


def test_exact_parts_match_the_tensors(results):
    """Weights, gradients and the reference are tensors whose bytes the arithmetic knows exactly (bf16 weights,
    fp32 LoRA adapters); so is torch AdamW's state (two moments like each trainable weight)."""
    for r in results:
        predicted, measured = r["predicted"], r["measured"]["parts"]
        for part in ("weights", "gradients", "reference model"):
            assert predicted[part] == measured[part], (r["recipe"], part, predicted[part] / MiB, measured[part] / MiB)
        if r["flags"]["optimizer"] == "adamw":
            assert predicted["optimizer state"] == measured["optimizer state"], r["recipe"]
        assert (measured["reference model"] > 0) == (r["flags"]["beta"] > 0 and not r["flags"]["lora"])


def test_unknown_recipe_is_refused_with_the_choices():
    with pytest.raises(SystemExit, match="--recipes 4b: choose from 4b-full-offload"):
        gpu_memory.main(gpu_memory.Args(size="tiny", recipes=("4b",)))


def test_a_recipe_out_of_memory_is_reported_and_the_next_one_runs(monkeypatch, capsys):
    run_recipe = gpu_memory.run_recipe

    def failing_first(name, args, device):
        if name == "4b-full-offload":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run_recipe(name, args, device)

    monkeypatch.setattr(gpu_memory, "run_recipe", failing_first)
    results = gpu_memory.main(gpu_memory.Args(size="tiny", recipes=("4b-full-offload", "4b-lora-kl")))
    assert results[0]["out of memory"] == "CUDA out of memory" and "measured" in results[1]
    assert "| 4b-full-offload | Qwen3-VL-4B | out of memory: CUDA out of memory |" in capsys.readouterr().out
