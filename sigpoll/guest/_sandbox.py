"""The jail a UML kernel runs in, and the small launcher that builds it.

Why a jail: UML's hostfs opens host files with the UML process's own rights, and a guest
kernel may do anything that process may do (remount its root read-write, mount any host
path with hostfs, or simply run code of its choosing as that process).  ``ro`` on the kernel
command line only binds a well-behaved guest.  So the UML process itself is confined; what
the guest kernel does inside the guest no longer matters.  The model is Firecracker's jailer
(a mount namespace of its own, a dropped uid/gid, new PID and network namespaces) and
virtiofsd's ``--sandbox namespace``; docs/security.md says what holds and why.

How the pieces fit (``python -I -S _sandbox.py PLAN``, started by :class:`sigpoll.guest._uml.
UmlProcess`; stdlib only, so it starts in a few milliseconds and never imports sigpoll):

- The launcher stays outside the jail.  It makes the PID namespace (through a user namespace
  of its own when it is not root) and forks the kernel as its PID 1.  It watches a pipe
  whose other end only the host process holds: when the host dies, even by SIGKILL, the
  launcher kills the kernel (so Linux kills every process of the guest), removes the guest's
  private directory and its port sockets, and exits.  Otherwise it exits when the kernel
  does, with the kernel's status.
- The kernel process (PID 1) builds the jail and execs UML: a mount namespace where the
  host's tree is read-only, nosuid and nodev (``mount_setattr`` with ``AT_RECURSIVE``), a
  fresh /proc for its PID namespace, a fresh size-limited tmpfs on /run holding the private
  directory at :data:`VIEW_DIR` (bound read-only) and the only writable directory,
  :data:`SCRATCH_DIR` (UML's memory file, its ``uml_dir``, HOME), and ``/dev/net/tun`` when
  the guest has a network; a network namespace of its own (empty, or the host's prepared
  one, passed as an fd); then an unprivileged uid/gid with no supplementary groups, no
  capabilities (bounding set too) and ``no_new_privs``.  UML is exec'd through an fd opened
  before the uid changed, so a kernel binary in a directory only root can search still runs.
- It reports on a status pipe, one JSON object per line: the launcher writes the kernel's
  pid; the kernel process writes an error (``{"error": ..., "unavailable": bool}``) if it
  cannot build the jail.  The pipe closes when UML starts.

Everything made for the jail (the tmpfs, the mount and IPC namespaces, the /proc mount)
belongs to the jail's namespaces and vanishes with its last process: nothing to clean up.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import select
import signal
import stat
import sys
from collections.abc import Sequence
from typing import Any

__all__ = [
    "SCRATCH_DIR",
    "VIEW_DIR",
    "Jail",
    "descendants",
    "launcher_argv",
    "main",
    "proc_stat",
]

#: Where UML sees the guest's private directory (read-only) when it is confined.
VIEW_DIR = "/run/sigpoll"
#: UML's only writable directory when confined: a tmpfs that dies with the jail.
SCRATCH_DIR = "/run/uml"

# Resolved once, when the module is imported: in the host process that is the parent (never
# in a preexec_fn after fork), in the launcher a fresh single-threaded interpreter.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 1, 2, 4
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (Linux 5.12+)
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 24, 38
_TUN_MAJOR, _TUN_MINOR = 10, 200


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


@dataclasses.dataclass
class Jail:
    """What the launcher builds for one UML kernel (it travels as JSON on its command line).

    ``namespaces``: ``"root"`` (we are root and make namespaces directly), ``"userns"`` (not
    root: an unprivileged user namespace first, the guest keeps our own uid) or ``"none"``
    (no namespaces at all).  ``confine``: build the jail (a read-only host, the private
    directory at :data:`VIEW_DIR`, :data:`SCRATCH_DIR`, an unprivileged uid); without it
    UML runs as the invoking user on the host's tree as it is (the trusted mode).
    """

    private_dir: str
    namespaces: str = "root"
    confine: bool = True
    uid: int = -1  #: the guest's uid and gid on the host (root + confine only)
    gid: int = -1
    scratch_bytes: int = 0  #: size of the /run tmpfs (UML's memory file lives there)
    tun: bool = False  #: give UML /dev/net/tun (the guest has a tap device)
    netns_fd: int = -1  #: join this network namespace (else, when confined, a new empty one)
    nproc: int = 0  #: RLIMIT_NPROC for the guest's uid (0: leave it)
    remove: list[str] = dataclasses.field(default_factory=list)  #: sockets to remove if the host dies
    alive_fd: int = -1  #: read end of the pipe only the host holds the write end of
    status_fd: int = -1  #: write end of the status pipe

    @property
    def view_dir(self) -> str:
        """The private directory as UML sees it."""
        return VIEW_DIR if self.confine else self.private_dir

    @property
    def scratch_dir(self) -> str:
        """UML's writable directory (TMPDIR, uml_dir, HOME) as UML sees it."""
        return SCRATCH_DIR if self.confine else os.path.join(self.private_dir, "uml")


