"""The exported directory tree, confined to its root.

Every file the server touches is reached from the export root one name at a time with
``openat(dir, name, O_PATH | O_NOFOLLOW)``: a name never contains a slash, a symlink is
opened as the link itself and never followed, and ``..`` is answered from the handle's
own parent with a check that the root is not left.  So nothing outside the export is
reachable by ``..``, by absolute or relative symlinks, or by swapping a symlink in while
a walk is going on -- there is no path resolution for an attacker to race.

A handle keeps its O_PATH descriptor for as long as the fid lives; opening for I/O
goes through ``/proc/self/fd/N`` of that descriptor, which names the very inode the walk
found (not a path that might have changed since).

Everything here is blocking and is meant to run in the server's worker threads.
Errors are raised as ``OSError`` with the Linux errno the client should see.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import time
from dataclasses import dataclass, field

from ._codec import QTDIR, QTFILE, QTSYMLINK, Dirent, Qid

__all__ = ["Export", "Handle", "dotl_to_open_flags", "qid_of"]

# 9P2000.L open flags are Linux x86 O_* values whatever the host is; map them by name
# so the server stays right on hosts whose O_* numbers differ.
_DOTL_FLAGS = {
    0o100: "O_CREAT",
    0o200: "O_EXCL",
    0o1000: "O_TRUNC",
    0o2000: "O_APPEND",
    0o4000: "O_NONBLOCK",
    0o10000: "O_DSYNC",
    0o200000: "O_DIRECTORY",
    0o4000000: "O_SYNC",
}
_DOTL_ACCMODE = 3

_PROC_FD = "/proc/self/fd/"


def dotl_to_open_flags(flags: int) -> int:
    """Host ``os.open`` flags for 9P2000.L ``flags``.

    Dropped on purpose: O_CREAT/O_EXCL (creation is Tlcreate's job), O_NOCTTY (always
    set), O_DIRECT (alignment rules a remote client cannot follow), FASYNC (signals
    would go to this server), O_NOFOLLOW (the handle is already resolved), O_NOATIME
    (EPERM for files the server does not own) and O_CLOEXEC (always set).
    """
    acc = flags & _DOTL_ACCMODE
    if acc == 3:
        raise OSError(errno.EINVAL, "invalid access mode")
    out = (os.O_RDONLY, os.O_WRONLY, os.O_RDWR)[acc]
    for bit, name in _DOTL_FLAGS.items():
        if flags & bit and name not in ("O_CREAT", "O_EXCL"):
            out |= getattr(os, name)
    return out | os.O_CLOEXEC | os.O_NOCTTY


def _valid_name(name: str) -> None:
    """A name for a new directory entry: one non-empty component."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise OSError(errno.EINVAL, f"invalid file name {name!r}")


def qid_of(st: os.stat_result, root_dev: int) -> Qid:
    """Qid for a stat result; the device is mixed in for files on other mounts."""
    if stat.S_ISDIR(st.st_mode):
        qtype = QTDIR
    elif stat.S_ISLNK(st.st_mode):
        qtype = QTSYMLINK
    else:
        qtype = QTFILE
    path = st.st_ino
    if st.st_dev != root_dev:
        path = (path ^ (st.st_dev << 48)) & 0xFFFFFFFFFFFFFFFF
    return Qid(qtype, 0, path)


def _dtype(mode: int) -> int:
    return {
        stat.S_IFDIR: 4, stat.S_IFREG: 8, stat.S_IFLNK: 10, stat.S_IFCHR: 2,
        stat.S_IFBLK: 6, stat.S_IFIFO: 1, stat.S_IFSOCK: 12,
    }.get(stat.S_IFMT(mode), 0)


