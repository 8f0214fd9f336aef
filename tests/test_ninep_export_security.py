"""A hostile 9P client against the real server, run as root in its own process (issue 13.2).

Each test starts ``python -m sigpoll.ninep serve`` as root (with umask 077, so a mode that
comes out right was set explicitly), plays the attacker over the wire with sigpoll's own
client, and then looks at the export from the host: no device node, set-id bit, file
capability or trusted.* attribute may appear there, no open may hold a server thread,
and --squash-uid must never re-own a file that was already there.  Both security models
are played where they differ; docs/ninep.md ("Security models") says what each promises.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

import sigpoll
from sigpoll.ninep import Client, NinepError
from sigpoll.ninep import _codec as c
from support.ninep import free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attacks need a server running as root")

T = TypeVar("T")
MODELS = ["mapped", "passthrough"]
CAPS = struct.pack("<IIIII", 0x02000001, 1 << 7, 0, 0, 0)  # security.capability: cap_setuid=ep
# Linux open flags as 9P2000.L carries them.
RDONLY, WRONLY, RDWR, CREAT, EXCL, TRUNC = 0, 1, 2, 0o100, 0o200, 0o1000
# Tsetattr valid bits.
MODE, UID, GID, SIZE, ATIME, MTIME, CTIME, ATIME_SET, MTIME_SET = (
    0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, 0x100)


def model_args(model: str) -> list[str]:
    # The default is not named, so that the old server (which has no such option) is
    # played by the mapped cases too.
    return [] if model == "mapped" else ["--security-model", model]


@contextmanager
def served(export: Path, *args: str, umask: int = 0o077) -> Iterator[int]:
    """The CLI server on a free port, in its own process; yields the port."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(sigpoll.__file__).parent.parent))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sigpoll.ninep", "serve", str(export), "--listen",
         f"127.0.0.1:{port}", "-q", *args],
        stderr=subprocess.PIPE, env=env, umask=umask)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {proc.stderr.read()!r}")  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "server never listened"
                time.sleep(0.02)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def go(body: Callable[[], Awaitable[T]], timeout: float = 60) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(body(), timeout)

    return asyncio.run(bounded())


async def attach(port: int, uid: int = 0) -> Client:
    return await Client.connect_tcp("127.0.0.1", port, n_uname=uid)


async def errno_of(aw: Awaitable[Any]) -> int:
    try:
        await aw
    except NinepError as exc:
        return exc.errno or -1
    return 0


async def rpc_at(cl: Client, path: str, make: Callable[[int], c.Message]) -> c.Message:
    fid = await cl.walk(path)
    try:
        return await cl.rpc(make(fid))
    finally:
        await cl.clunk(fid)


async def getattr_(cl: Client, path: str) -> c.Message:
    return await rpc_at(cl, path, lambda fid: c.Tgetattr(fid, c.GETATTR_BASIC))


async def setattr_(cl: Client, path: str, valid: int, mode: int = 0, uid: int = 0,
                   gid: int = 0, size: int = 0, atime: tuple[int, int] = (0, 0),
                   mtime: tuple[int, int] = (0, 0)) -> int:
    return await errno_of(rpc_at(cl, path, lambda fid: c.Tsetattr(
        fid, valid, mode, uid, gid, size, atime[0], atime[1], mtime[0], mtime[1])))


async def lcreate(cl: Client, name: str, flags: int, mode: int) -> int:
    """Tlcreate in the root; the open fid (clunk it) or the errno as a negative number."""
    fid = await cl.walk("")
    try:
        await cl.rpc(c.Tlcreate(fid, name, flags, mode, 0))
    except NinepError as exc:
        await cl.clunk(fid)
        return -(exc.errno or 1)
    return fid


async def make_file(cl: Client, name: str, mode: int, flags: int = RDWR | CREAT | EXCL) -> None:
    """Tlcreate ``name`` in the root (it must succeed) and clunk it."""
    fid = await lcreate(cl, name, flags, mode)
    assert fid > 0, (name, fid)
    await cl.clunk(fid)


