"""Run model-written Python (the MAT-Coding code tool) in a throwaway sandbox: bubblewrap plus resource limits.

    result = run_python("from PIL import Image; Image.open('input.png').rotate(90).save('output.png')",
                        files={"input.png": png_bytes}, returned=("output.png",))
    result.stdout, result.stderr, result.returncode, result.timed_out, result.files["output.png"]

The code runs in a new process of this interpreter (PIL and numpy import), in a fresh work dir (`/sandbox`, holding
`files`; removed afterwards), with a private /tmp and read-only /usr and Python installs. Nothing else of the host
is there: no /root, no home, no repo. It cannot
- reach the network: its own network namespace has only `lo` (the host's 127.0.0.1 is not on it);
- see, signal or outlive other processes: its own PID namespace; on timeout we SIGKILL the namespace's init, and the
  kernel kills the rest with it before bwrap exits (and `--die-with-parent` if the trainer dies);
- exceed its limits (prlimit): address space `memory_bytes`, CPU seconds, MAX_PROCESSES processes and threads (a fork
  loop stops there), MAX_FILE_BYTES per file (stdout and stderr go to files too, so a print flood stops there),
  MAX_OPEN_FILES descriptors; and the wall clock, `timeout`;
- act as root: bwrap run by root makes no user namespace (so the binds are done as root, which can read a venv
  under a 0700 dir), then `setpriv` makes the code uid/gid 65534 without capabilities, because RLIMIT_NPROC does not
  bind root. Run by another user, bwrap makes a user namespace and the code keeps that user's uid; the kernel then
  counts RLIMIT_NPROC per user namespace (Linux >= 5.14), so the user's other processes do not count. Either way
  no_new_privs is set: setuid programs gain nothing.
Not contained (no cgroup): memory and disk in total. Limits are per process and per file, so a fork loop can hold
MAX_PROCESSES x memory_bytes (16 GiB by default) until the timeout, and the work dir can fill at disk speed. As root,
MAX_PROCESSES counts every uid-65534 process on the machine: concurrent calls share it.

About 0.03 s a call (0.02-0.06 s on a busy 2-core machine, where Python alone starts in 0.01 s); measure with
    python -m timeit -s "from common.sandbox import run_python" "run_python('print(1)')"
"""

import dataclasses
import functools
import math
import os
import pathlib
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

WORK_DIR = "/sandbox"  # the code's cwd inside the sandbox
SANDBOX_UID = 65534  # "nobody": the code's uid when the trainer is root
MAX_PROCESSES = 32  # image code needs one; a fork loop then holds at most 32 x memory_bytes
MAX_OPEN_FILES = 64
MAX_FILE_BYTES = 16 << 20  # per file written, stdout and stderr included; also the cap on a returned file


@dataclasses.dataclass
class SandboxResult:
    stdout: str
    stderr: str
    returncode: int  # the code's exit status; 128 + N if signal N ended it (137 after a timeout)
    timed_out: bool
    files: dict[str, bytes]  # the `returned` files the code created or changed (regular files, within the caps)


def _mounts(host_work_dir: str) -> list[str]:
    """bwrap's filesystem: an empty tmpfs root, then read-only system and Python dirs, then the work dir."""
    args = ["--tmpfs", "/", "--ro-bind", "/usr", "/usr", "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):  # symlinks into /usr on a merged-/usr system
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(MAX_FILE_BYTES), "--tmpfs", "/tmp"]
    bound = ["/usr"]
    for path in sorted({sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}):
        if any(path == done or path.startswith(done + "/") for done in bound):
            continue
        for parent in reversed(pathlib.Path(path).parents[:-1]):  # bwrap would make them 0700: closed to uid 65534
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", path, path]
        bound.append(path)
    return args + ["--bind", host_work_dir, WORK_DIR, "--chdir", WORK_DIR, "--remount-ro", "/dev", "--remount-ro", "/"]


def _command(host_work_dir: str, timeout: float, memory_bytes: int) -> list[str]:
    as_root = os.geteuid() == 0
    namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # threads count against MAX_PROCESSES
    bwrap = ["bwrap", *(namespaces if as_root else ["--unshare-all"]), "--die-with-parent", "--new-session",
             "--clearenv", *[a for name, value in env.items() for a in ("--setenv", name, value)],
             *_mounts(host_work_dir), "--"]
    limits = ["prlimit", f"--as={memory_bytes}", f"--cpu={math.ceil(timeout) + 1}", f"--nproc={MAX_PROCESSES}",
              f"--fsize={MAX_FILE_BYTES}", f"--nofile={MAX_OPEN_FILES}", "--core=0", "--"]
    drop_root = ["setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--"] if as_root else []
    return bwrap + limits + drop_root + [sys.executable, "-I", "-"]  # -I: no PYTHON* variables, no user site