@dataclass(eq=False)
class Handle:
    """A file inside the export: an O_PATH descriptor and its path from the root.

    The path is only a hint (for Tremove and Trename, which name a file by fid
    alone); before acting on it the server checks it still leads to the same inode.
    """

    fd: int
    path: tuple[str, ...]
    closed: bool = field(default=False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


class Export:
    """A directory served to clients, with its policy (read-only, uid squashing)."""

    def __init__(self, root: str | os.PathLike[str], *, read_only: bool = False,
                 squash_uid: int | None = None, squash_gid: int | None = None) -> None:
        self.root_path = os.fspath(root)
        self.read_only = read_only
        self.squash_uid = squash_uid
        self.squash_gid = squash_gid if squash_gid is not None else squash_uid
        self._root_fd = os.open(self.root_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(self._root_fd)
        self.root_dev, self.root_ino = st.st_dev, st.st_ino
        self._am_root = os.geteuid() == 0

    def close(self) -> None:
        os.close(self._root_fd)

    # ------------------------------------------------------------------ handles

    def root(self) -> Handle:
        return Handle(os.dup(self._root_fd), ())

    def clone(self, h: Handle) -> Handle:
        return Handle(os.dup(h.fd), h.path)

    def _is_root(self, st: os.stat_result) -> bool:
        return st.st_dev == self.root_dev and st.st_ino == self.root_ino

    def walk1(self, h: Handle, name: str) -> Handle:
        """One step of a walk.  ``..`` never leaves the root; ``.`` and ``/`` stay put.

        ``/`` is accepted as "here" because the PyPI p9fs client sends it as the first
        element of absolute paths; diod, which joins names into a path, treats it the
        same way.
        """
        if name in (".", "/"):
            return self.clone(h)
        if name == "..":
            if self._is_root(os.fstat(h.fd)) or not h.path:
                return self.clone(h)
            fd = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=h.fd)
            return Handle(fd, h.path[:-1])
        if not name or "/" in name or "\0" in name:
            raise OSError(errno.ENOENT, "no such name")
        # No fstat first: openat() relative to anything but a directory (a file, or a
        # symlink opened as itself) fails with ENOTDIR on its own.
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=h.fd)
        return Handle(fd, h.path + (name,))

    def stat(self, h: Handle) -> os.stat_result:
        return os.fstat(h.fd)

    def qid(self, st: os.stat_result) -> Qid:
        return qid_of(st, self.root_dev)

    def _parent_of(self, h: Handle) -> tuple[Handle, str]:
        """Parent handle and name for ``h``, checked to still be the same inode."""
        if not h.path:
            raise OSError(errno.EBUSY, "cannot do that to the export root")
        parent = self.root()
        try:
            for name in h.path[:-1]:
                nxt = self.walk1(parent, name)
                parent.close()
                parent = nxt
            st = os.stat(h.path[-1], dir_fd=parent.fd, follow_symlinks=False)
            mine = os.fstat(h.fd)
            if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
                raise OSError(errno.ESTALE, "file moved since it was walked to")
        except BaseException:
            parent.close()
            raise
        return parent, h.path[-1]

    # ------------------------------------------------------------------ policy

    def _writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only export")

    def _owner(self, uid: int, gid: int) -> tuple[int, int]:
        if self.squash_uid is not None:
            return self.squash_uid, self.squash_gid if self.squash_gid is not None else gid
        return uid, gid

    def _give(self, dir_fd: int, name: str, uid: int, gid: int) -> None:
        """Hand a new file to the client's user (only possible when running as root)."""
        if not self._am_root:
            return
        u, g = self._owner(uid, gid)
        if u == 0xFFFFFFFF:
            u = -1
        if g == 0xFFFFFFFF:
            g = -1
        os.chown(name, u, g, dir_fd=dir_fd, follow_symlinks=False)

    # ------------------------------------------------------------------ operations

    def open(self, h: Handle, dotl_flags: int) -> int:
        flags = dotl_to_open_flags(dotl_flags)
        st = os.fstat(h.fd)
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "is a symbolic link")
        writes = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if writes:
            self._writable()
            if stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EISDIR, "is a directory")
        return os.open(_PROC_FD + str(h.fd), flags)

    def create(self, d: Handle, name: str, dotl_flags: int, mode: int,
               uid: int, gid: int) -> tuple[Handle, int]:
        self._writable()
        _valid_name(name)
        flags = dotl_to_open_flags(dotl_flags) | os.O_CREAT | os.O_NOFOLLOW
        if dotl_flags & 0o200:
            flags |= os.O_EXCL
        fd = os.open(name, flags, mode & 0o7777, dir_fd=d.fd)
        try:
            self._give(d.fd, name, uid, gid)
            pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd)
        except BaseException:
            os.close(fd)
            raise
        return Handle(pfd, d.path + (name,)), fd

    def mkdir(self, d: Handle, name: str, mode: int, uid: int, gid: int) -> os.stat_result:
        self._writable()
        _valid_name(name)
        os.mkdir(name, mode & 0o7777, dir_fd=d.fd)
        self._give(d.fd, name, uid, gid)
        return os.stat(name, dir_fd=d.fd, follow_symlinks=False)

    def symlink(self, d: Handle, name: str, target: str, uid: int,
                gid: int) -> os.stat_result:
        # The target is stored verbatim: it is never followed by this server.
        self._writable()
        _valid_name(name)
        os.symlink(target, name, dir_fd=d.fd)
        self._give(d.fd, name, uid, gid)
        return os.stat(name, dir_fd=d.fd, follow_symlinks=False)

    def mknod(self, d: Handle, name: str, mode: int, major: int, minor: int,
              uid: int, gid: int) -> os.stat_result:
        self._writable()
        _valid_name(name)
        if not (0 <= major < 1 << 31 and 0 <= minor < 1 << 31):  # what os.makedev takes
            raise OSError(errno.EINVAL, "device number out of range")
        os.mknod(name, mode, os.makedev(major, minor), dir_fd=d.fd)
        self._give(d.fd, name, uid, gid)
        return os.stat(name, dir_fd=d.fd, follow_symlinks=False)

    def readlink(self, h: Handle) -> str:
        if not stat.S_ISLNK(os.fstat(h.fd).st_mode):
            raise OSError(errno.EINVAL, "not a symbolic link")
        # readlinkat(fd, "") reads the link an O_PATH|O_NOFOLLOW descriptor refers to.
        return _readlink_empty(h.fd)

    def setattr(self, h: Handle, valid: int, mode: int, uid: int, gid: int, size: int,
                atime: tuple[int, int], mtime: tuple[int, int]) -> None:
        self._writable()
        st = os.fstat(h.fd)
        is_link = stat.S_ISLNK(st.st_mode)
        path = _PROC_FD + str(h.fd)
        if valid & 0x001 and not is_link:
            os.chmod(path, mode & 0o7777)
        if valid & (0x002 | 0x004) and self.squash_uid is None:
            u = uid if valid & 0x002 else -1
            g = gid if valid & 0x004 else -1
            if is_link:
                _lchown_fd(h.fd, u, g)
            else:
                os.chown(path, u, g)
        if valid & 0x008:
            if stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EISDIR, "is a directory")
            os.truncate(path, size)
        if valid & (0x010 | 0x020) and not is_link:
            cur = os.fstat(h.fd)
            now = None
            a_ns = cur.st_atime_ns
            m_ns = cur.st_mtime_ns
            if valid & 0x010:
                if valid & 0x080:
                    a_ns = atime[0] * 1_000_000_000 + atime[1]
                else:
                    now = now or _now_ns()
                    a_ns = now
            if valid & 0x020:
                if valid & 0x100:
                    m_ns = mtime[0] * 1_000_000_000 + mtime[1]
                else:
                    now = now or _now_ns()
                    m_ns = now
            os.utime(path, ns=(a_ns, m_ns))

    def statfs(self, h: Handle) -> os.statvfs_result:
        return os.fstatvfs(h.fd)

    def readdir(self, dirfd: int, h: Handle) -> list[Dirent]:
        """The whole directory, ``.`` and ``..`` first; offsets are 1-based positions."""
        out: list[Dirent] = []
        names = [".", ".."]
        with os.scandir(dirfd) as it:
            names.extend(ent.name for ent in it)
        for name in names:
            found = self.entry(dirfd, h, name)
            if found is not None:
                out.append(Dirent(found[0], len(out) + 1, found[1], name))
        return out

    def entry(self, dirfd: int, h: Handle, name: str) -> tuple[Qid, int] | None:
        """The qid and directory-entry type of ``name`` in the directory ``h`` (open as
        ``dirfd``), as a client is to see them; None if it is gone.  ``..`` of the export
        root is the root."""
        try:
            if name == ".":
                st = os.fstat(h.fd)
                if not stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.ENOTDIR, "not a directory")
            elif name == "..":
                st = os.fstat(h.fd)
                if h.path and not self._is_root(st):
                    st = os.stat("..", dir_fd=h.fd)
            else:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return self.qid(st), _dtype(st.st_mode)

    def remove(self, h: Handle) -> None:
        self._writable()
        parent, name = self._parent_of(h)
        try:
            if stat.S_ISDIR(os.fstat(h.fd).st_mode):
                os.rmdir(name, dir_fd=parent.fd)
            else:
                os.unlink(name, dir_fd=parent.fd)
        finally:
            parent.close()

    def unlinkat(self, d: Handle, name: str, flags: int) -> None:
        self._writable()
        _valid_name(name)
        if flags & 0x200:  # AT_REMOVEDIR
            os.rmdir(name, dir_fd=d.fd)
        else:
            os.unlink(name, dir_fd=d.fd)

    def renameat(self, od: Handle, oldname: str, nd: Handle, newname: str) -> None:
        self._writable()
        _valid_name(oldname)
        _valid_name(newname)
        os.rename(oldname, newname, src_dir_fd=od.fd, dst_dir_fd=nd.fd)

    def rename(self, h: Handle, nd: Handle, newname: str) -> tuple[str, ...]:
        self._writable()
        _valid_name(newname)
        parent, name = self._parent_of(h)
        try:
            os.rename(name, newname, src_dir_fd=parent.fd, dst_dir_fd=nd.fd)
        finally:
            parent.close()
        return nd.path + (newname,)

    def link(self, d: Handle, target: Handle, name: str) -> None:
        self._writable()
        _valid_name(name)
        if stat.S_ISDIR(os.fstat(target.fd).st_mode):
            raise OSError(errno.EPERM, "hard link to a directory")
        # linkat through /proc/self/fd links the inode the handle holds, with no path.
        os.link(_PROC_FD + str(target.fd), name, dst_dir_fd=d.fd, follow_symlinks=True)

    # xattrs: through /proc/self/fd so they apply to the handle's inode.
    def getxattr(self, h: Handle, name: str) -> bytes:
        link = stat.S_ISLNK(os.fstat(h.fd).st_mode)
        if link:
            raise OSError(errno.ENODATA, "no xattrs on symlinks here")
        if not name:
            names = os.listxattr(_PROC_FD + str(h.fd))
            return b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in names)
        return os.getxattr(_PROC_FD + str(h.fd), name)

    def setxattr(self, h: Handle, name: str, value: bytes, flags: int) -> None:
        self._writable()
        if stat.S_ISLNK(os.fstat(h.fd).st_mode):
            raise OSError(errno.EPERM, "no xattrs on symlinks here")
        if value is None:
            os.removexattr(_PROC_FD + str(h.fd), name)
        else:
            os.setxattr(_PROC_FD + str(h.fd), name, value, flags & 3)

    # Locks are open-file-description locks on the fid's open file, so two clients of
    # one server process really do exclude each other (classic POSIX locks would not).
    def lock(self, fd: int, ltype: int, start: int, length: int) -> bool:
        kind = {0: fcntl.F_RDLCK, 1: fcntl.F_WRLCK, 2: fcntl.F_UNLCK}.get(ltype)
        if kind is None:
            raise OSError(errno.EINVAL, "bad lock type")
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(kind, start, length))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def getlock(self, fd: int, ltype: int, start: int, length: int) -> tuple[int, int, int]:
        kind = {0: fcntl.F_RDLCK, 1: fcntl.F_WRLCK, 2: fcntl.F_UNLCK}.get(ltype)
        if kind is None:
            raise OSError(errno.EINVAL, "bad lock type")
        raw = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(kind, start, length))
        t, _w, s, n, _pid = _FLOCK.unpack(raw)
        back = {fcntl.F_RDLCK: 0, fcntl.F_WRLCK: 1, fcntl.F_UNLCK: 2}[t]
        return back, s, n


