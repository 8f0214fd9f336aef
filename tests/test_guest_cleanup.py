"""Every way `python -m sigpoll.guest run` can end leaves nothing behind (issue 13 item 3).

Each test runs the command with a share over the private network and a port on a socket of
its own, ends it one way (^C in a real terminal, SIGTERM, SIGHUP, SIGKILL), and then looks for
what a guest could leave: its host processes (the launcher, the UML kernel, its guest
processes, the helper that makes a session of its own), anything still in its PID namespace or
running as its uid, its network namespace (held by any process or fd, or named under
/run/netns), its private directory, its port socket and UML's ~/.uml litter (TMPDIR and HOME
are the test's own, so other runs on the machine do not count).  Two of them
make the exit path harder first: a share server stuck in the host (a FIFO opened through the
share blocks a server thread), a guest that hangs (its kernel stopped).

Zombies count as gone: this machine's PID 1 does not reap the orphans it adopts, but a zombie
holds no resources and runs nothing.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest

from sigpoll.guest import _uml

try:
    _uml.find_kernel()
except _uml.UmlNotFound as exc:  # pragma: no cover - on these machines UML is installed
    pytestmark = pytest.mark.skip(reason=str(exc))
if os.geteuid() != 0:  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="a share over the private network needs root")

COMMAND = [sys.executable, "-m", "sigpoll.guest", "run"]


def _live(pids: set[int]) -> set[int]:
    """Those of ``pids`` that are running processes (not gone, not zombies)."""
    return {pid for pid in pids if (stat := _uml.proc_stat(pid)) is not None and stat[0] not in (b"Z", b"X")}


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _processes() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _links(pid: int) -> list[str]:
    """What process ``pid``'s namespaces and fds point at."""
    found = []
    for where in (f"/proc/{pid}/ns", f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            for name in os.listdir(where):
                with contextlib.suppress(OSError):
                    found.append(os.readlink(os.path.join(where, name)))
    return found


def _uid(pid: int) -> int | None:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    return None


def _named_netns() -> set[str]:
    """The namespaces named under /run/netns (as ns links read: net:[INODE])."""
    found = set()
    with contextlib.suppress(OSError):
        for name in os.listdir("/run/netns"):
            with contextlib.suppress(OSError):
                found.add(f"net:[{os.stat(os.path.join('/run/netns', name)).st_ino}]")
    return found


class Leftovers:
    """What one `guest run` (with a share and a port) may leave behind, and the command line."""

    def __init__(self, tmp: Any, guest_command: list[str]) -> None:
        export = tmp / "export"
        export.mkdir()
        self.port = str(tmp / "p.sock")
        # The command's TMPDIR and HOME are the test's own: its private directory and any
        # ~/.uml litter land where nothing else on this shared machine writes.
        # (TMPDIR short: the guest's sockets live there.)
        self.tmpdir = tempfile.mkdtemp(prefix="sigpoll-test-")
        self.home = tmp / "home"
        self.home.mkdir()
        self.argv = ["env", f"TMPDIR={self.tmpdir}", f"HOME={self.home}",
                     *COMMAND, "--share", f"{export}:x", "--port", f"p=unix:{self.port}", "--", *guest_command]
        self.tree: set[int] = set()
        self.kernel = -1
        self.uid: int | None = None
        self.ns: set[str] = set()

    def watch(self, host: int) -> None:
        """Take the running guest's tree, uid and namespaces (``host``: the command's pid)."""
        time.sleep(1.5)  # the guest's command is on its way
        self.tree = _uml.descendants(host)
        kernels = [pid for pid in self.tree if _comm(pid) == "linux.uml" and _comm(_parent(pid)) != "linux.uml"]
        assert len(kernels) == 1, {pid: _comm(pid) for pid in self.tree}
        self.kernel = kernels[0]
        self.uid = _uid(self.kernel)
        self.ns = {os.readlink(f"/proc/{self.kernel}/ns/{ns}") for ns in ("pid", "net", "mnt")}
        assert os.readlink("/proc/self/ns/net") not in self.ns
        assert os.path.exists(self.port)

    def left(self) -> list[str]:
        """What of the guest is still there."""
        problems = []
        if live := _live(self.tree):
            problems.append(f"processes of the guest: { {pid: _comm(pid) for pid in live} }")
        owned = {pid for pid in _processes() if self.uid and _uid(pid) == self.uid}
        if live := _live(owned):
            problems.append(f"processes of the guest's uid {self.uid}: {sorted(live)}")
        holders = {pid for pid in _processes() if self.ns & set(_links(pid))}
        if live := _live(holders):
            problems.append(f"processes holding the guest's namespaces: { {pid: _comm(pid) for pid in live} }")
        if left := os.listdir(self.tmpdir):
            problems.append(f"in TMPDIR: {left}")
        if left := os.listdir(self.home):
            problems.append(f"in HOME: {left}")
        if named := _named_netns() & self.ns:
            problems.append(f"the guest's network namespace has a name: {named}")
        if os.path.lexists(self.port):
            problems.append(f"the port socket {self.port}")
        return problems

    def assert_clean(self, within: float = 15) -> None:
        deadline = time.monotonic() + within
        while (problems := self.left()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not problems, problems

    def kill(self) -> None:
        """A failed run must not leave a guest running on this machine (nor our TMPDIR)."""
        for pid in _live(self.tree):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _blocked_on_a_fifo(pid: int) -> bool:
    """Whether a thread of process ``pid`` waits in open(2) for a FIFO's other end."""
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/wchan") as f:
                if f.read().strip() == "wait_for_partner":
                    return True
    return False


def _parent(pid: int) -> int:
    stat = _uml.proc_stat(pid)
    return int(stat[1]) if stat is not None else -1


def _start(g: Leftovers) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(g.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    seen = []
    for raw in proc.stderr:
        seen.append(raw.decode(errors="replace"))
        if "guest up in" in seen[-1]:
            break
    else:
        pytest.fail("the guest did not come up:\n" + "".join(seen))
    g.watch(proc.pid)
    return proc


def _finish(proc: subprocess.Popen[bytes], within: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the command did not exit within {within:g}s:\n{err.decode(errors='replace')}")
    return proc.returncode, err.decode(errors="replace")


def _no_traceback(text: str) -> None:
    for bad in ("Traceback", "Exception ignored", "Task was destroyed", "Event loop is closed"):
        assert bad not in text, text


@pytest.mark.timeout(120)
def test_ctrl_c_in_a_terminal_leaves_nothing_behind(tmp_path: Any) -> None:
    pexpect = pytest.importorskip("pexpect")
    g = Leftovers(tmp_path, ["sleep", "60"])
    # bash runs the command in the terminal's foreground, as a user's shell would, and
    # shows the terminal's settings before and after it.
    script = f"stty -g; {shlex.join(g.argv)}; echo status=$?; stty -g"
    child = pexpect.spawn("bash", ["-c", script], timeout=60, encoding="utf-8", codec_errors="replace")
    try:
        if child.expect(["guest up in", pexpect.EOF]) == 1:
            pytest.fail(f"the guest did not come up: {child.before}")
        seen = child.before + child.after
        shell_children = [pid for pid in _uml.descendants(child.pid) if _parent(pid) == child.pid]
        g.watch(shell_children[0])
        child.sendintr()  # ^C, as typed
        child.expect(r"status=(\d+)", timeout=30)
        seen += child.before + child.after
        status = int(child.match.group(1))
        child.expect(pexpect.EOF, timeout=10)
        seen += child.before
        assert status == 128 + signal.SIGINT, seen
        _no_traceback(seen)
        modes = [line.strip() for line in seen.splitlines() if line.count(":") > 10]
        assert len(modes) == 2 and modes[0] == modes[1], f"the terminal's settings changed: {modes}"
        g.assert_clean()
    finally:
        child.close(force=True)
        g.kill()


# The guest's root speaks 9P to its share server itself (tests/support/raw9p.py, from a privileged
# port as the kernel's mount does): a Tlopen of a FIFO, which the server opens on the host,
# where open(2) waits for a writer that never comes.  The guest kernel's v9fs never sends
# that (it opens FIFOs itself); a hostile guest can.
RAW9P = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "raw9p.py")


def _stop(g: Leftovers, proc: subprocess.Popen[bytes], signum: int, within: float) -> None:
    """Send ``signum``; the command exits 128 + it, says no traceback, leaves nothing."""
    try:
        proc.send_signal(signum)
        status, err = _finish(proc, within=within)
        assert status == 128 + signum, err
        _no_traceback(err)
        g.assert_clean()
    finally:
        proc.kill()
        g.kill()


@pytest.mark.timeout(150)
def test_sigterm_with_a_stuck_share_server_leaves_nothing_behind(tmp_path: Any) -> None:
    g = Leftovers(tmp_path, ["sh", "-c", "python3 /mnt/x/raw9p.py --privileged-port open-fifo fifo & sleep 60"])
    os.mkfifo(tmp_path / "export" / "fifo")
    shutil.copy(RAW9P, tmp_path / "export" / "raw9p.py")
    proc = _start(g)
    # Wait (a while) for a server thread to be stuck in open(2).  A server that never blocks
    # on FIFOs makes this the plain SIGTERM case, which must hold as well.
    deadline = time.monotonic() + 15
    while not _blocked_on_a_fifo(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _stop(g, proc, signal.SIGTERM, within=90)


@pytest.mark.timeout(120)
def test_sighup_with_a_hung_guest_leaves_nothing_behind(tmp_path: Any) -> None:
    g = Leftovers(tmp_path, ["sleep", "60"])
    proc = _start(g)
    os.kill(g.kernel, signal.SIGSTOP)  # the guest kernel hangs: it answers nothing now
    _stop(g, proc, signal.SIGHUP, within=60)


@pytest.mark.timeout(120)
def test_sigkill_of_the_host_leaves_nothing_behind(tmp_path: Any) -> None:
    # Nothing of the killed process runs: the jail's launcher and the kernel clean up.
    g = Leftovers(tmp_path, ["sleep", "600"])
    proc = _start(g)
    try:
        guest_processes = {pid for pid in g.tree if _comm(pid) == "linux.uml"}
        assert len(guest_processes) >= 4, guest_processes  # the kernel, its helpers, guest processes
        proc.kill()
        proc.wait()
        g.assert_clean()
    finally:
        proc.kill()
        g.kill()
