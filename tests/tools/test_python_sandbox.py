"""The python tool's sandbox (gptoss_jax/tools/python.py), attacked: network, environment, files, a fork
bomb, 10 GB, an endless loop, 100 MB of output. Every attack must come back as text in bounded time, leave
nothing running, and leave the tool serving other conversations.

Limits are set low and every call runs under an outer deadline (`_bounded`): a broken sandbox fails the
test instead of taking the machine down. The tests need a working bubblewrap (`.ci/run` installs it) and
skip, saying why, only where no sandbox can be set up here.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from gptoss_jax.tools import PythonTool, SandboxUnavailable, python_tool_config

REPO = Path(__file__).resolve().parents[2]
LIMITS = {
    "timeout_s": 20,
    "memory_bytes": 1 << 30,
    "cpu_time_s": 60,
    "max_processes": 48,
    "max_file_bytes": 8 << 20,
    "data_bytes": 16 << 20,
    "max_output_chars": 4000,
}


def _bounded(fn, limit_s: float):
    """fn() in a thread; fails the test if it has not returned within limit_s."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised below)
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(limit_s)
    if t.is_alive():
        pytest.fail(f"the python tool did not return within {limit_s} s")
    if "error" in box:
        raise box["error"]
    return box["value"], time.monotonic() - t0


def run(tool, conv, code, limit_s=60, **kw) -> str:
    return _bounded(lambda: tool.run(conv, code, **kw), limit_s)[0]


def conv() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def assert_healthy(tool):
    """A normal call in a fresh conversation works."""
    c = conv()
    assert run(tool, c, "import math\nprint(math.factorial(5))") == "120\n"
    tool.close(c)


def gone(pid: int) -> bool:
    """The process has ended (a zombie counts: where pid 1 of this machine does not reap orphans, a
    sandbox's pid 1 may stay one; it holds no memory and runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def sandbox_processes(ns_pid: int) -> list[int]:
    """The host pids of every process in the sandbox's pid namespace."""
    ns = os.readlink(f"/proc/{ns_pid}/ns/pid")
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.readlink(f"/proc/{p}/ns/pid") == ns:
                    pids.append(int(p))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def tool():
    try:
        t = PythonTool(**LIMITS)
    except SandboxUnavailable as e:
        pytest.skip(f"no sandbox can be set up on this machine: {e}")
    yield t
    t.shutdown()
    assert t.sessions() == []


def test_state_persists_within_a_conversation_only(tool):
    a, b = conv(), conv()
    assert (
        run(tool, a, "x = 6 * 7\ndef twice(v):\n    return 2 * v")
        == "[no output: print() what you want to see]"
    )
    assert run(tool, a, "print(twice(x))") == "84\n"
    assert run(tool, a, "x + 1") == "43\n"  # the cell's value, as Jupyter shows it
    out = run(tool, b, "print(x)")
    assert "NameError" in out and "'x' is not defined" in out  # another conversation: another kernel
    assert (
        run(tool, a, "open('notes.txt', 'w').write('kept')\nimport os\nprint(os.getcwd())") == "/mnt/data\n"
    )
    assert run(tool, a, "print(open('/mnt/data/notes.txt').read())") == "kept\n"
    tool.close(a)
    out = run(tool, a, "print(x)")  # closed: a fresh kernel
    assert "NameError" in out
    tool.close(a)
    tool.close(b)


def test_network_is_contained(tool):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract_name = f"\0gptoss-jax-test-{uuid.uuid4().hex}"
    abstract.bind(abstract_name)
    abstract.listen(8)
    abstract.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def accept_loop():
        while not stop.is_set():
            for s in (listener, abstract):
                try:
                    accepted.append(s.accept())
                except OSError:
                    pass

    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()
    c = conv()
    try:
        out = run(
            tool,
            c,
            f"""
import os, socket
print("interfaces", socket.if_nameindex())
print("sys/class/net", os.path.exists("/sys/class/net"))
for family, address in [(socket.AF_INET, ("127.0.0.1", {port})), (socket.AF_INET6, ("::1", {port})),
                        (socket.AF_UNIX, {abstract_name!r})]:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(address)
        print("CONNECTED", address)
    except OSError as e:
        print("refused", type(e).__name__)
""",
        )
    finally:
        time.sleep(0.5)
        stop.set()
        t.join()
        listener.close()
        abstract.close()
    assert "interfaces [(1, 'lo')]" in out  # its own loopback only
    assert "sys/class/net False" in out
    assert "CONNECTED" not in out and out.count("refused") == 3, out
    assert accepted == []  # the test's listeners saw no connection
    tool.close(c)
    assert_healthy(tool)


