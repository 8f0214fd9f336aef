"""Launching User-Mode Linux guests: finding the kernel and building its command line.

Kept apart from the backends so the console, 9p, virtio and guest-runtime code share one
recipe.  Facts it relies on (Debian's user-mode-linux, kernel 6.1): ``linux.uml`` boots with
the host's root file system through hostfs, runs an ``init=`` script as PID 1, and puts its
physical memory in a file under TMPDIR.

The guest runtime starts UML with :class:`UmlProcess`, in the jail of :mod:`._sandbox`: a
read-only host, an unprivileged uid, PID 1 of a PID namespace of its own, and a launcher that
cleans up after a host process killed with SIGKILL.  Rigs that run UML directly (tests,
benches) use :func:`kernel_command` and :func:`spawn_kwargs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._sandbox import Jail, descendants, launcher_argv, proc_stat

__all__ = [
    "INSTALL_HINT",
    "Jail",
    "JailError",
    "SigioNudger",
    "UmlNotFound",
    "UmlProcess",
    "descendants",
    "find_kernel",
    "guest_ids",
    "jail_namespaces",
    "kernel_command",
    "kill_group",
    "modules_dir",
    "probe_jail",
    "proc_stat",
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
# Resolved here, in the parent: a preexec_fn runs between fork and exec, where loading a
# library (locks, allocation) in a process with threads can deadlock.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _child_setup(parent: int) -> Callable[[], None]:
    """The ``preexec_fn`` of a UML kernel started by process ``parent`` (rigs and benches
    that run UML directly; the guest runtime starts it through its jail, which needs none)."""

    def setup() -> None:
        # UML runs on SIGIO and SIGALRM; a mask inherited from a sigpoll process (which blocks
        # SIGIO and its RT signal) would freeze the guest's interrupts.
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        # If the host process dies without cleaning up (SIGKILL), take the guest with it.
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        # The host may have died between fork and prctl: then no signal will ever come.
        if os.getppid() != parent:
            os._exit(1)

    return setup


def kill_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Kill a UML kernel and every host process of its guest, and wait until they are gone.

    Its guest processes share its process group, but one helper (the one that watches the
    console for SIGWINCH) makes a session of its own, so the kernel's descendants are
    collected from /proc as well.
    """
    import time

    deadline = time.monotonic() + timeout
    if isinstance(proc, UmlProcess) and proc.poll() is None:
        kernel = proc.kernel_pid()
        if kernel is not None and kernel != proc.pid:
            # The jail's PID 1 first: Linux kills the rest of the namespace, the kernel reaps
            # it, the launcher reaps the kernel and exits.  Killing the launcher first would
            # leave the kernel a zombie for whoever adopts it to reap.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(kernel, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, min(5.0, timeout / 2)))
    while True:
        targets = descendants(proc.pid)
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
    if isinstance(proc, UmlProcess):
        proc.release()


def spawn_kwargs(env: Mapping[str, str] | None = None, tmpdir: str | None = None) -> dict[str, Any]:
    """Keyword arguments for subprocess/asyncio spawning of a UML kernel by a test rig.

    A clean signal mask, its own session (so a terminal's SIGINT is not sent to it),
    PDEATHSIG, and TMPDIR pointing where its memory file should go.  The guest runtime does
    not use it: :class:`UmlProcess` starts the kernel in its jail.
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


# -- the jail --------------------------------------------------------------------------------

#: Guest uids and gids are drawn from here: far above any account or subordinate-id range in
#: common use, and a fresh one per guest, so two guests can never signal or trace each other.
GUEST_ID_BASE = 0x60000000
GUEST_ID_SPAN = 1 << 24


def guest_ids() -> tuple[int, int]:
    """A fresh (uid, gid) for one guest: no account, no group, no file of anyone's."""
    import grp
    import pwd
    import secrets

    while True:
        n = GUEST_ID_BASE + secrets.randbelow(GUEST_ID_SPAN)
        try:
            pwd.getpwuid(n)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(n)
            continue
        except KeyError:
            return n, n


