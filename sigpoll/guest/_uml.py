"""Launching User-Mode Linux guests: finding the kernel and building its command line.

Kept apart from the backends so the console, 9p, virtio and guest-runtime code share one
recipe.  Facts it relies on (Debian's user-mode-linux, kernel 6.1): ``linux.uml`` boots with
the host's root file system through hostfs, runs an ``init=`` script as PID 1, and puts its
physical memory in a file under TMPDIR.

No UML process outlives the host process, even one killed with SIGKILL: :class:`UmlProcess`
starts the kernel as PID 1 of a private PID namespace when this machine allows it (see
:func:`pid_namespace_available`), so the host kernel kills every process of the guest when
the UML kernel dies, and the UML kernel dies with the host process (PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "INSTALL_HINT",
    "SigioNudger",
    "UmlNotFound",
    "UmlProcess",
    "find_kernel",
    "kernel_command",
    "kill_group",
    "modules_dir",
    "pid_namespace_available",
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


def _child_setup(parent: int) -> Callable[[], None]:
    """The ``preexec_fn`` of a UML kernel (or of its launcher) started by process ``parent``."""

    def setup() -> None:
        # UML runs on SIGIO and SIGALRM; a mask inherited from a sigpoll process (which blocks
        # SIGIO and its RT signal) would freeze the guest's interrupts.
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        # If the host process dies without cleaning up (SIGKILL), take the guest with it.
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        # The host may have died between fork and prctl: then no signal will ever come.
        if os.getppid() != parent:
            os._exit(1)

    return setup


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), or
    None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields follow the last ')'.
    return stat[stat.rindex(b")") + 2 :].split()


def _descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid``, from /proc (taken before anything is killed:
    orphans are reparented and the link is lost)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) is not None:
            children.setdefault(int(stat[1]), []).append(int(name))
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
    if isinstance(proc, UmlProcess) and proc.pid_namespace and proc.poll() is None:
        kernel = proc.kernel_pid()
        if kernel is not None:
            # The namespace's PID 1 first: Linux kills the rest of the namespace, the kernel
            # reaps it, the launcher reaps the kernel and exits.  Killing the launcher first
            # would leave the kernel a zombie for whoever adopts it to reap.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(kernel, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, min(5.0, timeout / 2)))
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

    A clean signal mask, its own session (so a terminal's SIGINT is not sent to it),
    PDEATHSIG, and TMPDIR pointing where its memory file should go.  Popen the kernel with
    :class:`UmlProcess` to also keep its guest processes from outliving a killed host.
    """
    child_env = dict(os.environ if env is None else env)
    if tmpdir is not None:
        child_env["TMPDIR"] = tmpdir
    return {
        "preexec_fn": _child_setup(os.getpid()),
        "start_new_session": True,
        "env": child_env,
        "stderr": subprocess.DEVNULL,
    }


_probe_lock = threading.Lock()
_probed: bool | None = None


def pid_namespace_available() -> bool:
    """Whether UML can run as PID 1 of a private PID namespace here (probed once).

    It needs util-linux's ``unshare`` and the right to make a PID namespace
    (CAP_SYS_ADMIN: root, outside a container that forbids it).  Without them a SIGKILLed
    host process still takes the UML kernel with it (PDEATHSIG), but the guest's own host
    processes may survive it; every other exit path cleans them up (:func:`kill_group`).
    """
    global _probed
    with _probe_lock:
        if _probed is None:
            unshare = shutil.which("unshare")
            _probed = False
            if unshare is not None:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    done = subprocess.run(
                        [unshare, "--pid", "--kill-child", "--", "true"],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, timeout=10,
                    )
                    _probed = done.returncode == 0
        return _probed


class UmlProcess(subprocess.Popen):  # type: ignore[type-arg]
    """A ``subprocess.Popen`` of a UML kernel that takes all its guest's processes with it.

    Why: UML runs every guest process as a host process of its own, and one helper even
    makes a session of its own.  PDEATHSIG kills the kernel with a SIGKILLed host, but not
    those.  So, when :func:`pid_namespace_available` (or ``pid_namespace=True``), the kernel
    runs as PID 1 of a private PID namespace, through ``unshare --pid --kill-child``: the
    kernel dies with the launcher (``--kill-child``), the launcher with the host (the
    PDEATHSIG of :func:`spawn_kwargs`), and when a namespace's PID 1 dies, Linux kills every
    process in it.  Otherwise it is a plain Popen of the kernel.

    ``pid`` is then the launcher's; :meth:`kernel_pid` is the kernel's own (for SIGIO, see
    :class:`SigioNudger`).  The exit status is the kernel's either way (but for a kernel
    killed by a signal: util-linux 2.38's launcher then exits with 1, not -SIGNAL), and
    :func:`kill_group` cleans both up.
    """

    def __init__(self, args: Sequence[str], *, pid_namespace: bool | None = None, **kwargs: Any) -> None:
        if pid_namespace is None:
            pid_namespace = pid_namespace_available()
        self.pid_namespace = pid_namespace
        argv = list(args)
        if pid_namespace:
            unshare = shutil.which("unshare") or "unshare"
            argv = [unshare, "--pid", "--kill-child", "--", *argv]
        super().__init__(argv, **kwargs)
        self._kernel_pid: int | None = None if pid_namespace else self.pid

    def kernel_pid(self) -> int | None:
        """The UML kernel's host pid, or None while the launcher has not forked it yet (or
        if it is gone)."""
        if self._kernel_pid is None:
            for name in os.listdir("/proc"):
                if name.isdigit() and (stat := _stat(int(name))) is not None and int(stat[1]) == self.pid:
                    self._kernel_pid = int(name)
                    break
        return self._kernel_pid


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