def test_socket_symlinks_are_not_followed(tool, tmp_path):
    """The code swaps its kernel's sockets for symlinks to a host socket and drops the connections: the
    server must not reconnect through them (it would land on the host's socket, as root perhaps)."""
    host_path = str(tmp_path / "host.sock")
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.bind(host_path)
    host.listen(16)
    host.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def accept_loop():
        while not stop.is_set():
            try:
                accepted.append(host.accept())
            except OSError:
                pass

    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()
    c = conv()
    try:
        out, _ = _bounded(
            lambda: tool.run(
                c,
                f"""
import gc, os, time, zmq
for i in range(1, 6):
    os.unlink(f"/run/kernel/k-{{i}}")
    os.symlink({host_path!r}, f"/run/kernel/k-{{i}}")
for o in gc.get_objects():
    if isinstance(o, zmq.Socket) and not o.closed:
        o.close(linger=0)
time.sleep(60)
""",
                timeout_s=4,
            ),
            60,
        )
        time.sleep(1)
    finally:
        stop.set()
        t.join()
        host.close()
    assert accepted == [] and "[error:" in out, out
    tool.close(c)
    assert_healthy(tool)


def test_server_environment_is_not_visible(tool, monkeypatch):
    secret = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("GPTOSS_JAX_API_KEY", secret)
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("GPTOSS_JAX_SERVER_SECRET", secret)
    c = conv()  # its kernel starts now, with the variables set in this process
    out = run(
        tool,
        c,
        f"""
import os, glob
print(sorted(os.environ))
print(any({secret!r} in v for v in os.environ.values()))
found = []
for path in glob.glob("/proc/*/environ") + ["/proc/{os.getpid()}/environ", "/proc/{os.getppid()}/environ"]:
    try:
        if {secret!r}.encode() in open(path, "rb").read():
            found.append(path)
    except OSError:
        pass
print("found", found)
""",
    )
    assert secret not in out.replace(f"{secret!r}", "")  # only in the echoed code, if at all
    assert "\nFalse\n" in out and "found []" in out, out
    for name in (
        "GPTOSS_JAX_API_KEY",
        "OPENAI_API_KEY",
        "GPTOSS_JAX_SERVER_SECRET",
        "VIRTUAL_ENV",
        "PYTEST_CURRENT_TEST",
        "XLA_FLAGS",
    ):
        assert f"'{name}'" not in out
    tool.close(c)
    assert_healthy(tool)


