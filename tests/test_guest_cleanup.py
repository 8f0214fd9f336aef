"""No process of a guest outlives a host process killed with SIGKILL.

The guest's host processes (the UML kernel, its guest processes, the helper that makes a
session of its own) are collected from /proc while the guest runs; the host process is then
SIGKILLed and none of them may remain alive.  Zombies count as gone: this machine's PID 1
does not reap the orphans it adopts, but a zombie holds no resources and runs nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from sigpoll.guest import _uml

try:
    _uml.find_kernel()
except _uml.UmlNotFound as exc:  # pragma: no cover - on these machines UML is installed
    pytestmark = pytest.mark.skip(reason=str(exc))


def _live(pids: set[int]) -> set[int]:
    """Those of ``pids`` that are running processes (not gone, not zombies)."""
    return {pid for pid in pids if (stat := _uml.proc_stat(pid)) is not None and stat[0] not in (b"Z", b"X")}


def _in_namespace(ns: str) -> set[int]:
    """Live processes in the PID namespace ``ns`` (a /proc/PID/ns/pid link target)."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{name}/ns/pid") == ns:
                    found.add(int(name))
    return _live(found)


@pytest.mark.skipif(_uml.jail_namespaces() == "none",
                    reason="no private PID namespace here (not root?): SIGKILL cleanup degrades, see docs/guest.md")
def test_sigkill_of_the_host_leaves_no_guest_process() -> None:
    host = subprocess.Popen(
        [sys.executable, "-m", "sigpoll.guest", "run", "--", "sleep", "600"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    tree: set[int] = set()
    try:
        assert host.stderr is not None
        lines = []
        for raw in host.stderr:
            lines.append(raw.decode(errors="replace"))
            if "guest up in" in lines[-1]:
                break
        else:
            pytest.fail("the guest did not come up:\n" + "".join(lines))
        # Up: init has printed its ready marker and `sleep 600` is on its way; give the
        # guest a moment to start it, then take its tree (later processes are caught by the
        # namespace check below).
        time.sleep(1)
        tree = _uml.descendants(host.pid)
        kernels = [pid for pid in tree if _comm(pid) == "linux.uml" and _comm(_parent(pid)) != "linux.uml"]
        assert len(kernels) == 1, {pid: _comm(pid) for pid in tree}
        ns = os.readlink(f"/proc/{kernels[0]}/ns/pid")
        assert ns != os.readlink("/proc/self/ns/pid"), "the guest kernel is not in a PID namespace of its own"
        guest = {pid for pid in tree if _comm(pid) == "linux.uml"}
        assert len(guest) >= 4 and guest <= _in_namespace(ns), {pid: _comm(pid) for pid in tree}

        host.kill()
        host.wait()
        deadline = time.monotonic() + 10
        while (_live(tree) or _in_namespace(ns)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _live(tree), f"guest processes survived the host's SIGKILL: {sorted(_live(tree))}"
        assert not _in_namespace(ns), "a process is still alive in the guest's PID namespace"
    finally:
        host.kill()
        host.wait()
        for pid in _live(tree):  # a failed run must not leave a guest behind
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _parent(pid: int) -> int:
    stat = _uml.proc_stat(pid)
    return int(stat[1]) if stat is not None else -1


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""