def launcher_argv(jail: Jail, kernel_argv: Sequence[str]) -> list[str]:
    """The command that builds ``jail`` and runs ``kernel_argv`` in it."""
    plan = {"jail": dataclasses.asdict(jail), "argv": list(kernel_argv)}
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(plan)]


# -- used by the launcher and by the host (sigpoll.guest._uml.kill_group) ------------------


def proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), or
    None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields follow the last ')'.
    return data[data.rindex(b")") + 2 :].split()


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid``, from /proc (taken before anything is killed:
    orphans are reparented and the link is lost)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := proc_stat(int(name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


# -- the launcher --------------------------------------------------------------------------


class _JailError(Exception):
    def __init__(self, message: str, unavailable: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable


def _check(result: int, what: str, *, unavailable: bool = False) -> None:
    if result < 0:
        err = ctypes.get_errno()
        # EPERM/EINVAL/ENOSPC/ENOSYS from namespaces mean "not allowed here", not a bug.
        raise _JailError(f"{what}: {os.strerror(err)}",
                         unavailable and err in (errno.EPERM, errno.EINVAL, errno.ENOSPC, errno.ENOSYS,
                                                 errno.EACCES, errno.EUSERS))


def _unshare(flags: int, what: str) -> None:
    _check(_libc.unshare(flags), what, unavailable=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode()), f"mount {target}")


def _mount_setattr(path: str, set_: int, *, recursive: bool) -> None:
    attr = _MountAttr(set_, 0, 0, 0)
    flags = _AT_RECURSIVE if recursive else 0
    result = _libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, path.encode(), flags, ctypes.byref(attr),
                           ctypes.sizeof(attr))
    _check(result, f"mount_setattr {path} (needs Linux 5.12 or later)", unavailable=True)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _report(fd: int, **message: Any) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, (json.dumps(message) + "\n").encode())


def _drop_bounding_set() -> None:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 40
    for cap in range(last + 1):
        _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)


