"""Launching User-Mode Linux guests: finding the kernel and building its command line.

Kept apart from the backends so the console, 9p, virtio and guest-runtime code share one
recipe.  Facts it relies on (Debian's user-mode-linux, kernel 6.1): ``linux.uml`` boots with
the host's root file system through hostfs, runs an ``init=`` script as PID 1, and puts its
physical memory in a file under TMPDIR.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "INSTALL_HINT",
    "SigioNudger",
    "UmlNotFound",
    "find_kernel",
    "kernel_command",
    "kill_group",
    "modules_dir",
    "spawn_kwargs",
]

INSTALL_HINT = "apt-get install -y user-mode-linux kmod"


class UmlNotFound(RuntimeError):
    """No User-Mode Linux kernel on this machine."""


def find_kernel(path: str | None = None) -> str:
    """The UML kernel binary to run: ``path`` if given, else ``linux.uml`` on PATH."""
    found = shutil.which(path or "linux.uml") or (path if path and os.access(path, os.X_OK) else None)
    if not found:
        raise UmlNotFound(
            f"User-Mode Linux kernel {path or 'linux.uml'!r} not found; install it with: {INSTALL_HINT}"
        )
    return found


def modules_dir() -> str | None:
    """Directory of the UML kernel's modules (for insmod inside the guest), if installed."""
    base = "/usr/lib/uml/modules"
    try:
        versions = sorted(os.listdir(base))
    except OSError:
        return None
    return os.path.join(base, versions[-1]) if versions else None


def kernel_command(
    init: str,
    *,
    kernel: str | None = None,
    mem: str = "256M",
    console: str = "fd:0,fd:1",
    extra: Sequence[str] = (),
    read_only: bool = False,
) -> list[str]:
    """argv for a guest that uses the host's root file system and runs ``init`` as PID 1."""
    return [
        find_kernel(kernel),
        f"mem={mem}",
        "root=/dev/root",
        "rootfstype=hostfs",
        "rootflags=/",
        "ro" if read_only else "rw",
        f"init={init}",
        f"con0={console}",
        "con=null",
        "quiet",
        *extra,
    ]


_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    # UML runs on SIGIO and SIGALRM; a mask inherited from a sigpoll process (which blocks
    # SIGIO and its RT signal) would freeze the guest's interrupts.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    # If the host process dies without cleaning up (SIGKILL), take the guest with it.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid``, from /proc (taken before anything is killed:
    orphans are reparented and the link is lost)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: ppid follows the last ')'.
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def kill_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Kill a UML kernel and every host process of its guest, and wait until they are gone.

    Its guest processes share its process group, but one helper (the one that watches the
    console for SIGWINCH) makes a session of its own, so the kernel's descendants are
    collected from /proc as well.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        targets = _descendants(proc.pid)
        if proc.poll() is None:
            targets.add(proc.pid)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
            group_alive = True
        except (ProcessLookupError, PermissionError):
            group_alive = False
        if proc.poll() is None:
            proc.wait()
        if not group_alive and not targets:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)


def spawn_kwargs(env: Mapping[str, str] | None = None, tmpdir: str | None = None) -> dict[str, Any]:
    """Keyword arguments for subprocess/asyncio spawning of a UML kernel.

    A clean signal mask, its own session (so a terminal's SIGINT is not sent to it), and
    TMPDIR pointing where its memory file should go.
    """
    child_env = dict(os.environ if env is None else env)
    if tmpdir is not None:
        child_env["TMPDIR"] = tmpdir
    return {
        "preexec_fn": _child_setup,
        "start_new_session": True,
        "env": child_env,
        "stderr": subprocess.DEVNULL,
    }


class SigioNudger:
    """Un-stalls UML's own fd console from the host side.

    UML's console output path is the scheme of the seed (sleep until SIGIO, then
    ``epoll_wait(.., 0)`` once): when the host pty's room comes back, the signal can reach
    UML before its epoll set has the edge, and UML then waits for a signal that never
    comes.  The host side (sigpoll's console) is ready the whole time; the guest is stuck
    inside its own kernel.  In the report a keypress un-stalls it; a bare SIGIO does the
    same without sending any input: UML looks at its epoll set again and finds the edge.

    So while the console has moved no bytes for ``idle`` seconds, the nudger sends the UML
    process one SIGIO per ``idle`` period.  An idle guest costs one signal per period.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pid: int,
        progress: Callable[[], int],
        idle: float = 0.25,
    ) -> None:
        self._loop = loop
        self._pid = pid
        self._progress = progress
        self._idle = idle
        self._last = progress()
        self._handle: asyncio.TimerHandle | None = None
        self.nudges = 0

    def start(self) -> None:
        if self._handle is None:
            self._handle = self._loop.call_later(self._idle, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        now = self._progress()
        if now == self._last:
            try:
                os.kill(self._pid, signal.SIGIO)
                self.nudges += 1
            except ProcessLookupError:
                self._handle = None
                return
        self._last = now
        self._handle = self._loop.call_later(self._idle, self._tick)
