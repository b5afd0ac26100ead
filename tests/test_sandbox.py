"""common/sandbox.py: each test is an attack by model-written code that the sandbox must contain (and that would
succeed without it). Skipped, with the reason, where bubblewrap cannot run (CI installs it)."""

import io
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import REPO_ROOT
from PIL import Image

from common.sandbox import MAX_PROCESSES, SANDBOX_UID, available, run_python

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


def processes_named(name: str) -> set[int]:
    """PIDs of the processes whose name (/proc/PID/comm) is `name`, in any PID namespace below ours."""
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/comm") as comm:
                if comm.read().strip() == name:
                    found.add(int(entry))
        except OSError:  # exited meanwhile
            pass
    return found


def outcome(statement: str) -> str:
    """Model code that prints 'ok' if `statement` runs, else the exception's name."""
    return f"""
try:
    {statement}
    print("ok")
except Exception as error:
    print(type(error).__name__)
"""


def test_reads_input_png_prints_and_returns_output_png():
    png = io.BytesIO()
    Image.new("RGB", (4, 3), "red").save(png, format="PNG")
    code = """
from PIL import Image
image = Image.open("input.png")
print(image.size, image.getpixel((0, 0)))
image.rotate(90, expand=True).save("output.png")
"""
    result = run_python(code, files={"input.png": png.getvalue()}, returned=("output.png", "input.png"))
    assert (result.returncode, result.timed_out, result.stderr) == (0, False, "")
    assert result.stdout == "(4, 3) (255, 0, 0)\n"
    assert set(result.files) == {"output.png"}  # the unchanged input is not sent back
    assert Image.open(io.BytesIO(result.files["output.png"])).size == (3, 4)


def test_code_runs_in_another_process_as_another_user():
    result = run_python("import os; print(os.getpid(), os.getuid())")
    pid, uid = map(int, result.stdout.split())
    assert pid != os.getpid()
    assert uid == (SANDBOX_UID if os.getuid() == 0 else os.getuid())


def test_fork_loop_is_contained_and_leaves_no_process():
    name = f"fork-loop-{os.getpid()}"[:15]  # every fork inherits this name, so the test can find survivors
    code = f"""
import ctypes, os, time
ctypes.CDLL(None).prctl(15, b"{name}", 0, 0, 0)  # PR_SET_NAME
forks = 0
try:
    while True:
        if os.fork() == 0:  # each child forks on forever
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
        forks += 1
except OSError:
    print(forks, flush=True)  # the first fork refused
time.sleep(60)
"""
    start = time.monotonic()
    result = run_python(code, timeout=2)
    assert time.monotonic() - start < 2 + 4 and result.timed_out
    assert 0 < int(result.stdout) < MAX_PROCESSES  # the process limit held
    assert not processes_named(name), "sandbox processes survived"
    assert run_python("print('after')").stdout == "after\n"  # and the machine still forks


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run_python("while True: pass", timeout=1)
    assert result.timed_out and result.returncode != 0
    assert time.monotonic() - start < 3


def test_allocating_1_gib_fails_and_the_trainer_keeps_its_limits():
    kinds = (resource.RLIMIT_AS, resource.RLIMIT_NPROC, resource.RLIMIT_FSIZE, resource.RLIMIT_CPU)
    limits = [resource.getrlimit(kind) for kind in kinds]
    result = run_python("x = bytearray(1 << 30)\nprint('allocated')", memory_bytes=512 << 20)
    assert result.returncode != 0 and "MemoryError" in result.stderr and "allocated" not in result.stdout
    assert [resource.getrlimit(kind) for kind in kinds] == limits  # the limits were set in the sandbox, not here


def test_output_flood_is_capped():
    start = time.monotonic()
    result = run_python("while True: print('x' * 10000)", timeout=2, max_output=1000)
    assert time.monotonic() - start < 4
    assert result.stdout.startswith("x" * 1000) and "truncated" in result.stdout
    assert len(result.stdout) < 1100


def test_network_cannot_reach_the_host():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = run_python(outcome(f"__import__('socket').create_connection(('127.0.0.1', {port}), timeout=2)"))
        assert result.stdout.strip() in ("ConnectionRefusedError", "TimeoutError", "OSError"), result
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody connected
            server.accept()
    assert run_python("import socket; print([name for _, name in socket.if_nameindex()])").stdout == "['lo']\n"


def test_filesystem_is_read_only_private_and_removed(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the sandbox's host dirs go here, to be checked
    host_tmp_name = f"/tmp/vlrl-sandbox-escape-{os.getpid()}"
    attempts = [
        "open('/usr/x', 'w')",
        "open('/x', 'w')",
        "open('/dev/shm/x', 'w')",
        f"open({os.path.join(sys.prefix, 'x')!r}, 'w')",  # the venv
        f"open({os.path.abspath(__file__)!r}).read()",  # this test: the repo is not there
    ]
    code = "".join(outcome(statement) for statement in attempts)
    code += f"open({host_tmp_name!r}, 'w').write('x')\nimport os, json\n"
    code += "try:\n    print(json.dumps(os.listdir('/root')))\nexcept OSError as error:\n    print('[]')\n"
    result = run_python(code)
    *failures, root_listing = result.stdout.splitlines()
    assert all(failure != "ok" for failure in failures) and len(failures) == len(attempts), result
    assert not os.path.exists(host_tmp_name)  # its /tmp is its own
    python_dirs = {sys.prefix, sys.base_prefix, os.path.realpath(sys.executable)}
    for entry in json.loads(root_listing):  # only the way down to a Python install under /root, nothing else of it
        assert any(path.startswith(f"/root/{entry}/") for path in python_dirs), entry
    assert os.listdir(tmp_path) == []  # work dir removed


def test_a_symlink_left_in_the_work_dir_does_not_read_a_host_file():
    result = run_python(f"import os; os.symlink({os.path.abspath(__file__)!r}, 'output.txt')", returned=("output.txt",))
    assert result.returncode == 0 and result.files == {}


def test_only_the_returned_files_are_read_so_written_files_cannot_fill_the_trainers_memory(tmp_path):
    # 40 sparse files at the per-file cap (almost no disk) and an output.png: reading every written file, as the tool
    # once did, took 640 MiB into the calling process (2,000 files OOM-killed a 24 GB trainer); it reads output.png
    code = "for i in range(40):\n    open(f'f{i}', 'wb').truncate(16 << 20)\nopen('output.png', 'wb').write(b'png')"
    caller = (f"import resource, sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from common.sandbox import run_python\n"
              "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"before = peak(); result = run_python({code!r}, returned=('output.png',))\n"
              "print(sorted(result.files), result.files['output.png'], peak() - before)")
    out = subprocess.run([sys.executable, "-c", caller], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    files, content, growth_kib = out.stdout.rsplit(" ", 2) if out.returncode == 0 else (out.stderr, "", "0")
    assert files == "['output.png']" and content == "b'png'", out.stdout + out.stderr
    assert int(growth_kib) < 64 << 10, growth_kib  # the peak RSS grows by KiB; reading the files would add 640 MiB


@pytest.mark.parametrize("code, returncode", [("import sys; sys.exit(3)", 3), ("import os; os._exit(0)", 0),
                                              ("raise ValueError('from the model')", 1)])
def test_exits_and_exceptions_come_back_as_a_return_code(code, returncode):
    result = run_python(code)
    assert (result.returncode, result.timed_out) == (returncode, False)
    assert ("ValueError: from the model" in result.stderr) == (returncode == 1)