def test_files_outside_its_directory_are_out_of_reach(tool, tmp_path):
    secret_file = tmp_path / "server-secret.txt"
    secret_file.write_text("top secret")
    marker = f"gptoss-sandbox-{uuid.uuid4().hex}"
    c = conv()
    out = run(
        tool,
        c,
        f"""
import os, sys
def attempt(label, fn):
    try:
        fn()
        print(label, "OK")
    except OSError as e:
        print(label, "DENIED", type(e).__name__)
attempt("read-secret", lambda: print(open({str(secret_file)!r}).read()))
attempt("read-repo", lambda: print(open({str(REPO / "pyproject.toml")!r}).read()[:20]))
attempt("list-repo", lambda: print("listing", sorted(os.listdir({str(REPO)!r}))))
attempt("read-passwd", lambda: print(open("/etc/passwd").read()[:20]))
attempt("read-root", lambda: print(os.listdir("/root/.ssh")))
attempt("write-repo", lambda: open({str(REPO / marker)!r}, "w").write("x"))
attempt("write-python", lambda: open(os.path.join(sys.prefix, {marker!r}), "w").write("x"))
attempt("write-usr", lambda: open("/usr/{marker}", "w").write("x"))
attempt("write-root", lambda: open("/{marker}", "w").write("x"))
attempt("write-tmp", lambda: open("/tmp/{marker}", "w").write("x"))
attempt("write-data", lambda: open("/mnt/data/{marker}", "w").write("x"))
attempt("fill-data", lambda: [open(f"/mnt/data/fill{{i}}", "wb").write(b"x" * (4 << 20)) for i in range(8)])
attempt("big-file", lambda: open("/tmp/big", "wb").write(b"x" * (12 << 20)))
""",
    )
    lines = dict(line.split(" ", 1) for line in out.splitlines() if line.split(" ", 1)[0].count("-") == 1)
    # A repo under /tmp (a CI clone) lies, inside, on the sandbox's own private /tmp: a write there succeeds
    # in the sandbox and never reaches the host (checked below, with the other paths).
    private = REPO.resolve().is_relative_to("/tmp")
    for label in (
        "read-secret",
        "read-repo",
        "read-passwd",
        "read-root",
        "write-repo",
        "write-python",
        "write-usr",
        "write-root",
        "fill-data",
        "big-file",
    ):
        if label == "write-repo" and private and lines.get(label) == "OK":
            continue
        assert lines.get(label, "").startswith("DENIED"), (label, out)
    # The repo's folder may exist inside only as the mount point of a Python installation under it (a venv in
    # the clone, as CI makes it): then it lists that one entry, and none of the repo's own files.
    prefix = Path(sys.prefix).resolve()
    inside = [prefix.relative_to(REPO).parts[0]] if prefix.is_relative_to(REPO) else []
    listed = [line for line in out.splitlines() if line.startswith("listing ")]
    if not lines.get("list-repo", "").startswith("DENIED"):
        assert inside and listed == [f"listing {inside!r}"], (listed, out)
    assert lines["write-tmp"] == "OK" and lines["write-data"] == "OK"  # its own private tmpfs mounts
    assert "top secret" not in out
    for leaked in (
        REPO / marker,
        Path("/tmp") / marker,
        Path(os.sys.prefix) / marker,
        Path("/usr") / marker,
        Path("/") / marker,
        Path("/mnt/data") / marker,
    ):
        assert not leaked.exists(), leaked
    tool.close(c)
    assert_healthy(tool)


def test_fork_bomb_meets_the_process_limit(tool):
    c = conv()
    counted = run(
        tool,
        c,
        """
import os, time
children = []
try:
    while True:
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
except OSError as e:
    print("stopped", len(children), type(e).__name__)
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
""",
    )
    assert counted.startswith("stopped "), counted
    assert 0 < int(counted.split()[1]) < LIMITS["max_processes"]
    ns_pid = tool._kernels[c].ns_pid
    assert ns_pid is not None
    pids = sandbox_processes(ns_pid)
    # a real bomb: every process forks forever; the call's time limit ends the whole pid namespace
    out, took = _bounded(
        lambda: tool.run(
            c,
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
            timeout_s=4,
        ),
        60,
    )
    assert "timed out after 4 s" in out and took < 30, (out, took)
    assert gone(ns_pid) and all(gone(p) for p in pids)
    assert c not in tool.sessions()
    out = run(tool, c, "print(counted)")  # the next call: a fresh kernel
    assert "NameError" in out
    new_ns = tool._kernels[c].ns_pid
    assert len(sandbox_processes(new_ns)) <= 3  # bwrap's init and the kernel: no survivor of the bomb
    tool.close(c)
    assert_healthy(tool)


def test_allocating_10_gb_is_refused(tool):
    c = conv()
    run(tool, c, "kept = 'still here'")
    out = run(tool, c, "block = bytearray(10 * 1024**3)\nprint('got', len(block))")
    assert "MemoryError" in out and "got 10" not in out, out
    out = run(tool, c, "import numpy as np\nbig = np.ones((10 * 1024**3) // 8)\nprint('got', big.nbytes)")
    assert "got 10" not in out and ("MemoryError" in out or "Unable to allocate" in out), out
    assert run(tool, c, "print(kept)") == "still here\n"  # the kernel survived with its state
    tool.close(c)
    assert_healthy(tool)