async def xattr_set(cl: Client, path: str, name: str, value: bytes) -> int:
    """Txattrcreate + Twrite + Tclunk; the first errno any of them answered, or 0."""
    fid = await cl.walk(path)
    try:
        await cl.rpc(c.Txattrcreate(fid, name, len(value), 0))
        await cl.rpc(c.Twrite(fid, 0, value))
    except NinepError as exc:
        await errno_of(cl.clunk(fid))
        return exc.errno or -1
    return await errno_of(cl.clunk(fid))


async def xattr_get(cl: Client, path: str, name: str) -> bytes | int:
    fid = await cl.walk(path)
    newfid = cl._alloc_fid()
    try:
        r = await cl.rpc(c.Txattrwalk(fid, newfid, name))
    except NinepError as exc:
        cl._free_fid(newfid)
        return exc.errno or -1
    finally:
        await cl.clunk(fid)
    try:
        data: bytes = (await cl.rpc(c.Tread(newfid, 0, r.size))).data if r.size else b""
    finally:
        await cl.clunk(newfid)
    return data


def host_setid(path: Path) -> int:
    return os.lstat(path).st_mode & (stat.S_ISUID | stat.S_ISGID)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    d = tmp_path / "export"
    d.mkdir()
    os.chmod(d, 0o755)
    (d / "plain").write_bytes(b"plain\n")
    return d


# ----------------------------------------------------------------------------- devices


@pytest.mark.parametrize("model", MODELS)
def test_no_device_node_reaches_the_host_or_opens(export: Path, model: str) -> None:
    """Tmknod of /dev/kmsg's numbers then Tlopen + Tread read the host's kernel log on the
    old server.  Now: mapped gives the client its node on a plain file, passthrough
    refuses; and no device node in the export ever opens, one the host put there either."""
    os.mknod(export / "hostnull", stat.S_IFCHR | 0o666, os.makedev(1, 3))

    async def body() -> None:
        cl = await attach(port)
        root = await cl.walk("")
        try:
            made = await errno_of(cl.rpc(c.Tmknod(root, "kmsg", stat.S_IFCHR | 0o644, 1, 11, 0)))
            made_blk = await errno_of(cl.rpc(c.Tmknod(root, "disk", stat.S_IFBLK | 0o660, 8, 0, 0)))
        finally:
            await cl.clunk(root)
        names = ["kmsg", "disk", "hostnull"] if made == 0 else ["hostnull"]
        for name in names:
            for flags in (RDONLY, RDWR):
                fid = await cl.walk(name)
                try:
                    got: object = await errno_of(cl.rpc(c.Tlopen(fid, flags)))
                    if got == 0:  # the old server: show what the attacker gets
                        data = (await cl.rpc(c.Tread(fid, 0, 4096))).data
                        got = f"opened, read {data[:60]!r}"
                finally:
                    await cl.clunk(fid)
                assert got == errno.EACCES, (name, flags, got)
        if model == "mapped":
            assert (made, made_blk) == (0, 0)
            g = await getattr_(cl, "kmsg")
            assert stat.S_ISCHR(g.mode) and g.rdev == os.makedev(1, 11)
            assert stat.S_IMODE(g.mode) == 0o644
            for name in ("kmsg", "disk"):
                st = os.lstat(export / name)
                assert stat.S_ISREG(st.st_mode) and st.st_size == 0, name
                assert stat.S_IMODE(st.st_mode) == 0o600
        else:
            assert (made, made_blk) == (errno.EPERM, errno.EPERM)
            assert not os.path.lexists(export / "kmsg") and not os.path.lexists(export / "disk")
        await cl.close()

    with served(export, *model_args(model)) as port:
        go(body)
    for entry in os.scandir(export):
        st = entry.stat(follow_symlinks=False)
        if entry.name != "hostnull":
            assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)), entry.name


# ----------------------------------------------------------------------------- set-id bits