def _build_jail(jail: Jail) -> None:
    """In the kernel process: the mount, IPC and network namespaces, the mounts, the ids."""
    if jail.confine:
        _unshare(_CLONE_NEWNS | _CLONE_NEWIPC | (0 if jail.netns_fd >= 0 else _CLONE_NEWNET),
                 "unshare the mount, IPC and network namespaces")
    if jail.netns_fd >= 0:
        _check(_libc.setns(jail.netns_fd, _CLONE_NEWNET), "join the guest's network namespace")
        os.close(jail.netns_fd)
    if not jail.confine:
        return
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    # Every mount of the host, recursively: nothing can be written, no setuid or device node
    # works.  The flags are on this namespace's copies; the host's mounts are untouched.
    _mount_setattr("/", _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, recursive=True)
    # /proc of this PID namespace: the guest's own processes and no host process.
    _mount("proc", "/proc", "proc", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    # UML checks at boot that ptys deliver SIGIO (it opens one through /dev/ptmx) and works
    # around them if not; the host's ptys are out of reach now, so a devpts of the jail's own
    # (a few ptys, none of the host's) keeps UML on its normal path.
    _mount("devpts", "/dev/pts", "devpts", _MS_NOSUID | _MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,max=16")
    _mount("/dev/pts/ptmx", "/dev/ptmx", None, _MS_BIND)
    # /run: a tmpfs of the jail's own.  It hides the host's /run (its sockets) and holds the
    # only writable directory, bounded in size and gone with the jail's mount namespace.
    if not os.path.isdir("/run"):
        raise _JailError("the host has no /run directory to mount the guest's tmpfs on")
    size = max(jail.scratch_bytes, 16 << 20)
    _mount("tmpfs", "/run", "tmpfs", _MS_NOSUID, f"size={size},nr_inodes=4096,mode=0755")
    os.mkdir(VIEW_DIR, 0o755)
    _mount(jail.private_dir, VIEW_DIR, None, _MS_BIND)  # a copy of a read-only mount: read-only
    os.mkdir(SCRATCH_DIR, 0o700)
    if jail.namespaces == "root":
        os.chown(SCRATCH_DIR, jail.uid, jail.gid)
    if jail.tun:
        # UML opens /dev/net/tun itself; the host's node is root's.  Like the jailer: a node of
        # the jail's own, owned by the guest's uid (the tap device is owned by it as well).
        node = "/run/.tun"
        os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(_TUN_MAJOR, _TUN_MINOR))
        os.chown(node, jail.uid, jail.gid)
        if not os.path.exists("/dev/net/tun"):
            raise _JailError("the host has no /dev/net/tun (needed for the guest's network)")
        _mount(node, "/dev/net/tun", None, _MS_BIND)
    # The tun bind above keeps /run's device rights; nothing else on /run gets any.
    _mount_setattr("/run", _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, recursive=False)
    _drop_bounding_set()
    if jail.namespaces == "root":
        if jail.nproc > 0:
            import resource

            resource.setrlimit(resource.RLIMIT_NPROC, (jail.nproc, jail.nproc))
        os.setgroups([])
        os.setresgid(jail.gid, jail.gid, jail.gid)
        os.setresuid(jail.uid, jail.uid, jail.uid)  # clears every capability
    # (In a user namespace the uid already is ours and not 0 there: exec drops the
    # capabilities the namespace gave, and the supplementary groups cannot be dropped.)
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def _kernel(jail: Jail, argv: list[str], launcher_alive: int) -> None:
    """The kernel process (PID 1 of the jail's PID namespace): build the jail, exec UML."""
    try:
        # Before anything: the kernel's binary, opened while we may still search any directory.
        kernel_fd = os.open(argv[0], os.O_RDONLY)
        os.set_inheritable(kernel_fd, True)  # a script (the tests' fake kernel) reads it via /dev/fd
        _build_jail(jail)
        scratch = jail.scratch_dir
        os.makedirs(scratch, mode=0o700, exist_ok=True)
        os.chdir(scratch)
        # The death signal is cleared by a uid change, so it is set after the last one; then
        # make sure the launcher did not die before it was set.
        _check(_libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "PDEATHSIG")
        if select.select([launcher_alive], [], [], 0)[0]:
            os._exit(1)
        os.close(launcher_alive)
        os.set_inheritable(jail.status_fd, False)  # closes when UML starts: the host's "started"
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": scratch, "TMPDIR": scratch, "TERM": os.environ.get("TERM", "dumb")}
        os.execve(kernel_fd, argv, env)
    except _JailError as exc:
        _report(jail.status_fd, error=str(exc), unavailable=exc.unavailable)
    except OSError as exc:
        _report(jail.status_fd, error=f"{exc.filename or argv[0]}: {exc.strerror or exc}")
    except BaseException as exc:  # the host shows it; never a traceback on the console
        _report(jail.status_fd, error=f"{type(exc).__name__}: {exc}")
    os._exit(127)


def _enter_user_namespace() -> None:
    uid, gid = os.geteuid(), os.getegid()
    _unshare(_CLONE_NEWUSER | _CLONE_NEWPID, "unshare a user and a PID namespace (unprivileged)")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write("/proc/self/gid_map", f"{gid} {gid} 1\n")


def _exit_like(status: int) -> None:
    """Exit as the kernel did: its exit code, or death by the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
            os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _host_gone(jail: Jail, pid: int) -> None:
    """The host died without cleaning up: do it for it."""
    import shutil

    stray = descendants(pid) if jail.namespaces == "none" else set()
    for victim in (pid, *stray):
        with contextlib.suppress(OSError):
            os.kill(victim, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    shutil.rmtree(jail.private_dir, ignore_errors=True)
    for path in jail.remove:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
    os._exit(1)


def main(argv: Sequence[str]) -> None:
    plan = json.loads(argv[0])
    jail = Jail(**plan["jail"])
    kernel_argv = list(plan["argv"])
    # A sigpoll host blocks SIGIO and its real-time signal; UML runs on SIGIO and SIGALRM.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        if jail.namespaces == "root":
            _unshare(_CLONE_NEWPID, "unshare a PID namespace")
        elif jail.namespaces == "userns":
            _enter_user_namespace()
    except (_JailError, OSError) as exc:
        _report(jail.status_fd, error=str(exc), unavailable=True)
        os._exit(127)
    launcher_alive, launcher_alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(launcher_alive_w)
        os.close(jail.alive_fd)
        _kernel(jail, kernel_argv, launcher_alive)
    os.close(launcher_alive)
    if jail.netns_fd >= 0:
        os.close(jail.netns_fd)
    _report(jail.status_fd, kernel=pid)
    os.close(jail.status_fd)
    # Let go of the guest's console, so it closes when the kernel does.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    kernel = os.pidfd_open(pid)
    while True:
        ready = select.select([jail.alive_fd, kernel], [], [])[0]
        if kernel in ready:
            _, status = os.waitpid(pid, 0)
            _exit_like(status)
        if jail.alive_fd in ready:
            _host_gone(jail, pid)


if __name__ == "__main__":
    main(sys.argv[1:])