def test_endless_loop_times_out_and_the_kernel_restarts(tool):
    c = conv()
    run(tool, c, "state = 1")
    out, took = _bounded(lambda: tool.run(c, "while True:\n    pass", timeout_s=3), 60)
    assert out.startswith("[error: timed out after 3 s") and took < 20, (out, took)
    out = run(tool, c, "print(state)")
    assert "NameError" in out  # restarted: state lost, as the error said
    assert run(tool, c, "print('back')") == "back\n"
    tool.close(c)
    assert_healthy(tool)


def test_cpu_time_limit_kills_the_kernel():
    try:
        t = PythonTool(**(LIMITS | {"cpu_time_s": 3, "timeout_s": 60}))
    except SandboxUnavailable as e:
        pytest.skip(f"no sandbox can be set up on this machine: {e}")
    try:
        c = conv()
        out, took = _bounded(lambda: t.run(c, "while True:\n    pass"), 90)
        assert "the python kernel died" in out and took < 50, (out, took)
        assert run(t, c, "print('fresh')") == "fresh\n"
        assert_healthy(t)
    finally:
        t.shutdown()


def test_100_mb_of_output_is_capped(tool):
    c = conv()
    run(tool, c, "kept = 7")
    cap = LIMITS["max_output_chars"]
    # inside the kernel: the cell stops once it has printed its share of the cap
    out, took = _bounded(lambda: tool.run(c, "print('x' * 100_000_000)"), 120)
    assert out.startswith("x" * (cap - 1000)) and "x" * (cap - 999) not in out, out[-300:]
    assert "OutputLimitExceeded: more than 3,000 characters printed" in out and len(out) <= cap + 200
    out, took = _bounded(lambda: tool.run(c, "while True:\n    print('y' * 1000)"), 60)
    assert out.startswith("y" * 1000) and "OutputLimitExceeded" in out and "timed out" not in out, out[-300:]
    assert len(out) <= cap + 200 and took < 40  # (well before the 120 s call timeout; generous for a busy CI)
    assert run(tool, c, "print(kept)") == "7\n"  # the kernel kept its state
    # the code may undo the kernel's guard: the server's own cap still holds, and it stops the cell
    unguard = "import sys\nfor s in (sys.stdout, sys.stderr):\n    s.write = type(s).write.__get__(s)\n"
    out, took = _bounded(lambda: tool.run(c, unguard + "print('z' * 10_000_000)"), 120)
    assert out.startswith("z" * cap) and "[output truncated: 10,000,001 characters, the first 4,000" in out
    assert len(out) <= cap + 200, out[-300:]
    out, took = _bounded(
        lambda: tool.run(
            c,
            unguard + "import time\nwhile True:\n    print('w' * 1000)\n    time.sleep(0.001)",
            timeout_s=30,
        ),
        60,
    )
    assert out.startswith("w" * 1000) and "[output truncated" in out and "timed out" not in out, out[-300:]
    assert (
        "KeyboardInterrupt" not in out[:cap] and took < 25
    )  # interrupted once the cap was reached (timeout 30)
    assert run(tool, c, "print(kept)") == "7\n"
    # one message of 50 MB: the server refuses to take it in (the connection drops; the call times out)
    out, took = _bounded(lambda: tool.run(c, unguard + "print('v' * 50_000_000)", timeout_s=5), 60)
    assert out.startswith("[error: timed out after 5 s") and "v" * 100 not in out, out[-300:]
    tool.close(c)
    assert_healthy(tool)


