"""Shared, non-lesson code for the algos/ scripts. Import it before transformers and vLLM.

Importing it runs `common/startup/sitecustomize.py` in this process (a CUDA-only torchvision, torchaudio or torchcodec
that cannot load next to a CPU torch is marked absent; that file says why) and puts that folder first on PYTHONPATH,
so that Python runs the same file at start-up in every process started from here: vLLM's helper, engine and worker
processes, which never import this package.
"""

import os

from common.startup import sitecustomize as _startup

STARTUP_DIR = os.path.dirname(os.path.abspath(_startup.__file__))
_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if STARTUP_DIR not in _paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([STARTUP_DIR, *_paths])