class JailError(RuntimeError):
    """The jail for a UML kernel could not be built (``unavailable``: not allowed here)."""

    def __init__(self, message: str, unavailable: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable


_probe_lock = threading.Lock()
_probed: str | None = None


def jail_namespaces() -> str:
    """How this process can make namespaces for a jail: ``"root"``, ``"userns"`` (an
    unprivileged user namespace: probed once, by building a jail for ``true``) or ``"none"``."""
    global _probed
    if os.geteuid() == 0:
        return "root"
    with _probe_lock:
        if _probed is None:
            _probed = "none" if probe_jail("userns") else "userns"
        return _probed


def probe_jail(namespaces: str) -> str | None:
    """Why a confined jail cannot be built here with ``namespaces`` (None: it can)."""
    import tempfile

    true = shutil.which("true") or "/bin/true"
    with tempfile.TemporaryDirectory(prefix="sigpoll-probe-") as tmp:
        jail = Jail(private_dir=tmp, namespaces=namespaces, confine=True)
        try:
            proc = UmlProcess([true], jail=jail, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except OSError as exc:
            return str(exc)
        try:
            proc.wait_started(30)
        except JailError as exc:
            return str(exc)
        finally:
            kill_group(proc)
    return None


_STDERR_KEPT = 8192


class UmlProcess(subprocess.Popen):  # type: ignore[type-arg]
    """A ``subprocess.Popen`` of a UML kernel in its jail (see :mod:`._sandbox`).

    ``pid`` is the jail launcher's; :meth:`kernel_pid` is the kernel's (PID 1 of the jail's
    PID namespace; for SIGIO, see :class:`SigioNudger`).  The exit status is the kernel's
    (a kernel killed by a signal gives ``-SIGNAL``).  The launcher takes the kernel, every
    process of its guest, the private directory and the ``jail.remove`` sockets with it if
    this process dies; :func:`kill_group` cleans both up otherwise.  Call
    :meth:`wait_started` (blocking) to learn whether the jail was built.
    """

    def __init__(self, args: Sequence[str], *, jail: Jail, **kwargs: Any) -> None:
        alive_r, self._alive = os.pipe()
        status_r, status_w = os.pipe()
        self.jail = dataclasses.replace(jail, alive_fd=alive_r, status_fd=status_w)
        pass_fds = [alive_r, status_w] + ([jail.netns_fd] if jail.netns_fd >= 0 else [])
        try:
            super().__init__(launcher_argv(self.jail, args), pass_fds=pass_fds, close_fds=True,
                             start_new_session=True, stderr=subprocess.PIPE, **kwargs)
        except BaseException:
            os.close(self._alive)
            os.close(status_r)
            raise
        finally:
            os.close(alive_r)
            os.close(status_w)
        self._status = status_r
        self._kernel_pid: int | None = None
        # UML says why it will not boot on stderr ("Too few physical memory!"): keep the end.
        self._stderr_tail = bytearray()
        threading.Thread(target=self._read_stderr, name="sigpoll-uml-stderr", daemon=True).start()

    def _read_stderr(self) -> None:
        assert self.stderr is not None
        fd = self.stderr.fileno()
        with contextlib.suppress(OSError, ValueError):
            while chunk := os.read(fd, 4096):
                self._stderr_tail += chunk
                del self._stderr_tail[:-_STDERR_KEPT]

    def stderr_lines(self, count: int = 8) -> list[str]:
        """The last lines UML (or its jail's launcher) wrote to stderr."""
        text = bytes(self._stderr_tail).decode(errors="replace")
        return [line for line in text.strip().splitlines() if line.strip()][-count:]

    def wait_started(self, timeout: float) -> None:
        """Block until UML has started in its jail (or raise :class:`JailError` saying why not,
        or ``TimeoutError``)."""
        import json
        import select
        import time

        deadline = time.monotonic() + timeout
        data = b""
        while self._status >= 0:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._status], [], [], left)[0]:
                raise TimeoutError(f"the guest's jail was not ready in {timeout:g}s")
            chunk = os.read(self._status, 4096)
            if not chunk:
                os.close(self._status)
                self._status = -1
                break
            data += chunk
        error: JailError | None = None
        for line in data.splitlines():
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if "kernel" in message:
                    self._kernel_pid = int(message["kernel"])
                if "error" in message:
                    error = JailError(str(message["error"]), bool(message.get("unavailable")))
        if error is not None:
            raise error
        if self._kernel_pid is None:
            code = self.wait()
            raise JailError(f"the guest's launcher exited with status {code} before starting the kernel")

    def kernel_pid(self) -> int | None:
        """The UML kernel's host pid, or None while it is not known (or if it is gone)."""
        if self._kernel_pid is None:
            for name in os.listdir("/proc"):
                if name.isdigit() and (fields := proc_stat(int(name))) is not None and int(fields[1]) == self.pid:
                    self._kernel_pid = int(name)
                    break
        return self._kernel_pid

    def release(self) -> None:
        """Close the pipes to the launcher (once it is gone; idempotent)."""
        for name in ("_alive", "_status"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


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
