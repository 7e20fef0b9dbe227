"""The `python` built-in tool: a stateful Jupyter kernel per conversation, each in an OS sandbox.

Harmony's python tool promises "a stateful Jupyter notebook environment": `PythonTool.run(conversation_id,
code)` runs the code in that conversation's kernel (started on first use through `ipykernel`, driven by
`jupyter_client`) and returns the text harmony's tool message carries; `close(conversation_id)` ends it,
and kernels idle for `idle_timeout_s` end by themselves. `python_tool_config()` is the harmony declaration.

    tool = PythonTool()                                   # refuses where no sandbox can be set up
    tool.run("conv-1", "x = 6 * 7")
    tool.run("conv-1", "print(x)")                        # -> "42\\n"
    tool.close("conv-1")

It is a `tools.base.Tool` (name "python"): the server's tool loop awaits `call(ToolCall("python", code,
conversation))`, which runs `run` in a worker thread and returns the text with the Responses item it becomes
(`code_interpreter_call`: the code, the container, the text as its logs). Cancelling that await (the client
went away, the request timed out) interrupts the running cell; the kernel and its state stay.

The sandbox (bubblewrap, `bwrap`, which runs as an ordinary user through user namespaces)
------------------------------------------------------------------------------------------
Each kernel runs in its own user, pid, net, ipc, uts and mount namespaces, as uid 65534 there:

* no network: a new net namespace holds only its own loopback; nothing it binds or connects reaches the
  host's loopback or any other interface, and there is no /sys to look at the host's.
* no view of the server's files: the root is an empty read-only tmpfs holding only /usr (system libraries),
  the Python installation (`sys.base_prefix`, and the virtual environment `sys.prefix`), read-only, a
  private /proc of its own pid namespace and a minimal /dev; /mnt/data (the working directory and HOME, as
  harmony's description says) and /tmp are private tmpfs mounts capped in size (`data_bytes`), gone when the
  kernel ends.
* no environment: the kernel starts from an empty environment (`--clearenv`) plus PATH, HOME, LANG and a
  few directories of its own; no API key or server variable reaches it, and bwrap itself (the sandbox's
  pid 1, whose /proc/1/environ the code can read) is started with none either.
* limits, set inside the sandbox just before `ipykernel` starts (setrlimit): CPU seconds over the kernel's
  life (`cpu_time_s`; past it the kernel is killed and the next call starts a fresh one), address space per
  process (`memory_bytes`: allocating 10 GB raises MemoryError), processes and threads
  (`max_processes`, counted in the sandbox's own user namespace, so a fork bomb meets it without touching
  the server's processes), file size (`max_file_bytes`), no core files. Each call has a wall-clock limit
  (`timeout_s`): past it the kernel is killed (its whole pid namespace) and the next call gets a fresh one.
* output: inside the kernel, a cell that prints past `max_output_chars` (less room for the error) is
  stopped (`OutputLimitExceeded`) and the rest dropped, so 100 MB printed never leaves the sandbox; the
  server keeps at most `max_output_chars` of whatever comes (interrupting the cell past it, should the code
  have removed the kernel's guard) and takes no ZMQ message over 16 MiB.
* identity: uid 65534 in its own user namespace, mapped to the server's user. Run as root, the server
  starts bwrap as `nobody` instead (Linux exempts the host's root from RLIMIT_NPROC whatever the
  namespace), in a private mount namespace of root's where the Python installation is bound somewhere
  nobody may walk (unshare, mount, setpriv: util-linux).

How the server talks to a kernel it cannot reach by network: Jupyter's ZMQ sockets use the `ipc`
transport (Unix sockets) instead of TCP, so no network is involved at all. The kernel binds them in its
own private tmpfs (/run/kernel), which the server reaches through `/proc/<sandbox pid>/root/run/kernel/`
(the sandbox's mount namespace seen from outside: allowed to the sandbox's owner and root, invisible from
any other sandbox, which has its own pid namespace). No host directory is shared with the kernel, writable or not; the connection file (with its
HMAC key) is copied into the sandbox at start (`bwrap --file`). The code can rewrite /run/kernel (a socket
made a symlink to a host socket would be followed from here): the server connects once, before any code
runs, and its ZMQ sockets never reconnect (RECONNECT_IVL -1, no heartbeat channel).

What it does not bound: memory across processes (each process may use `memory_bytes`, and there may be
`max_processes` of them; a cgroup would bound the sum), and the tmpfs mounts (their size counts in the
host's memory). `--die-with-parent` ends a sandbox when the server ends (the kernel's
parent is the tool's own long-lived thread that starts every sandbox: Linux's parent-death signal follows
the thread that forked, so a sandbox started from a short-lived worker thread would die with it).

`sandbox="none"` runs the kernel as a plain child process (the same limits but the process limit, which
would count the server's own processes there; a clean environment; a temporary working directory; ipc
sockets) with no isolation of files or network: for a machine where bwrap cannot run (a container without
user namespaces), chosen explicitly (`serve --python-sandbox none`, once it is wired into serve), and
logged as a warning.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .base import ToolCall, ToolResult

log = logging.getLogger(__name__)

SANDBOXES = ("auto", "bwrap", "none")
DATA_DIR = "/mnt/data"  # the kernel's working directory inside the sandbox (harmony's description names it)
_RUN_DIR = "/run/kernel"  # inside the sandbox: connection file and ipc sockets
_CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_MAX_MESSAGE = 16 << 20
_NO_OUTPUT = "[no output: print() what you want to see]"

# runs inside the sandbox: set the limits, start the kernel, and stop any cell that prints past the cap (so
# that 100 MB printed never travels to the server: the server caps what it collects as well)
_LAUNCH = """\
import resource, sys, threading
for name, value in {limits!r}.items():
    hard = value + 5 if name == "RLIMIT_CPU" else value
    resource.setrlimit(getattr(resource, name), (value, hard))