@pytest.mark.parametrize("model", MODELS)
def test_no_setid_bit_reaches_the_host(export: Path, model: str) -> None:
    async def body() -> None:
        cl = await attach(port)
        await make_file(cl, "suid", 0o4755)
        root = await cl.walk("")
        try:
            await cl.rpc(c.Tmkdir(root, "sgid", 0o2775, 0))
        finally:
            await cl.clunk(root)
        chmod_file = await setattr_(cl, "plain", MODE, mode=0o6755)
        chmod_dir = await setattr_(cl, "sgid", MODE, mode=0o2775)
        g_suid, g_plain = await getattr_(cl, "suid"), await getattr_(cl, "plain")
        if model == "mapped":
            # The client keeps its bits; they live in the record, not the host's mode.
            assert (chmod_file, chmod_dir) == (0, 0)
            assert stat.S_IMODE(g_suid.mode) == 0o4755
            assert stat.S_IMODE(g_plain.mode) == 0o6755
            assert stat.S_IMODE((await getattr_(cl, "sgid")).mode) == 0o2775
        else:
            # Dropped at creation, as Linux drops S_ISGID; refused by chmod.
            assert (chmod_file, chmod_dir) == (errno.EPERM, errno.EPERM)
            assert stat.S_IMODE(g_suid.mode) == 0o755
            assert stat.S_IMODE(g_plain.mode) == stat.S_IMODE(os.lstat(export / "plain").st_mode)
            assert await setattr_(cl, "plain", MODE, mode=0o700) == 0
        await cl.close()

    with served(export, *model_args(model)) as port:
        go(body)
    for name in ("suid", "sgid", "plain"):
        assert host_setid(export / name) == 0, (name, oct(os.lstat(export / name).st_mode))


# ----------------------------------------------------------------------------- xattrs


@pytest.mark.parametrize("model", MODELS)
def test_no_privileged_xattr_reaches_the_host(export: Path, model: str) -> None:
    os.setxattr(export / "plain", "trusted.host-only", b"secret")

    async def body() -> None:
        cl = await attach(port)
        caps = await xattr_set(cl, "plain", "security.capability", CAPS)
        trusted = await xattr_set(cl, "plain", "trusted.overlay.redirect", b"/etc")
        user = await xattr_set(cl, "plain", "user.note", b"ok")
        assert user == 0
        assert await xattr_get(cl, "plain", "user.note") == b"ok"
        listing = await xattr_get(cl, "plain", "")
        assert isinstance(listing, bytes)
        names = set(listing.split(b"\0")) - {b""}
        assert b"trusted.host-only" not in names  # the host's own attributes stay hidden
        if model == "mapped":
            assert (caps, trusted) == (0, 0)
            assert await xattr_get(cl, "plain", "security.capability") == CAPS
            assert names == {b"security.capability", b"trusted.overlay.redirect", b"user.note"}
            assert await xattr_get(cl, "plain", "trusted.host-only") == errno.ENODATA
            # The record that holds the client's owners cannot be reached or forged.
            before = await getattr_(cl, "plain")
            assert await xattr_set(cl, "plain", "user.sigpoll", b"\x01" + bytes(20)) == 0
            after = await getattr_(cl, "plain")
            assert (after.mode, after.uid, after.gid) == (before.mode, before.uid, before.gid)
        else:
            assert (caps, trusted) == (errno.EOPNOTSUPP, errno.EOPNOTSUPP)
            assert names == {b"user.note"}
            assert await xattr_get(cl, "plain", "trusted.host-only") == errno.EOPNOTSUPP
            assert await xattr_set(cl, "plain", "user.sigpoll", b"x") == errno.EPERM
        await cl.close()

    with served(export, *model_args(model)) as port:
        go(body)
    host = set(os.listxattr(export / "plain"))
    assert not {n for n in host if n.startswith(("security.", "trusted."))} - {"trusted.host-only"}
    assert os.getxattr(export / "plain", "trusted.host-only") == b"secret"


# ----------------------------------------------------------------------------- fifos