def test_idle_kernels_end():
    try:
        t = PythonTool(**(LIMITS | {"idle_timeout_s": 0.5}))
    except SandboxUnavailable as e:
        pytest.skip(f"no sandbox can be set up on this machine: {e}")
    try:
        c = conv()
        run(t, c, "v = 1")
        ns_pid = t._kernels[c].ns_pid
        pids = sandbox_processes(ns_pid)
        assert len(pids) >= 2  # bwrap's pid 1 and the kernel
        deadline = time.monotonic() + 10
        while (t.sessions() or not all(gone(p) for p in [ns_pid, *pids])) and time.monotonic() < deadline:
            time.sleep(0.1)  # the session is dropped, then its processes end (a kill is not instant)
        assert t.sessions() == [] and gone(ns_pid) and all(gone(p) for p in pids)
        assert "NameError" in run(t, c, "print(v)")
    finally:
        t.shutdown()


def test_no_sandbox_refuses_unless_asked(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    with pytest.raises(SandboxUnavailable, match=r"bwrap is not installed.*sandbox='none'"):
        PythonTool()
    with caplog.at_level(logging.WARNING, logger="gptoss_jax.tools.python"):
        t = PythonTool(sandbox="none", timeout_s=20)
    assert any("sandbox='none'" in r.getMessage() for r in caplog.records)
    try:
        monkeypatch.setenv("GPTOSS_JAX_API_KEY", "sk-none-secret")
        c = conv()
        assert run(t, c, "y = 5") == "[no output: print() what you want to see]"
        assert run(t, c, "import os\nprint(y, 'GPTOSS_JAX_API_KEY' in os.environ)") == "5 False\n"
    finally:
        t.shutdown()


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="sandbox must be one of"):
        PythonTool(sandbox="docker")
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        PythonTool(sandbox="none", timeout_s=0)
    with pytest.raises(ValueError, match="max_processes must be a positive integer"):
        PythonTool(sandbox="none", max_processes=2.5)


def test_harmony_declaration():
    from openai_harmony import Conversation, Message, Role, SystemContent

    from gptoss_jax.tokenizer import get_harmony_encoding

    assert PythonTool(sandbox="none", timeout_s=30).tool_config() == python_tool_config(timeout_s=30)
    config = python_tool_config(timeout_s=30)
    assert config.name == "python"
    assert (
        "30.0 seconds" in config.description
        and "Internet access for this session is disabled." in config.description
    )
    assert "UNKNOWN" not in config.description
    enc = get_harmony_encoding()
    system = Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_tools(config))
    text = enc.decode(enc.render_conversation(Conversation.from_messages([system])))
    assert "# Tools" in text and "## python" in text and "30.0 seconds" in text


def test_staging_directory_never_hides_the_python_installation():
    from gptoss_jax.tools.python import _stage_dir

    assert _stage_dir(["/root/.pyenv/versions/3.11.7", "/work/main/.venv"]) == "/tmp"
    stage = _stage_dir(["/tmp/ci/.venv"])  # a venv in /tmp: the staging tmpfs must go elsewhere
    assert stage != "/tmp" and os.path.isdir(stage)


def test_conversations_run_side_by_side(tool):
    """A slow call in one conversation does not hold up another's."""
    a, b = conv(), conv()
    run(tool, a, "import time")
    run(tool, b, "import time")
    results = {}
    slow = threading.Thread(
        target=lambda: results.setdefault("a", tool.run(a, "time.sleep(8)\nprint('slow')"))
    )
    slow.start()
    time.sleep(0.3)
    out, took = _bounded(lambda: tool.run(b, "print('quick')"), 30)
    assert out == "quick\n" and took < 7 and slow.is_alive()  # (the slow call sleeps 8 s)
    slow.join(30)
    assert results["a"] == "slow\n"
    tool.close(a)
    tool.close(b)


def test_kernels_are_counted():
    try:
        t = PythonTool(**(LIMITS | {"max_kernels": 1}))
    except SandboxUnavailable as e:
        pytest.skip(f"no sandbox can be set up on this machine: {e}")
    try:
        assert run(t, "one", "print(1)") == "1\n"
        assert run(t, "two", "print(2)").startswith("[error: too many python sessions at once (1)")
        t.close("one")
        assert run(t, "two", "print(2)") == "2\n"
    finally:
        t.shutdown()
