"""A User-Mode Linux guest whose console is a sigpoll console."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from .. import tty as stty
from .._cli import format_size, parse_size, port_name
from . import _uml
from ._netns import NetNamespace, NetnsUnavailable
from ._init_script import (
    GUEST_DIR,
    PORTS_DIR,
    SHARE_OPTIONS,
    CommandScanner,
    command_line,
    command_text,
    init_script,
    interactive_line,
    interrupt_line,
    port_setup,
    reap_line,
    share_mount_lines,
    share_setup,
)

__all__ = ["MIN_MEM", "BootError", "CommandResult", "Guest", "GuestError", "physical_memory"]

log = logging.getLogger("sigpoll.guest")

class GuestError(RuntimeError):
    """The guest could not do what was asked (it is not running, or it died)."""


class BootError(GuestError):
    """The guest did not come up: UML is missing, or the kernel refused to boot."""


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """What a command run in the guest returned."""

    status: int
    output: bytes


StatusCallback = Callable[[str], None]

#: 9P message size for shares: large reads and writes in few round trips.
SHARE_MSIZE = 512 * 1024
_SHARE_PORT = 5640
# Ports that carry shares when share_via="virtio" are named this plus the share's tag.
_SHARE_PORT_PREFIX = "sigpoll-9p-"
_VHOST_SOCKET = "virtio-console.sock"
# A jailed guest's uid may run this many host processes (UML makes one per guest process):
# a fork bomb in the guest stops there, not at the host's limit.
_GUEST_NPROC = 4096
# How long an interrupted command may take to be confirmed gone.
_INTERRUPT_TIMEOUT = 10.0
# How long cleanup waits for one server or task to close before it moves on.
_CLOSE_TIMEOUT = 5.0


# How long a kernel whose console closed may take to be reported as exited.
_EXIT_GRACE = 5.0


def _wait_briefly(proc: _uml.UmlProcess, timeout: float) -> int | None:
    """``proc``'s exit status if it exits within ``timeout`` seconds, else None."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _usable_by_anyone(path: str) -> bool:
    """Whether a user with no groups in common with any owner can reach and run ``path``."""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            if parent == os.path.dirname(parent):
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def _guest_python(jail: _uml.Jail) -> str:
    """A Python the guest can run for the 9P relay: this one, if the jailed guest may use it
    (with its standard library), else the system's."""
    jailed = jail.confine and jail.namespaces == "root"
    ours = os.path.realpath(sys.executable)
    if not jailed or (_usable_by_anyone(ours) and _usable_by_anyone(os.path.join(sys.base_prefix, "lib"))):
        return ours
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if os.path.exists(candidate) and _usable_by_anyone(candidate):
            return candidate
    raise BootError(f"shares over virtio run a relay with Python in the guest, and its jail cannot use {ours}; "
                    "install the system's python3")


def _socket_error(exc: OSError) -> str:
    if "too long" in str(exc):
        return ("the path is longer than a unix socket's 107 bytes (for the guest's own sockets, "
                "set TMPDIR to a shorter directory)")
    return exc.strerror or str(exc)


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _parse_share(share: str | tuple[str, str]) -> tuple[str, str]:
    """``HOSTDIR``, ``HOSTDIR:TAG`` or ``(HOSTDIR, TAG)`` -> (absolute dir, tag)."""
    if isinstance(share, tuple):
        path, tag = share
    else:
        path, _, tag = share.partition(":")
    path = os.path.abspath(path)
    tag = tag or os.path.basename(path.rstrip("/")) or "root"
    if not os.path.isdir(path):
        raise ValueError(f"share {path!r} is not a directory")
    if not tag.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"share tag {tag!r}: use letters, digits, '-', '_' or '.'")
    return path, tag


def _parse_port(spec: str | tuple[str, str | None]) -> tuple[str, str | None]:
    """``NAME``, ``NAME=unix:PATH`` or ``(NAME, PATH or None)`` -> (name, absolute path or None)."""
    if isinstance(spec, tuple):
        name, path = spec
    else:
        name, sep, where = spec.partition("=")
        path = None
        if sep:
            if not where.startswith("unix:") or len(where) <= 5:
                raise ValueError(f"port {spec!r}: expected NAME or NAME=unix:PATH")
            path = where[5:]
    port_name(name)  # the rule every command shares
    return name, os.path.abspath(path) if path else None