@pytest.mark.parametrize("model", MODELS)
def test_fifo_opens_from_many_clients_never_hold_the_server(export: Path, model: str) -> None:
    """More fifo opens at once than the server has threads (8), from as many connections,
    then a new connection: every request is answered, none waits for a peer."""
    n = 12
    for i in range(n):
        os.mkfifo(export / f"fifo{i}")

    async def one(i: int) -> list[int]:
        cl = await attach(port)
        got = []
        try:
            for flags in (RDONLY, WRONLY, RDWR):
                fid = await cl.walk(f"fifo{i}")
                try:
                    got.append(await errno_of(cl.rpc(c.Tlopen(fid, flags))))
                    if flags == RDONLY and got[-1] == 0:
                        # Nothing written, nobody writing: an answer, not a wait.
                        got.append(await errno_of(cl.rpc(c.Tread(fid, 0, 100))))
                finally:
                    await cl.clunk(fid)
        finally:
            await cl.close()
        return got

    async def body() -> None:
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 20)
        # read-only: opens (no writer needed); the read finds no data; write-only: no
        # reader, ENXIO; read-write: opens.
        assert results == [[0, 0, errno.ENXIO, 0]] * n
        # The client's own fifos: under mapped a file standing for one, which opens as
        # nothing (ENXIO); under passthrough a real one, which behaves as above.
        cl = await asyncio.wait_for(attach(port), 10)
        root = await cl.walk("")
        await cl.rpc(c.Tmknod(root, "mine", stat.S_IFIFO | 0o644, 0, 0, 0))
        await cl.clunk(root)
        fid = await cl.walk("mine")
        got = await asyncio.wait_for(errno_of(cl.rpc(c.Tlopen(fid, RDONLY))), 10)
        await cl.clunk(fid)
        assert got == (errno.ENXIO if model == "mapped" else 0)
        assert (await getattr_(cl, "plain")).size == 6
        await cl.close()

    with served(export, *model_args(model)) as port:
        go(body)
    if model == "mapped":
        assert stat.S_ISREG(os.lstat(export / "mine").st_mode)


# ----------------------------------------------------------------------------- squash


@pytest.mark.parametrize("model", MODELS)
def test_squash_never_reowns_an_existing_file(export: Path, model: str) -> None:
    secret = export / "secret"
    secret.write_bytes(b"root only\n")
    os.chown(secret, 0, 0)
    os.chmod(secret, 0o600)

    async def body() -> None:
        cl = await attach(port, uid=0)
        await make_file(cl, "secret", 0o666, RDWR | CREAT)  # no O_EXCL: opens it
        await make_file(cl, "fresh", 0o640)
        root = await cl.walk("")
        await cl.rpc(c.Tmkdir(root, "freshdir", 0o750, 0))
        await cl.clunk(root)
        if model == "passthrough":
            # The host owner is fixed: chown elsewhere is refused, to itself is fine.
            assert await setattr_(cl, "fresh", UID, uid=0) == errno.EPERM
            assert await setattr_(cl, "fresh", UID | GID, uid=4321, gid=4322) == 0
        await cl.close()

    with served(export, *model_args(model), "--squash-uid", "4321",
                "--squash-gid", "4322") as port:
        go(body)
    st = os.lstat(secret)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    assert secret.read_bytes() == b"root only\n"
    for name in ("fresh", "freshdir"):
        st = os.lstat(export / name)
        assert (st.st_uid, st.st_gid) == (4321, 4322), name


# ----------------------------------------------------------------------------- modes