@functools.cache
def available() -> str | None:
    """None if run_python works here, else why not, in one line (tests skip with it)."""
    if shutil.which("bwrap") is None:
        return "install bubblewrap (apt-get install bubblewrap)"
    if shutil.which("prlimit") is None or shutil.which("setpriv") is None:
        return "install util-linux (prlimit, setpriv)"
    with tempfile.TemporaryDirectory(prefix="vlrl-sandbox-check-") as work_dir:
        os.chmod(work_dir, 0o777)
        check = subprocess.run(_command(work_dir, 5, 512 << 20), input=b"print('ok')", capture_output=True, check=False)
    if check.stdout != b"ok\n":
        why = (check.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {check.returncode}"])[-1]
        return f"bubblewrap cannot start a sandbox here (user namespaces disabled?): {why}"
    return None


def _read_capped(path: str, max_chars: int) -> str:
    with open(path, "rb") as f:
        head, size = f.read(4 * max_chars), os.fstat(f.fileno()).st_size
    text = head.decode(errors="replace")
    if len(text) > max_chars or size > len(head):
        text = text[:max_chars] + f"\n[... truncated: {size} bytes in all]"
    return text


def _returned_files(work_dir: str, names, inputs: dict[str, bytes]) -> dict[str, bytes]:
    """The files `names` the code left in the work dir, if regular, changed and at most MAX_FILE_BYTES each. Only
    these are read: the trainer's memory grows by len(names) x MAX_FILE_BYTES at most, whatever else the code writes
    (sparse files cost it no disk). Symlinks are not followed, so a link to a host file the trainer may read
    (/root/...) returns nothing."""
    returned = {}
    for name in names:
        try:
            fd = os.open(os.path.join(work_dir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode) and info.st_size <= MAX_FILE_BYTES:
                content = f.read(MAX_FILE_BYTES)
                if inputs.get(name) != content:
                    returned[name] = content
    return returned


def _kill(bwrap: subprocess.Popen) -> None:
    """SIGKILL the sandbox's init, bwrap's one child: the kernel kills every process in its PID namespace with it, and
    bwrap exits once they are all gone, so none outlives run_python. Failing that (no init yet, or still dying after
    5 s on a starved machine), bwrap's process group: --die-with-parent takes the sandbox down, a moment later."""
    try:
        with open(f"/proc/{bwrap.pid}/task/{bwrap.pid}/children") as children:
            os.kill(int(children.read().split()[0]), signal.SIGKILL)
        bwrap.wait(timeout=5)
    except (OSError, IndexError, subprocess.TimeoutExpired):
        os.killpg(bwrap.pid, signal.SIGKILL)


def run_python(code: str, files: dict[str, bytes] | None = None, timeout: float = 5.0, memory_bytes: int = 512 << 20,
               max_output: int = 8192, returned: tuple[str, ...] = ()) -> SandboxResult:
    """Run `code` in a fresh sandbox with `files` in its cwd; return its output, exit status and those of the files
    named in `returned` that it wrote (nothing else it writes is read)."""
    if (reason := available()) is not None:
        raise RuntimeError(f"the code sandbox is unavailable: {reason}")
    files = files or {}
    with tempfile.TemporaryDirectory(prefix="vlrl-sandbox-") as host_dir:
        work_dir = os.path.join(host_dir, "work")  # only this is visible inside; code and output files are not
        os.mkdir(work_dir, 0o700)
        for name, content in files.items():
            with open(os.path.join(work_dir, name), "wb") as f:
                f.write(content)
        if os.geteuid() == 0:
            for path in [work_dir, *(os.path.join(work_dir, n) for n in os.listdir(work_dir))]:
                os.chown(path, SANDBOX_UID, SANDBOX_UID)
        with open(os.path.join(host_dir, "main.py"), "wb") as f:
            f.write(code.encode())
        paths = [os.path.join(host_dir, n) for n in ("main.py", "stdout", "stderr")]
        with open(paths[0], "rb") as stdin, open(paths[1], "wb") as stdout, open(paths[2], "wb") as stderr:
            process = subprocess.Popen(_command(work_dir, timeout, memory_bytes), stdin=stdin, stdout=stdout,
                                       stderr=stderr, start_new_session=True)
            exited = os.pidfd_open(process.pid)  # readable once bwrap exits; Popen.wait(timeout) polls, +10 ms
            try:
                poller = select.poll()
                poller.register(exited, select.POLLIN)
                timed_out = not poller.poll(timeout * 1000)
            finally:
                os.close(exited)
                if process.poll() is None:  # timed out, or interrupted (Ctrl-C): none of it outlives this call
                    _kill(process)
            returncode = process.wait()
        return SandboxResult(_read_capped(paths[1], max_output), _read_capped(paths[2], max_output), returncode,
                             timed_out, _returned_files(work_dir, returned, files))