#: UML does not boot with less (its own minimum is lower, but then the guest's init fails).
MIN_MEM = 32 << 20
# The jail's /run tmpfs holds UML's memory file (mem bytes) and its uml_dir: room for both.
_SCRATCH_EXTRA = 64 << 20


def physical_memory() -> int:
    """This machine's memory in bytes (0 if unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0


def _parse_mem(mem: str | int) -> int:
    """Guest memory (``256M``, ``1G``, ``65536K`` or a number of bytes) -> bytes, checked
    against what UML needs and what this machine has."""
    try:
        size = mem if isinstance(mem, int) else parse_size(mem)
    except ValueError as exc:
        raise ValueError(f"mem: {exc}") from None
    if size < MIN_MEM:
        raise ValueError(f"mem {format_size(size)}: the guest needs at least {format_size(MIN_MEM)}")
    physical = physical_memory()
    if physical and size > physical:
        raise ValueError(f"mem {format_size(size)}: more than this machine's {format_size(physical)} of memory")
    return size


class Guest:
    """A User-Mode Linux guest on the host's root file system, its console on a sigpoll pty.

    Use it as ``async with Guest() as g: result = await g.run("uname -a")``.  Everything the
    guest leaves on the host (its processes, its pty, its init script and command files in a
    private temporary directory, its port sockets, its network) is removed on every exit
    path, exceptions and cancellation included, and by the jail's launcher if this process
    is killed.

    The guest boots on the host's root file system, and never gets host privilege: UML runs
    in a jail (see :mod:`._sandbox` and docs/security.md) where the host's tree is read-only,
    root-only files are unreadable and the only writable place is a tmpfs of the jail's own.
    ``read_only=False`` (``--rw``) is the trusted mode: UML runs unconfined as the invoking
    user, whose files the guest may then change; it logs a warning.  As a user who is not
    root the jail needs unprivileged user namespaces; without them the guest runs unconfined
    (with a warning) as that user.

    ``shares`` (``HOSTDIR[:TAG]``) are mounted at /mnt/TAG over 9P, served by sigpoll's
    9P server: over a private network (``share_via="net"``, needs root) or over a
    virtio-console port each (``share_via="virtio"``, through a relay in the guest).

    ``ports`` adds virtio-console ports (``NAME`` or ``NAME=unix:PATH``): the guest sees
    each at /dev/virtio-ports/NAME, the host gets a unix socket (:meth:`port_path`; by
    default in the private directory) that one client at a time can use, or a stream pair
    from :meth:`open_port`.
    """

    def __init__(
        self,
        *,
        kernel: str | None = None,
        mem: str | int = "256M",
        read_only: bool = True,
        setup: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        boot_timeout: float = 60.0,
        status: StatusCallback | None = None,
        shares: Sequence[str | tuple[str, str]] = (),
        ports: Sequence[str | tuple[str, str | None]] = (),
        share_via: str = "net",
    ) -> None:
        if share_via not in ("net", "virtio"):
            raise ValueError(f"share_via must be 'net' or 'virtio', not {share_via!r}")
        self.share_via = share_via
        self.shares = [_parse_share(share) for share in shares]
        tags = [tag for _, tag in self.shares]
        if len(set(tags)) != len(tags):
            raise ValueError(f"share tags must differ: {tags}")
        self.ports = [_parse_port(port) for port in ports]
        names = [name for name, _ in self.ports]
        if share_via == "virtio":
            names += [_SHARE_PORT_PREFIX + tag for tag in tags]
        if len(set(names)) != len(names):
            raise ValueError(f"port names must differ: {names}")
        paths = [path for _, path in self.ports if path]
        if len(set(paths)) != len(paths):
            raise ValueError(f"port sockets must differ: {paths}")
        self.kernel = kernel
        self.mem_bytes = _parse_mem(mem)
        self.mem = format_size(self.mem_bytes)  # as UML takes it
        if not boot_timeout > 0:
            raise ValueError(f"boot_timeout must be a positive number of seconds, not {boot_timeout!r}")
        self.read_only = read_only
        self.setup = list(setup)
        self.extra_args = list(extra_args)
        self.boot_timeout = boot_timeout
        self._status = status or (lambda message: None)
        self._token = secrets.token_hex(8)
        self._tmp: str | None = None
        self._proc: _uml.UmlProcess | None = None
        self._jail: _uml.Jail | None = None
        self._kernel_pid: int | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._transport: stty.ConsoleTransport | None = None
        self._nudger: _uml.SigioNudger | None = None
        self._boot_log = b""
        self._netns: NetNamespace | None = None
        self._servers: list[Any] = []
        self._port_sockets: dict[str, Any] = {}  # name -> sigpoll.virtio.PortSocket
        self._virtio_tasks: list[asyncio.Future[Any]] = []
        self._backend: Any = None
        self._lock = asyncio.Lock()
        self._commands = 0
        self._interrupted: int | None = None  # a command killed whose end is not yet seen
        self._unusable = ""  # why the guest can take no more commands
        self.boot_seconds: float | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The UML kernel's host process id while the guest runs (PID 1 of its jail's PID
        namespace; see docs/guest.md, "Cleanup")."""
        return self._kernel_pid if self._proc is not None else None

    @property
    def tmpdir(self) -> str | None:
        """The private directory holding the guest's init script, command files and sockets
        (the guest reads it at /run/sigpoll and cannot write it)."""
        return self._tmp

    @property
    def confined(self) -> bool | None:
        """Whether UML runs in its jail (None while the guest is not running)."""
        return self._jail.confine if self._jail is not None else None

    def copy_in(self, path: str | os.PathLike[str]) -> str:
        """Copy host file ``path`` where the guest can read it; return the guest's path.

        The guest sees the host's root, but not every host path: a guest with a read-only
        root puts its own tmpfs over /tmp, hiding the host's /tmp (and a project checked
        out there), and its jail hides whatever the guest's user may not read.  The copy
        goes into the guest's private directory, which the guest sees at /run/sigpoll
        whatever covers /tmp.  Call it once the guest has started (or from a boot step);
        the copy lives as long as the guest.
        """
        if self._tmp is None:
            raise GuestError("the guest is not running")
        files = os.path.join(self._tmp, "files")
        os.makedirs(files, mode=0o755, exist_ok=True)
        name = os.path.basename(os.fspath(path))
        target = os.path.join(files, name)
        shutil.copyfile(path, target)
        os.chmod(target, 0o644)  # readable by the jailed guest, whatever the umask
        return f"{GUEST_DIR}/files/{name}"

    async def start(self) -> None:
        """Boot the guest and wait until its init is ready for commands."""
        if self._proc is not None:
            raise GuestError("the guest is already running")
        try:
            kernel = _uml.find_kernel(self.kernel)
        except _uml.UmlNotFound as exc:
            raise BootError(str(exc)) from None
        try:
            await self._boot(kernel)
        except BaseException:
            await self._cleanup()
            raise

    async def _plan_jail(self, tmp: str) -> _uml.Jail:
        """Decide how UML is confined, and give the private directory to the guest's ids."""
        namespaces = await asyncio.to_thread(_uml.jail_namespaces)
        confine = self.read_only
        user = _user_name()
        if not confine:
            log.warning("read_only=False (--rw) trusts the guest: UML runs unconfined as %s, and the guest "
                        "can change any host file %s can", user, user)
        elif namespaces == "none":
            log.warning("this machine allows no unprivileged user namespaces, so the guest cannot be "
                        "jailed: UML runs unconfined as %s and the guest can read and change what %s can", user, user)
            confine = False
        jail = _uml.Jail(private_dir=tmp, namespaces=namespaces, confine=confine,
                         scratch_bytes=self.mem_bytes + _SCRATCH_EXTRA)
        if confine and namespaces == "root":
            jail.uid, jail.gid = _uml.guest_ids()
            jail.nproc = _GUEST_NPROC
            # The guest reads its directory through its gid; it writes nothing there, and no
            # other user sees in.
            os.chown(tmp, -1, jail.gid)
            os.chmod(tmp, 0o750)
        if not confine:
            os.mkdir(os.path.join(tmp, "uml"), 0o700)  # UML's uml_dir and memory file
        return jail

    async def _start_shares(self, jail: _uml.Jail) -> tuple[list[str], list[str]]:
        """Serve each share with sigpoll's 9P server inside a private network namespace.

        Returns the guest's extra kernel arguments and its init lines; the jail gets the
        namespace (and /dev/net/tun).  (Why a network and not a serial line: see
        sigpoll.guest._netns.)
        """
        if not self.shares or self.share_via != "net":
            return [], []
        from ..ninep import NinepServer

        modules = _uml.modules_dir()
        if modules is None:
            raise BootError(f"UML's kernel modules are missing (needed for shares); {_uml.INSTALL_HINT}")
        if os.geteuid() != 0:
            raise BootError("shares over a private network need root; share_via='virtio' "
                            "(--share-via virtio) carries them without it")
        owner = (jail.uid, jail.gid) if jail.confine else None
        try:
            self._netns = ns = await asyncio.to_thread(NetNamespace, owner=owner)
        except NetnsUnavailable as exc:
            raise BootError(f"shares need a private network namespace: {exc}") from None
        jail.netns_fd = ns.fd
        jail.tun = jail.confine
        mounts = []
        for i, (path, tag) in enumerate(self.shares):
            # Only the guest kernel's own mount (from a privileged port, see share_setup) may
            # speak to it: a guest user's client could attach claiming any uid.
            server = NinepServer(path, msize=SHARE_MSIZE, require_privileged_port=True)
            self._servers.append(server)
            await server.start_socket(ns.listen(_SHARE_PORT + i))
            mounts.append((tag, ns.host_address, _SHARE_PORT + i))
            self._status(f"share {path} -> /mnt/{tag} (9P over a private network)")
        setup = ns.guest_setup() + share_setup(modules, mounts, SHARE_MSIZE)
        return ns.guest_args(), setup

    def port_path(self, name: str) -> str:
        """The host-side unix socket of port ``name`` (valid while the guest runs)."""
        if name not in self._port_sockets:
            known = [n for n, _ in self.ports]
            raise KeyError(f"no port {name!r} (ports: {known})" if self._tmp else "the guest is not running")
        return str(self._port_sockets[name].path)

    async def open_port(self, name: str, *, limit: int = 1 << 20) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to port ``name``'s socket: what the host writes, the guest reads at
        /dev/virtio-ports/NAME, and the other way round.  The guest closing the port ends
        the stream (EOF after everything it wrote); one connection at a time.  It returns
        once the port's host side is open, so a guest that reads the port from then on sees
        this connection's bytes, not an end of file for want of a host."""
        ps = self._port_sockets.get(name)
        served = ps.clients if ps is not None else 0
        streams = await asyncio.open_unix_connection(self.port_path(name), limit=limit)
        deadline = time.monotonic() + _CLOSE_TIMEOUT
        while ps is not None and ps.clients == served and time.monotonic() < deadline:
            await asyncio.sleep(0.005)  # the port's server accepts in a task of its own
        return streams

    def _start_ports(self, jail: _uml.Jail) -> tuple[list[str], list[str]]:
        """Serve a virtio console whose named ports are the guest's ports, each exposed as a
        unix socket.  Returns the guest's extra kernel arguments and its init lines."""
        share_tags = [tag for _, tag in self.shares] if self.share_via == "virtio" else []
        if not self.ports and not share_tags:
            return [], []
        from ..virtio import ConsoleDevice, PortSocket, VhostUserBackend, ninep_mount_command, serve_ninep
        from ..virtio._services import RELAY_SCRIPT

        modules = _uml.modules_dir()
        if modules is None or not os.path.exists(os.path.join(modules, "kernel/drivers/char/virtio_console.ko")):
            raise BootError(f"UML's virtio_console module is missing (needed for ports); {_uml.INSTALL_HINT}")
        assert self._tmp is not None
        names = [name for name, _ in self.ports]
        device = ConsoleDevice(names + [_SHARE_PORT_PREFIX + tag for tag in share_tags], multiport=True, size=None)
        jailed_uid = jail.uid if jail.confine and jail.namespaces == "root" else None
        self._backend = backend = VhostUserBackend(device, allow_uids=() if jailed_uid is None else (jailed_uid,))
        sock = os.path.join(self._tmp, _VHOST_SOCKET)
        try:
            backend.listen(sock)
        except OSError as exc:
            raise BootError(f"cannot listen on {sock}: {_socket_error(exc)}") from None
        if jailed_uid is not None:
            os.chown(sock, jailed_uid, jail.gid)  # still mode 0600: that uid, us and root
        ports_dir = os.path.join(self._tmp, "ports")
        os.makedirs(ports_dir, mode=0o700, exist_ok=True)  # the host's side only
        for port, (name, path) in zip(device.ports[1:], self.ports):
            ps = PortSocket(port, path or os.path.join(ports_dir, f"{name}.sock"))
            try:
                ps.listen()
            except OSError as exc:
                raise BootError(f"port {name}: cannot listen on {ps.path}: {_socket_error(exc)}") from None
            self._port_sockets[name] = ps
            if path:
                jail.remove.append(path)  # outside the private directory: the launcher's to remove
        self._virtio_tasks = [asyncio.ensure_future(backend.serve())]
        self._virtio_tasks += [asyncio.ensure_future(ps.serve()) for ps in self._port_sockets.values()]
        for name, ps in self._port_sockets.items():
            self._status(f"port {name}: host unix:{ps.path} <-> guest {PORTS_DIR}/{name}")
        setup = port_setup(modules, names + [_SHARE_PORT_PREFIX + tag for tag in share_tags])
        if share_tags:
            from ..ninep import NinepServer

            mounts = []
            relay = self.copy_in(RELAY_SCRIPT)
            python = _guest_python(jail)
            for port, (path, tag) in zip(device.ports[1 + len(names):], self.shares):
                server = NinepServer(path, msize=SHARE_MSIZE)
                self._servers.append(server)
                self._virtio_tasks.append(asyncio.ensure_future(serve_ninep(port, server)))
                argv = ninep_mount_command(f"{PORTS_DIR}/{port.name}", f"/mnt/{tag}", msize=SHARE_MSIZE,
                                           relay=relay, python=python, options=SHARE_OPTIONS)
                mounts.append((tag, shlex.join(argv)))
                self._status(f"share {path} -> /mnt/{tag} (9P over a virtio port)")
            setup += share_mount_lines(modules, mounts)
        return [f"virtio_uml.device={jail.view_dir}/{_VHOST_SOCKET}:3"], setup

    async def _boot(self, kernel: str) -> None:
        self._tmp = tempfile.mkdtemp(prefix="sigpoll-guest-")
        self._jail = jail = await self._plan_jail(self._tmp)
        port_args, port_lines = self._start_ports(jail)
        share_args, share_lines = await self._start_shares(jail)
        init = os.path.join(self._tmp, "init.sh")
        with open(init, "w") as f:
            f.write(
                init_script(
                    self._token, host_dir=jail.view_dir, read_only=self.read_only,
                    setup=port_lines + share_lines + self.setup, setuid_off=jail.namespaces == "userns",
                )
            )
        os.chmod(init, 0o755)
        master, path = stty.open_pty()
        slave = os.open(path, os.O_RDWR | os.O_NOCTTY)
        argv = _uml.kernel_command(
            f"{jail.view_dir}/init.sh", kernel=kernel, mem=self.mem, read_only=self.read_only,
            extra=[f"uml_dir={jail.scratch_dir}", *port_args, *share_args, *self.extra_args],
        )
        how = "jailed" if jail.confine else "unconfined"
        self._status(f"booting {kernel} ({self.mem}, console {path}, {how})")
        t0 = time.monotonic()
        try:
            self._proc = _uml.UmlProcess(argv, jail=jail, stdin=slave, stdout=slave)
        except OSError as exc:
            os.close(master)
            raise BootError(f"cannot start {kernel}: {exc.strerror}") from None
        finally:
            os.close(slave)
        try:
            await asyncio.to_thread(self._proc.wait_started, self.boot_timeout)
        except (_uml.JailError, TimeoutError) as exc:
            os.close(master)
            raise BootError(f"cannot start the guest in its jail: {exc}") from None
        kernel_pid = self._proc.kernel_pid()
        assert kernel_pid is not None
        self._kernel_pid = kernel_pid
        # Large enough to hold a whole boot log or command output while we look for markers.
        self._reader, self._writer = await stty.open_console(master, limit=1 << 26)
        transport = self._writer.transport
        assert isinstance(transport, stty.ConsoleTransport)
        self._transport = transport
        self._nudger = _uml.SigioNudger(
            asyncio.get_running_loop(),
            kernel_pid,
            lambda: transport.bytes_read + transport.bytes_written,
        )
        self._nudger.start()
        ready = f"@@{self._token}:READY@@\n".encode()
        try:
            self._boot_log = await asyncio.wait_for(self._reader.readuntil(ready), self.boot_timeout)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            partial = exc.partial if isinstance(exc, asyncio.IncompleteReadError) else b""
            code = self._proc.poll()
            if code is None and isinstance(exc, asyncio.IncompleteReadError):
                # The console closed: the kernel is gone or going, but its launcher reports
                # its status a moment later.  Wait for that (bounded) before saying which.
                code = await asyncio.to_thread(_wait_briefly, self._proc, _EXIT_GRACE)
            tail = partial.decode(errors="replace").strip().splitlines()[-8:]
            tail += self._proc.stderr_lines()
            why = f"exited with status {code}" if code is not None else f"not ready after {self.boot_timeout:g}s"
            raise BootError(f"the guest kernel {why}" + ("; last lines:\n  " + "\n  ".join(tail) if tail else "")) from None
        self.boot_seconds = time.monotonic() - t0
        failed = [tag for _, tag in self.shares if f"@@SHARE-FAILED:{tag}@@".encode() in self._boot_log]
        if failed:
            raise BootError(f"the guest could not mount shares {failed}")
        missing = [name for name, _ in self.ports if f"@@PORT-FAILED:{name}@@".encode() in self._boot_log]
        if missing:
            raise BootError(f"the guest did not see ports {missing}")
        self._status(f"guest up in {self.boot_seconds:.1f}s")

    async def stop(self, timeout: float = 20.0) -> int | None:
        """Power the guest off (forcefully after ``timeout``) and clean up.  Idempotent."""
        code = None
        if self._proc is not None and self._proc.poll() is None and self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.write(b"echo o > /proc/sysrq-trigger\n")
            with contextlib.suppress(asyncio.TimeoutError):
                code = await asyncio.wait_for(asyncio.to_thread(self._proc.wait), timeout)
        await self._cleanup()
        return code

    async def _cleanup(self) -> None:
        """Remove everything of the guest, most important first: a step that hangs (a share
        server stuck in a host call) must not keep the rest of the guest alive."""
        if self._nudger is not None:
            self._nudger.stop()
            self._nudger = None
        proc, self._proc = self._proc, None
        self._kernel_pid = None
        if proc is not None:
            # UML runs its guest processes as host children in its process group: take them
            # all, whether the kernel already exited or not.
            await asyncio.to_thread(_uml.kill_group, proc)
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer.wait_closed(), 5)
            self._writer = self._reader = None
            self._transport = None
        if self._backend is not None:
            self._backend.stop()
            self._backend = None
        for task in self._virtio_tasks:
            task.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._virtio_tasks, return_exceptions=True), _CLOSE_TIMEOUT)
        self._virtio_tasks = []
        for ps in self._port_sockets.values():
            ps.close()  # removes its socket file, wherever it is
        self._port_sockets = {}
        if self._netns is not None:
            self._netns.close()  # its last users are the servers' sockets, closed below
            self._netns = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._jail = None
        servers, self._servers = self._servers, []
        for server in servers:
            try:
                await asyncio.wait_for(server.close(), _CLOSE_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning("a share server did not close in %gs (a call stuck in the host); left behind",
                            _CLOSE_TIMEOUT)
            except Exception as exc:  # cleanup goes on; say what went wrong
                log.warning("closing a share server failed: %s", exc)

    async def __aenter__(self) -> Guest:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- commands ------------------------------------------------------------------------

    def _require_running(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._proc is None:
            raise GuestError("the guest is not running")
        return self._reader, self._writer

    async def run(
        self,
        command: str | Sequence[str],
        *,
        output: Callable[[bytes], Any] | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        """Run a command in the guest; return its exit status and output (stdout+stderr).

        ``output`` is called with each piece of output as it arrives (then the result's
        ``output`` is empty, so gigabytes can stream through).  A string is run by the
        guest's shell; a list is quoted first.  After ``timeout`` seconds the command and
        everything it started in its session are killed and ``TimeoutError`` is raised; a
        cancelled run kills it too.  Each command's output and status are its own: nothing
        of an interrupted command reaches the next one.  If the guest does not answer an
        interruption, it is unusable: every later ``run`` raises :class:`GuestError`.
        """
        async with self._lock:
            reader, writer = self._require_running()
            assert self._tmp is not None
            if self._unusable:
                raise GuestError(self._unusable)
            if self._interrupted is not None:
                await self._settle(reader, self._interrupted)
            self._commands += 1
            number = self._commands
            name = f"command-{number}.sh"
            with open(os.path.join(self._tmp, name), "w") as f:
                f.write(command_text(command))
            os.chmod(os.path.join(self._tmp, name), 0o644)  # the jailed guest reads it
            scanner = CommandScanner(self._token, number)
            collected = bytearray()
            writer.write(command_line(self._token, number, f"{GUEST_DIR}/{name}"))

            async def collect() -> int:
                while scanner.status is None:
                    data = await reader.read(1 << 16)
                    if not data:
                        raise GuestError("the guest's console closed while a command ran")
                    chunk = scanner.feed(data)
                    if chunk:
                        if output is not None:
                            output(chunk)
                        else:
                            collected.extend(chunk)
                return scanner.status

            try:
                status = await asyncio.wait_for(collect(), timeout)
            except BaseException as exc:
                if self._writer is not None and not isinstance(exc, GuestError):
                    # Timed out or cancelled: kill it now; the next command (or this
                    # timeout) waits for the guest to confirm.
                    self._writer.write(interrupt_line(self._token, number))
                    self._interrupted = number
                if isinstance(exc, asyncio.TimeoutError):
                    await self._settle(reader, number)
                    raise asyncio.TimeoutError(f"the command did not finish in {timeout:g}s; it was killed") from None
                raise
            writer.write(reap_line(number))
            return CommandResult(status, bytes(collected))

    async def _settle(self, reader: asyncio.StreamReader, number: int) -> None:
        """Wait until interrupted command ``number`` is gone (its exit or kill marker), or
        mark the guest unusable."""
        scanner = CommandScanner(self._token, number)
        scanner.started = True  # whatever it still prints is dropped

        async def drain() -> None:
            while not scanner.done:
                data = await reader.read(1 << 16)
                if not data:
                    raise GuestError("the guest's console closed")
                scanner.feed(data)

        try:
            await asyncio.wait_for(drain(), _INTERRUPT_TIMEOUT)
        except (asyncio.TimeoutError, GuestError):
            self._unusable = (f"the guest did not answer within {_INTERRUPT_TIMEOUT:g}s after command "
                              f"{number} was interrupted; it is unusable (stop it)")
            raise GuestError(self._unusable) from None
        self._interrupted = None

    async def interact(self, escape: int = 0x1D) -> str:
        """Attach the user's terminal to an interactive shell in the guest.

        Returns why it ended: ``"detached"`` (the escape key; the guest keeps running until
        :meth:`stop`) or the console closing (the shell exited and the guest powered off).
        """
        from ..console import Bridge

        _, writer = self._require_running()
        rows = cols = None
        with contextlib.suppress(OSError):
            rows, cols = stty.get_winsize(0)
        writer.write(interactive_line(rows, cols))
        await writer.drain()
        transport = self._transport
        assert transport is not None
        own_protocol = transport.get_protocol()
        try:
            with stty.raw_mode(0):
                return await Bridge(escape).run(transport, close_console=False)
        finally:
            # Hand the console back, so our stream sees its end (or its next output).
            transport.set_protocol(own_protocol)
            if transport.is_closing():
                own_protocol.connection_lost(None)
            else:
                transport.resume_reading()