from ipykernel.kernelapp import IPKernelApp

class OutputLimitExceeded(BaseException):
    pass

app = IPKernelApp.instance()
app.initialize(["-f", {conn!r}, "--HistoryManager.enabled=False", "--IPKernelApp.log_level=ERROR"])
cap, printed = {cap}, [0]
app.shell.events.register("pre_execute", lambda: printed.__setitem__(0, 0))

def capped(write):
    def write_capped(text):
        if not isinstance(text, str):
            return write(text)
        before = printed[0]
        printed[0] += len(text)
        if printed[0] <= cap:
            return write(text)
        if before < cap:
            write(text[: cap - before])
            if threading.current_thread() is threading.main_thread():
                raise OutputLimitExceeded(f"more than {{cap:,}} characters printed: the rest was dropped and the cell stopped")
        return len(text)
    return write_capped

sys.stdout.write = capped(sys.stdout.write)
sys.stderr.write = capped(sys.stderr.write)
del capped
app.start()
"""


# run as root, before bwrap (in a private mount namespace): each Python directory bound under a fresh /tmp,
# where nobody can reach it; then bwrap runs as nobody
_STAGE = """\
stage="$1"
shift
mount -t tmpfs -o size=64k,mode=755 gptoss-python-stage "$stage"
i=0
while [ "$1" != "--" ]; do
    mkdir "$stage/$i"
    mount --bind "$1" "$stage/$i"
    i=$((i + 1))
    shift
