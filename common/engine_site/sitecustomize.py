"""Start-up code for vLLM's engine process, put on its PYTHONPATH by common/rollout.py (engine-process mode).

vLLM starts its engine process with `spawn` on CPU, so that process does not inherit what `common/__init__.py`
did in the trainer: hide a torchvision (and torchaudio, torchcodec) that is installed but cannot load. Its first
`import vllm` would reach transformers' image utilities, which import a CUDA-only torchvision and crash. Python
runs `sitecustomize` at start-up, before anything else, so importing `common` here applies the same fix first.
"""

import importlib.machinery
import importlib.util
import os
import sys

import common  # noqa: F401  (the repo root is on PYTHONPATH too)

# then run the Python installation's own sitecustomize, if it has one (e.g. Debian's), which this one shadows
here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [p for p in sys.path if os.path.abspath(p) != here])
if spec is not None:
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