@pytest.mark.parametrize("model", MODELS)
def test_modes_are_exact_whatever_the_servers_umask(export: Path, model: str) -> None:
    """The server runs with umask 077: what the client asked for must still come out."""
    async def body() -> None:
        cl = await attach(port)
        await make_file(cl, "f666", 0o666)
        root = await cl.walk("")
        await cl.rpc(c.Tmkdir(root, "d777", 0o777, 0))
        await cl.rpc(c.Tmkdir(root, "d1777", 0o1777, 0))
        await cl.rpc(c.Tmknod(root, "p620", stat.S_IFIFO | 0o620, 0, 0, 0))
        await cl.rpc(c.Tsymlink(root, "link", "f666", 0))
        await cl.clunk(root)
        seen = {n: stat.S_IMODE((await getattr_(cl, n)).mode)
                for n in ("f666", "d777", "d1777", "p620")}
        assert seen == {"f666": 0o666, "d777": 0o777, "d1777": 0o1777, "p620": 0o620}
        assert stat.S_ISLNK((await getattr_(cl, "link")).mode)
        await cl.close()

    with served(export, *model_args(model)) as port:
        go(body)
    host = {n: stat.S_IMODE(os.lstat(export / n).st_mode) for n in ("f666", "d777", "d1777", "p620")}
    if model == "mapped":
        # The host's copies: no group or other write, no sticky bit, owner rw(x).
        assert host == {"f666": 0o644, "d777": 0o755, "d1777": 0o755, "p620": 0o600}
    else:
        assert host == {"f666": 0o666, "d777": 0o777, "d1777": 0o1777, "p620": 0o620}


# ----------------------------------------------------------------------------- setattr


@pytest.mark.parametrize("model", MODELS)
def test_setattr_applies_every_field_it_names(export: Path, model: str) -> None:
    async def body() -> None:
        cl = await attach(port)
        root = await cl.walk("")
        await cl.rpc(c.Tsymlink(root, "link", "plain", 0))
        await cl.rpc(c.Tmkdir(root, "dir", 0o755, 0))
        await cl.clunk(root)
        # Times on a symlink: the link's own, exactly.
        assert await setattr_(cl, "link", ATIME | MTIME | ATIME_SET | MTIME_SET,
                              atime=(1000, 5), mtime=(2000, 7)) == 0
        g = await getattr_(cl, "link")
        assert (g.atime_sec, g.atime_nsec, g.mtime_sec, g.mtime_nsec) == (1000, 5, 2000, 7)
        # "Now" (no _SET bits) moves the time forward.
        assert await setattr_(cl, "link", MTIME) == 0
        assert (await getattr_(cl, "link")).mtime_sec > 2000
        # chown(-1, -1) arrives as the ctime bit alone: ctime must move, on a file and a link.
        for name in ("plain", "link"):
            before = await getattr_(cl, name)
            while time.clock_gettime_ns(5) <= before.ctime_sec * 10**9 + before.ctime_nsec + 10**6:
                await asyncio.sleep(0.005)  # CLOCK_REALTIME_COARSE, what timestamps use
            assert await setattr_(cl, name, CTIME) == 0
            after = await getattr_(cl, name)
            assert (after.ctime_sec, after.ctime_nsec) > (before.ctime_sec, before.ctime_nsec), name
        # What cannot be done is an error, never a silent success.
        assert await setattr_(cl, "dir", SIZE, size=0) == errno.EISDIR
        assert await setattr_(cl, "plain", ATIME | ATIME_SET, atime=(1, 2_000_000_000)) == errno.EINVAL
        await cl.close()

    with served(export, *model_args(model)) as port:
        go(body)
    if model == "passthrough":
        st = os.lstat(export / "link")
        assert stat.S_ISLNK(st.st_mode) and st.st_atime_ns == 1000 * 10**9 + 5


# ----------------------------------------------------------------------------- limits


@pytest.mark.parametrize("model", MODELS)
def test_names_and_symlink_targets_at_the_limits(export: Path, model: str) -> None:
    async def body() -> None:
        cl = await attach(port)
        await make_file(cl, "n" * 255, 0o644)
        assert await lcreate(cl, "n" * 256, RDWR | CREAT | EXCL, 0o644) == -errno.ENAMETOOLONG
        target = "t/" * 2047 + "t"
        root = await cl.walk("")
        try:
            assert await errno_of(cl.rpc(c.Tsymlink(root, "long", target, 0))) == 0
            assert await errno_of(cl.rpc(c.Tsymlink(root, "over", target + "x", 0))) \
                == errno.ENAMETOOLONG
            assert await errno_of(cl.rpc(c.Tsymlink(root, "empty", "", 0))) == errno.ENOENT
        finally:
            await cl.clunk(root)
        r = await rpc_at(cl, "long", lambda fid: c.Treadlink(fid))
        assert r.target == target
        await cl.close()

    with served(export, *model_args(model)) as port:
        go(body)
    assert not os.path.lexists(export / "over")