# struct flock on Linux: short type, short whence, off_t start, off_t len, pid_t pid.
_FLOCK = struct.Struct("@hhqqi4x")


def _flock(kind: int, start: int, length: int) -> bytes:
    # 9P's length 0 means "to the end", as in fcntl; pid must be 0 for OFD locks.
    # 9P carries u64 offsets, off_t is signed: what does not fit is the client's EINVAL.
    if not (0 <= start < 1 << 63 and 0 <= length < 1 << 63):
        raise OSError(errno.EINVAL, "lock range out of range")
    return _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)


def _now_ns() -> int:
    return time.time_ns()


_libc = ctypes.CDLL(None, use_errno=True)


def _readlink_empty(fd: int) -> str:
    # Python has no readlinkat(fd, ""); /proc/self/fd/N of an O_PATH symlink descriptor
    # is itself a magic link to the symlink, so read the symlink through ctypes instead.
    libc = _libc
    buf = ctypes.create_string_buffer(4097)
    n = libc.readlinkat(fd, b"", buf, 4096)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return buf.raw[:n].decode("utf-8", "surrogateescape")


def _lchown_fd(fd: int, uid: int, gid: int) -> None:
    AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW = 0x1000, 0x100
    if _libc.fchownat(fd, b"", ctypes.c_uint(uid & 0xFFFFFFFF), ctypes.c_uint(gid & 0xFFFFFFFF),
                     AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