done
shift
exec "$@"
"""


def _stage_dir(paths: list[str]) -> str:
    """Where to mount the staging tmpfs (in root's private mount namespace): a directory that holds none of
    the paths to stage, which the tmpfs would hide."""
    for d in ("/tmp", "/mnt", "/media", "/srv", "/opt", "/run"):
        if os.path.isdir(d) and not os.path.islink(d) and not any(p.startswith(d + "/") for p in paths):
            return d
    raise SandboxUnavailable(f"python tool: no directory to stage the Python installation ({paths}) in")


class SandboxUnavailable(RuntimeError):
    """No OS sandbox can be set up here (and `sandbox="none"` was not asked for)."""


def python_tool_config(timeout_s: float = 120.0):
    """Harmony's declaration of the python tool (`SystemContent.with_tools(...)`), its description saying
    what this tool does: the timeout it runs with, and no internet access."""
    from openai_harmony import ToolNamespaceConfig

    config = ToolNamespaceConfig.python()
    description = config.description.replace("120.0 seconds", f"{float(timeout_s)} seconds")
    description = description.replace(
        "Internet access for this session is UNKNOWN. Depends on the cluster.",
        "Internet access for this session is disabled.",
    )
    return ToolNamespaceConfig(name=config.name, description=description, tools=list(config.tools))


def _python_paths() -> list[str]:
    """The Python installation to show the kernel, read-only: where the interpreter and its packages are."""
    paths: list[str] = []
    for p in (sys.base_prefix, sys.prefix, sys.base_exec_prefix, sys.exec_prefix):
        p = os.path.realpath(p)
        if not any(p == q or p.startswith(q + "/") for q in paths + ["/usr"]):
            paths.append(p)
    return paths


def _interpreter() -> str:
    """The interpreter of this environment (in the venv's bin, not resolved to the base one, so that the
    venv's packages, ipykernel among them, are found)."""
    return os.path.join(os.path.realpath(os.path.dirname(sys.executable)), os.path.basename(sys.executable))


def _check_positive(name: str, value, integer: bool = False):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value <= 0
        or (integer and not isinstance(value, int))
    ):
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


class _Drain(threading.Thread):
    """Reads a pipe to its end, keeping only its last bytes (the kernel's own stderr, for diagnostics)."""

    def __init__(self, pipe, keep: int = 8192):
        super().__init__(daemon=True)
        self.pipe, self.tail = pipe, deque(maxlen=keep)
        self.start()

    def run(self):
        try:
            for chunk in iter(lambda: self.pipe.read1(4096), b""):
                self.tail.extend(chunk)
        except (OSError, ValueError):
            pass

    def text(self) -> str:
        return bytes(self.tail).decode("utf-8", "replace").strip()


@dataclass
class _Kernel:
    proc: subprocess.Popen
    client: object  # jupyter_client.BlockingKernelClient
    ns_pid: int | None  # the sandbox's pid 1, seen from here (None without a sandbox)
    workdir: str | None  # the host directory of a kernel without a sandbox
    stderr: _Drain
    pidfd: int | None = None  # ns_pid's pidfd: a signal never reaches a later process that reuses the pid
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self):
        try:
            self.client.stop_channels()
        except Exception as e:  # noqa: BLE001 - the kernel goes regardless
            log.debug("python tool: stopping a kernel's channels: %s", e)
        self.client.context.destroy(linger=0)
        if self.ns_pid is not None:
            try:  # the sandbox's pid 1: every process in it goes
                if self.pidfd is not None:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                elif self.proc.poll() is None:  # bwrap has not reaped it: the pid is still the sandbox's
                    os.kill(self.ns_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None
            try:
                self.proc.wait(timeout=5)  # bwrap reaps its pid 1, then exits
            except subprocess.TimeoutExpired:
                pass
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # no pid namespace: the kernel's process group
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("python tool: sandbox process %d did not end after SIGKILL", self.proc.pid)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class PythonTool:
    """Stateful python for the model: one sandboxed Jupyter kernel per conversation (a `base.Tool`).

    `run` never raises for what the code does (errors, timeouts, a killed kernel, too much output come
    back as text, as does a kernel that cannot start, which is logged); it raises ValueError for bad
    arguments and RuntimeError once the tool is shut down.
    Safe to call from several threads; calls in one conversation run one at a time.
    """

    name = "python"

    def __init__(
        self,
        *,
        sandbox: str = "auto",
        timeout_s: float = 120.0,
        idle_timeout_s: float = 600.0,
        max_output_chars: int = 20_000,
        memory_bytes: int = 2 << 30,
        cpu_time_s: int = 600,
        max_processes: int = 64,
        max_file_bytes: int = 64 << 20,
        data_bytes: int = 256 << 20,
        startup_timeout_s: float = 60.0,
        max_kernels: int = 64,
    ):
        if sandbox not in SANDBOXES:
            raise ValueError(f"sandbox must be one of {', '.join(SANDBOXES)}, got {sandbox!r}")
        self.timeout_s = _check_positive("timeout_s", timeout_s)
        self.idle_timeout_s = _check_positive("idle_timeout_s", idle_timeout_s)
        self.max_output_chars = _check_positive("max_output_chars", max_output_chars, integer=True)
        self.memory_bytes = _check_positive("memory_bytes", memory_bytes, integer=True)
        self.cpu_time_s = _check_positive("cpu_time_s", cpu_time_s, integer=True)
        self.max_processes = _check_positive("max_processes", max_processes, integer=True)
        self.max_file_bytes = _check_positive("max_file_bytes", max_file_bytes, integer=True)
        self.data_bytes = _check_positive("data_bytes", data_bytes, integer=True)
        self.startup_timeout_s = _check_positive("startup_timeout_s", startup_timeout_s)
        self.max_kernels = _check_positive("max_kernels", max_kernels, integer=True)
        try:
            import ipykernel  # noqa: F401  (the kernel runs this environment's ipykernel)
            import jupyter_client  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"the python tool needs jupyter_client and ipykernel: {e}") from None

        self._kernels: dict[str, _Kernel] = {}
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="python-tool-spawn")
        if sandbox == "none":
            log.warning(
                "python tool: sandbox='none': kernels run without isolation of files or network "
                "(only rlimits and a clean environment); do not serve untrusted users this way"
            )
            self.sandbox = "none"
        else:
            problem = self._probe_bwrap()
            if problem:
                raise SandboxUnavailable(
                    f"python tool: no sandbox can be set up here ({problem}); install bubblewrap "
                    "(apt-get install bubblewrap) where user namespaces are allowed, or pass "
                    "sandbox='none' (serve --python-sandbox none) to run kernels without one"
                )
            self.sandbox = "bwrap"

        self._conv_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="python-tool-reaper", daemon=True)
        self._reaper.start()

    # ---- the sandbox -------------------------------------------------------------------------------

    def _bwrap(
        self, command: list[str], files: dict[str, int], info_fd: int | None = None, **popen
    ) -> subprocess.Popen:
        """Starts `command` in a new sandbox; `files` are fds to copy into it (destination: fd); bwrap
        writes the sandbox's pids to `info_fd`.

        Run as root, bwrap itself runs as `nobody` (uid 65534): Linux does not apply the process limit to
        processes of the host's root, whatever their namespace, so the sandbox must not be root there. Where
        the Python installation is where nobody cannot walk (/root/.pyenv), a private mount namespace
        (`unshare --mount`, root's) shows it to nobody under a fresh tmpfs (at /tmp, or another directory
        that holds none of it), whence bwrap binds it."""
        python = _python_paths()
        prefix: list[str] = []
        sources = python
        if self._root:
            prefix = [self._setpriv_path, "--reuid=65534", "--regid=65534", "--clear-groups"]
        if self._stage:
            stage = _stage_dir(python)
            sources = [f"{stage}/{i}" for i in range(len(python))]
            prefix = [
                self._unshare_path,
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-ec",
                _STAGE,
                "stage",
                stage,
                *python,
                "--",
                *prefix,
            ]
        args = [
            self._bwrap_path,
            "--unshare-all",
            "--unshare-user",
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--die-with-parent",
            "--new-session",
            "--ro-bind",
            "/usr",
            "/usr",
        ]
        for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(d):
                args += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                args += ["--ro-bind", d, d]
        args += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--size",
            str(self.data_bytes),
            "--tmpfs",
            DATA_DIR,
            "--size",
            str(self.data_bytes),
            "--tmpfs",
            "/tmp",
            "--size",
            str(1 << 20),
            "--tmpfs",
            _RUN_DIR,
        ]
        for src, dest in zip(sources, python):  # after the tmpfs mounts: a venv in /tmp stays visible
            args += ["--ro-bind", src, dest]
        for dest, fd in files.items():
            args += ["--file", str(fd), dest]
        args += ["--remount-ro", "/", "--chdir", DATA_DIR, "--clearenv"]
        for k, v in self._env().items():
            args += ["--setenv", k, v]
        if info_fd is not None:
            args += ["--info-fd", str(info_fd)]
            files = files | {"": info_fd}
        popen["pass_fds"] = tuple(files.values())
        # bwrap's own process is the sandbox's pid 1, whose /proc/1/environ the code can read: it gets no
        # environment either. Started from the tool's own thread: --die-with-parent follows the thread that
        # forked.
        return self._spawner.submit(
            subprocess.Popen,
            prefix + args + ["--", *command],
            env={"PATH": "/usr/bin:/bin"},
            cwd="/",
            stdin=subprocess.DEVNULL,
            **popen,
        ).result()

    def _env(self) -> dict[str, str]:
        return {
            "PATH": f"{os.path.dirname(_interpreter())}:/usr/local/bin:/usr/bin:/bin",
            "HOME": DATA_DIR,
            "USER": "sandbox",
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp",
            "IPYTHONDIR": "/tmp/.ipython",
            "JUPYTER_RUNTIME_DIR": "/tmp/.jupyter",
            "MPLCONFIGDIR": "/tmp/.mpl",
            "MPLBACKEND": "Agg",
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def _probe_bwrap(self) -> str | None:
        self._bwrap_path = shutil.which("bwrap")
        if self._bwrap_path is None:
            return "bwrap is not installed"
        self._root, self._stage = os.geteuid() == 0, False
        if not self._root:
            return self._probe_once()
        self._unshare_path, self._setpriv_path = shutil.which("unshare"), shutil.which("setpriv")
        if not (self._unshare_path and self._setpriv_path):
            return "run as root, the sandbox needs util-linux's unshare and setpriv"
        # as nobody straight away where it may read the Python installation, else staged for it
        problem = self._probe_once()
        if problem:
            self._stage = True
            staged = self._probe_once()
            if staged:
                return f"{problem}; staged: {staged}"
        return None

    def _probe_once(self) -> str | None:
        try:
            proc = self._bwrap(
                [_interpreter(), "-c", "import socket; print(len(socket.if_nameindex()))"],
                {},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            out, err = proc.communicate(timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            return f"bwrap failed: {e}"
        if proc.returncode != 0:
            return f"bwrap failed: {err.decode(errors='replace').strip()[-300:]}"
        if out.strip() != b"1":  # only its own loopback
            return f"bwrap's net namespace shows {out.strip().decode()} interfaces, not 1"
        return None

    def _read_info(self, proc: subprocess.Popen, fd: int) -> str:
        """bwrap's --info-fd JSON (read to its end), or "" where bwrap ended or stalled without one."""
        deadline = time.monotonic() + self.startup_timeout_s
        chunks = []
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                proc.kill()
                return ""
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks).decode()
            chunks.append(chunk)

    def _kernel_cap(self) -> int:
        """What a cell may print inside the kernel: the output cap less room for the error that stops it."""
        return self.max_output_chars - min(1000, self.max_output_chars // 4)

    def _limits(self) -> dict[str, int]:
        limits = {
            "RLIMIT_CPU": self.cpu_time_s,
            "RLIMIT_AS": self.memory_bytes,
            "RLIMIT_FSIZE": self.max_file_bytes,
            "RLIMIT_CORE": 0,
        }
        # without a user namespace it would count every process of the server's user
        if self.sandbox == "bwrap":
            limits["RLIMIT_NPROC"] = self.max_processes
        return limits

    def _start(self) -> _Kernel:
        import zmq
        from jupyter_client import BlockingKernelClient

        key = secrets.token_hex(32)
        ports = {f"{c}_port": i + 1 for i, c in enumerate(_CHANNELS)}
        if self.sandbox == "bwrap":
            run_dir, workdir = _RUN_DIR, None
        else:
            workdir = tempfile.mkdtemp(prefix="gptoss-py-")
            run_dir = os.path.join(workdir, ".kernel")
            os.mkdir(run_dir, 0o700)
        conn = dict(transport="ipc", ip=f"{run_dir}/k", key=key, signature_scheme="hmac-sha256", **ports)
        conn_path = f"{run_dir}/connection.json"
        launch = _LAUNCH.format(limits=self._limits(), conn=conn_path, cap=self._kernel_cap())
        info_r = None
        try:
            if self.sandbox == "bwrap":
                data_r, data_w = os.pipe()
                info_r, info_w = os.pipe()
                try:
                    proc = self._bwrap(
                        [_interpreter(), "-c", launch],
                        {conn_path: data_r},
                        info_w,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    )
                except BaseException:
                    os.close(data_w)
                    raise
                finally:
                    os.close(data_r)
                    os.close(info_w)
                with os.fdopen(data_w, "w") as f:
                    f.write(json.dumps(conn))
                text = self._read_info(proc, info_r)
                if not text:
                    err = proc.stderr.read().decode(errors="replace").strip()
                    proc.wait()
                    raise RuntimeError(f"python tool: the sandbox did not start: {err[-500:]}")
                ns_pid = int(json.loads(text)["child-pid"])
                try:  # bwrap is alive and has just named it: the pid is the sandbox's
                    pidfd = os.pidfd_open(ns_pid)
                except (AttributeError, OSError):
                    pidfd = None
                host_prefix = f"/proc/{ns_pid}/root"
            else:
                with open(os.open(conn_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                    f.write(json.dumps(conn))
                env = self._env() | {
                    "HOME": workdir,
                    "TMPDIR": workdir,
                    "IPYTHONDIR": f"{run_dir}/ipython",
                    "JUPYTER_RUNTIME_DIR": run_dir,
                    "MPLCONFIGDIR": f"{run_dir}/mpl",
                }
                proc = subprocess.Popen(
                    [_interpreter(), "-c", launch],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
                ns_pid, host_prefix, pidfd = None, "", None
        finally:
            if info_r is not None:
                os.close(info_r)
        drain = _Drain(proc.stderr)
        # ZMQ never reconnects: a reconnect would resolve the socket's path again, and the code in the
        # sandbox may by then have made it a symlink to a socket of the host (a path from here resolves
        # absolute symlinks against the host's root). No heartbeat channel either (it reconnects by design).
        context = zmq.Context()
        context.setsockopt(zmq.RECONNECT_IVL, -1)
        # and takes no message over 16 MiB (ZMQ drops the connection instead; the call then times out): a
        # kernel whose output guard the code removed cannot make the server take in 100 MB at a time
        context.setsockopt(zmq.MAXMSGSIZE, _MAX_MESSAGE)
        client = BlockingKernelClient(context=context)
        client.load_connection_info(conn | {"ip": f"{host_prefix}{run_dir}/k"})
        kernel = _Kernel(proc, client, ns_pid, workdir, drain, pidfd)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            # the sockets exist once the kernel has bound them
            while not all(os.path.exists(f"{host_prefix}{run_dir}/k-{i + 1}") for i in range(len(_CHANNELS))):
                if not kernel.alive() or time.monotonic() > deadline:
                    raise RuntimeError("kernel did not bind its sockets")
                time.sleep(0.02)
            client.start_channels(hb=False)
            client.wait_for_ready(timeout=max(1.0, deadline - time.monotonic()))
        except Exception as e:  # noqa: BLE001 - whatever stopped it, the kernel goes and the call is told
            kernel.kill()
            drain.join(timeout=2)
            raise RuntimeError(
                f"python tool: the kernel did not start ({e}): {drain.text()[-500:]}"
            ) from None
        return kernel

    def tool_config(self):
        """Harmony's declaration of this tool, with this tool's timeout (`python_tool_config`)."""
        return python_tool_config(self.timeout_s)

    # ---- the Tool interface (gptoss_jax/tools/base.py) -----------------------------------------------

    def config(self):
        return self.tool_config()

    async def call(self, call: ToolCall) -> ToolResult:
        """Runs the call's text (the code) in its conversation's kernel, in a worker thread."""
        cancel = threading.Event()
        item = {"type": "code_interpreter_call", "code": call.arguments,
                "container_id": f"cntr_{call.conversation}", "outputs": []}  # fmt: skip
        try:
            text = await asyncio.to_thread(self.run, call.conversation, call.arguments, cancel=cancel)
        except asyncio.CancelledError:
            cancel.set()  # the thread goes on until the kernel has stopped the cell
            raise
        except RuntimeError as e:  # shut down
            return ToolResult(f"[error: {e}]", item, error=str(e))
        item["outputs"] = [{"type": "logs", "logs": text}]
        return ToolResult(text, item)

    def annotate(self, conversation: str, text: str) -> list[dict]:
        return []

    # ---- running code ------------------------------------------------------------------------------

    def _conv_lock(self, conversation_id: str) -> threading.Lock:
        with self._lock:
            return self._conv_locks.setdefault(conversation_id, threading.Lock())

    def run(
        self,
        conversation_id: str,
        code: str,
        *,
        timeout_s: float | None = None,
        cancel: threading.Event | None = None,
    ) -> str:
        """Runs `code` in the conversation's kernel (started if it has none) and returns the tool's text:
        stdout and stderr as they came, then results and displays as text, then the error if any. `cancel`,
        once set, interrupts the cell (the kernel and its state stay)."""
        if not isinstance(conversation_id, str) or not conversation_id:
            raise ValueError(f"conversation_id must be a non-empty string, got {conversation_id!r}")
        if not isinstance(code, str):
            raise ValueError(f"code must be a string, got {type(code).__name__}")  # noqa: TRY004 - one error kind for arguments
        timeout = self.timeout_s if timeout_s is None else _check_positive("timeout_s", timeout_s)
        if self._closed.is_set():
            raise RuntimeError("python tool: shut down")
        with self._conv_lock(conversation_id):
            kernel = self._kernels.get(conversation_id)
            lost = ""
            if kernel is not None and not kernel.alive():
                lost = self._end(conversation_id, "[the previous python kernel had ended; state was lost]\n")
                kernel = None
            if kernel is None:
                with self._lock:
                    if len(self._kernels) >= self.max_kernels:
                        return (
                            f"{lost}[error: too many python sessions at once ({self.max_kernels}); try later]"
                        )
                try:
                    kernel = self._start()
                except RuntimeError as e:
                    log.error("%s", e)
                    return f"{lost}[error: the python kernel could not start]"
                with self._lock:
                    self._kernels[conversation_id] = kernel
            with kernel.lock:
                text = self._execute(conversation_id, kernel, code, timeout, cancel)
                kernel.last_used = time.monotonic()
            return lost + text

    def _execute(
        self,
        conversation_id: str,
        kernel: _Kernel,
        code: str,
        timeout: float,
        cancel: threading.Event | None = None,
    ) -> str:
        from queue import Empty

        client = kernel.client
        msg_id = client.execute(code, store_history=False, allow_stdin=False)
        cap = self.max_output_chars
        out: list[str] = []
        size = 0
        truncated = interrupted = False
        error = ""
        deadline = time.monotonic() + timeout

        def add(text: str):
            nonlocal size, truncated
            if size < cap:
                out.append(text[: cap - size])
            if size + len(text) > cap:
                truncated = True
            size += len(text)

        while True:
            if cancel is not None and cancel.is_set() and not interrupted:
                interrupted = True  # nobody waits for the result: stop the cell, keep the kernel
                client.control_channel.send(client.session.msg("interrupt_request", {}))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._end(conversation_id)
                error = (
                    f"[error: timed out after {timeout:g} s; the python kernel was restarted and its "
                    "state lost]"
                )
                break
            try:
                msg = client.get_iopub_msg(timeout=min(remaining, 0.5))
            except Empty:
                if not kernel.alive():
                    self._end(conversation_id)
                    error = (
                        "[error: the python kernel died (CPU time, memory or a signal); it will be "
                        "restarted and its state is lost]"
                    )
                    break
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                add(content.get("text", ""))
            elif kind in ("execute_result", "display_data"):
                data = content.get("data", {})
                if "text/plain" in data:
                    add(data["text/plain"] + "\n")
                elif data:
                    add(f"[{', '.join(sorted(data))} output not shown]\n")
            elif kind == "error":
                tb = "\n".join(
                    content.get("traceback") or [f"{content.get('ename')}: {content.get('evalue')}"]
                )
                add(_ANSI.sub("", tb) + "\n")
            elif kind == "status" and content.get("execution_state") == "idle":
                break
            if truncated and not interrupted:
                interrupted = True  # stop the cell: the rest would be dropped anyway
                client.control_channel.send(client.session.msg("interrupt_request", {}))
        text = "".join(out)
        if truncated:
            text += f"\n[output truncated: {size:,} characters, the first {cap:,} shown]"
        if error:
            text = (text + "\n" + error) if text else error
        return text or _NO_OUTPUT

    # ---- ending kernels ----------------------------------------------------------------------------

    def _end(self, conversation_id: str, note: str = "") -> str:
        with self._lock:
            kernel = self._kernels.pop(conversation_id, None)
        if kernel is not None:
            kernel.kill()
        return note

    def close(self, conversation_id: str) -> None:
        """Ends the conversation's kernel (its state and files go); nothing if it has none."""
        with self._conv_lock(conversation_id):
            self._end(conversation_id)
        with self._lock:
            self._conv_locks.pop(conversation_id, None)

    def sessions(self) -> list[str]:
        """The conversations with a kernel."""
        with self._lock:
            return list(self._kernels)

    def _reap(self):
        period = min(max(self.idle_timeout_s / 4, 0.05), 5.0)
        while not self._closed.wait(period):
            now = time.monotonic()
            with self._lock:
                idle = [c for c, k in self._kernels.items() if now - k.last_used > self.idle_timeout_s]
            for c in idle:
                lock = self._conv_lock(c)
                if lock.acquire(blocking=False):  # a running call is not idle
                    try:
                        k = self._kernels.get(c)
                        if k is not None and time.monotonic() - k.last_used > self.idle_timeout_s:
                            log.info(
                                "python tool: conversation %s idle for %.0f s: kernel ended",
                                c,
                                self.idle_timeout_s,
                            )
                            self._end(c)
                    finally:
                        lock.release()

    def shutdown(self) -> None:
        """Ends every kernel."""
        self._closed.set()
        for c in self.sessions():
            self.close(c)
        self._spawner.shutdown(wait=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