# ----------------------------------------------------------------------------- options


def test_user_read_only_and_squash_combine(export: Path) -> None:
    nobody = 65534
    os.chown(export, nobody, nobody)

    async def as_nobody() -> None:
        cl = await attach(port)
        await make_file(cl, "made", 0o4755)
        root = await cl.walk("")
        await cl.rpc(c.Tmknod(root, "dev", stat.S_IFCHR | 0o600, 1, 11, 0))
        await cl.clunk(root)
        assert stat.S_ISCHR((await getattr_(cl, "dev")).mode)
        await cl.close()

    with served(export, "--user", "nobody") as port:
        pid_uid = _server_uid(port)
        go(as_nobody)
    assert pid_uid == nobody
    for name in ("made", "dev"):
        st = os.lstat(export / name)
        assert (st.st_uid, stat.S_ISREG(st.st_mode), host_setid(export / name)) == (nobody, True, 0)

    async def read_only() -> None:
        cl = await attach(port)
        assert await lcreate(cl, "x", RDWR | CREAT, 0o644) == -errno.EROFS
        assert await setattr_(cl, "made", MODE, mode=0o777) == errno.EROFS
        assert await xattr_set(cl, "made", "user.x", b"1") == errno.EROFS
        assert (await getattr_(cl, "made")).size == 0
        await cl.close()

    with served(export, "--read-only", "--squash-uid", "4321") as port:
        go(read_only)

    env = dict(os.environ, PYTHONPATH=str(Path(sigpoll.__file__).parent.parent))
    for args, why in (
        (["--user", "nobody", "--squash-uid", "4321"], "can only give new files to itself"),
        (["--user", "no-such-user-here"], "no such user"),
    ):
        r = subprocess.run([sys.executable, "-m", "sigpoll.ninep", "serve", str(export),
                            "--listen", "127.0.0.1:0", *args],
                           capture_output=True, text=True, env=env, timeout=30)
        assert r.returncode == 2, r
        assert why in r.stderr and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def _server_uid(port: int) -> int:
    """The real uid of the process listening on ``port`` (from /proc)."""
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                inode = fields[9]
    assert inode is not None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]" for fd in fds):
                with open(f"/proc/{pid}/status") as st:
                    for line in st:
                        if line.startswith("Uid:"):
                            return int(line.split()[1])
        except OSError:
            continue
    raise AssertionError("no process holds the listening socket")


@pytest.mark.parametrize("model", MODELS)
def test_a_write_by_another_user_clears_the_setid_bits(export: Path, model: str) -> None:
    """Linux clears S_ISUID (and S_ISGID of a group-executable file) when someone without
    CAP_FSETID writes; v9fs leaves that to the server (pjdfstest chmod/12.t)."""
    host = export / "hostsuid"
    host.write_bytes(b"x")
    os.chown(host, 1000, 1000)
    os.chmod(host, 0o6755)

    async def write(cl: Client, name: str) -> None:
        fid = await cl.walk(name)
        try:
            await cl.rpc(c.Tlopen(fid, WRONLY))
            await cl.rpc(c.Twrite(fid, 0, b"y"))
        finally:
            await cl.clunk(fid)

    async def body() -> None:
        root = await attach(port, uid=0)
        if model == "mapped":
            await make_file(root, "made", 0o6755)
            await write(root, "made")  # root keeps the bits
            assert stat.S_IMODE((await getattr_(root, "made")).mode) == 0o6755
        user = await attach(port, uid=1000)
        await write(user, "hostsuid")
        assert stat.S_IMODE((await getattr_(user, "hostsuid")).mode) == 0o755
        if model == "mapped":
            await write(user, "made")
            assert stat.S_IMODE((await getattr_(user, "made")).mode) == 0o755
        await user.close()
        await root.close()

    with served(export, *model_args(model)) as port:
        go(body)
    assert host_setid(host) == 0
