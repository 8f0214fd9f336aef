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

What a client may make of the files (owners, modes, device nodes, set-id bits,
extended attributes) is the security model's business: the rules are in ``_model.py``,
the design in docs/ninep.md ("Security models").  Whatever the model, no call here waits
for another party: fifos open non-blocking, device nodes never open.

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
from typing import Any, cast

from ._codec import QTDIR, QTFILE, QTSYMLINK, Dirent, Qid
from ._model import (ATTR_XATTR, MAPPED, MODELS, Attr, decode_attr, encode_attr, host_mode,
                     passthrough_chmod, passthrough_create_mode, xattr_to_client,
                     xattr_to_host)

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
_PATH_MAX = 4096  # Linux's, with the NUL: a symlink target is at most 4095 bytes
_NOID = 0xFFFFFFFF  # "no uid/gid" on the wire (-1)
_CLOCK_REALTIME_COARSE = 5  # Linux's; what file timestamps are taken from
_RECORD_SETTLE_NS = 2_000_000_000  # past a whole-second file system's tick, with margin
_RECORDS_MAX = 16384  # records remembered (about 5 MiB at most)

# Tsetattr's valid bits (Linux's ATTR_* as 9P2000.L carries them).
_SETATTR_MODE = 0x001
_SETATTR_UID = 0x002
_SETATTR_GID = 0x004
_SETATTR_SIZE = 0x008
_SETATTR_ATIME = 0x010
_SETATTR_MTIME = 0x020
_SETATTR_CTIME = 0x040
_SETATTR_ATIME_SET = 0x080
_SETATTR_MTIME_SET = 0x100


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
    """A directory served to clients, with its policy.

    ``security_model``: ``"mapped"`` (the default) or ``"passthrough"`` (see
    :mod:`sigpoll.ninep._model` and docs/ninep.md).  ``read_only``: refuse every change
    with EROFS.  ``squash_uid``/``squash_gid``: the host owner of every file the export
    creates (a file that already exists is never re-owned); under passthrough, chown to
    anyone else is EPERM.  Giving files away needs root: PermissionError otherwise.
    """

    def __init__(self, root: str | os.PathLike[str], *, read_only: bool = False,
                 squash_uid: int | None = None, squash_gid: int | None = None,
                 security_model: str = MAPPED) -> None:
        if security_model not in MODELS:
            raise ValueError(f"security_model must be one of {', '.join(MODELS)}, "
                             f"not {security_model!r}")
        self.root_path = os.fspath(root)
        self.read_only = read_only
        self.model = security_model
        self.mapped = security_model == MAPPED
        self.squash_uid = squash_uid
        self.squash_gid = squash_gid if squash_gid is not None else squash_uid
        self._am_root = os.geteuid() == 0
        # (dev, ino) -> (ctime_ns, record): getxattr through /proc costs several times a
        # fstat, and Tgetattr and every walk step stat a file (see _attr).
        self._records: dict[tuple[int, int], tuple[int, Attr | None]] = {}
        if not self._am_root and (
                (self.squash_uid is not None and self.squash_uid != os.geteuid())
                or (self.squash_gid is not None and self.squash_gid != os.getegid())):
            raise PermissionError(errno.EPERM, "giving new files to another user "
                                  "(squash_uid/squash_gid) needs root")
        self._root_fd = os.open(self.root_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(self._root_fd)
            if self.mapped and not read_only:
                self._check_xattrs()
        except BaseException:
            os.close(self._root_fd)
            raise
        self.root_dev, self.root_ino = st.st_dev, st.st_ino

    def _check_xattrs(self) -> None:
        try:
            os.getxattr(_PROC_FD + str(self._root_fd), ATTR_XATTR)
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                raise OSError(errno.EOPNOTSUPP,
                              f"{self.root_path}: the file system has no user.* extended "
                              "attributes, where the mapped security model keeps owners "
                              "and modes; export it read-only or with the passthrough "
                              "model") from None
            if exc.errno not in (errno.ENODATA, errno.EACCES):
                raise

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
        """The file as the client sees it (under the mapped model, its record applied)."""
        st = os.fstat(h.fd)
        if not self.mapped:
            return st
        a = self._attr(st, _PROC_FD + str(h.fd))
        return st if a is None else _restat(st, a)

    def qid(self, st: os.stat_result) -> Qid:
        return qid_of(st, self.root_dev)

    def _attr(self, st: os.stat_result, path: str, entry: bool = False) -> Attr | None:
        """The mapped model's record of the file at ``path`` (whose host stat is ``st``),
        or None when it has none.  Only regular files and directories can carry one.

        ``path`` is /proc/self/fd/N, whose magic link must be followed to reach the
        inode, or with ``entry`` a name in such a directory, which must not be.
        """
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return None
        key = (st.st_dev, st.st_ino)
        known = self._records.get(key)
        if known is not None and known[0] == st.st_ctime_ns:
            return known[1]
        try:
            raw = os.getxattr(path, ATTR_XATTR, follow_symlinks=not entry)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP, errno.EACCES):
                raise
            a = None
        else:
            a = decode_attr(raw)
        # Any change to the record changes the file's ctime, so (ctime, record) stays true
        # while the ctime does, with one catch: a change in the same clock tick as the
        # ctime we saw may keep it (coarse timestamps, or a file system that keeps whole
        # seconds).  So only a ctime older than _RECORD_SETTLE_NS is trusted: any change
        # after it must show as a new ctime.
        if time.clock_gettime_ns(_CLOCK_REALTIME_COARSE) - st.st_ctime_ns > _RECORD_SETTLE_NS:
            if len(self._records) >= _RECORDS_MAX:
                # Start over rather than evict one by one: clear() is one atomic step
                # for the worker threads that share the table, iterating is not.
                self._records.clear()
            self._records[key] = (st.st_ctime_ns, a)
        return a

    def _view(self, st: os.stat_result, path: str) -> Attr:
        """The client's view of a file: its record, or its host attributes."""
        a = self._attr(st, path) if self.mapped else None
        if a is not None:
            return a
        return Attr(st.st_uid, st.st_gid, st.st_mode, st.st_rdev)

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

    def _host_owner(self, uid: int, gid: int) -> tuple[int, int]:
        """Who owns a new file on the host (-1: the server itself)."""
        if self.mapped:
            u, g = -1, -1
        else:
            u = -1 if uid == _NOID else uid
            g = -1 if gid == _NOID else gid
        if self.squash_uid is not None:
            u = self.squash_uid
        if self.squash_gid is not None:
            g = self.squash_gid
        if not self._am_root:
            # Only root gives files away; squash to ourselves was checked at start.
            u = -1 if u != os.geteuid() else u
            g = -1 if g != os.getegid() else g
        return u, g

    def _settle(self, fd: int, kind: int, mode: int, uid: int, gid: int,
                rdev: int = 0) -> None:
        """Give a file this export just created (``fd``, any kind of descriptor for it)
        its owner, its mode and, under the mapped model, its record.

        The mode is always set explicitly: the creating call's mode went through the
        process umask, which a threaded server must not touch and cannot rely on.
        """
        path = _PROC_FD + str(fd)
        st = os.fstat(fd)
        u, g = self._host_owner(uid, gid)
        if (u, g) != (-1, -1):
            _lchown_fd(fd, u, g)
        if self.mapped:
            os.chmod(path, host_mode(kind, mode))
            if gid == _NOID:
                gid = st.st_gid
            os.setxattr(path, ATTR_XATTR, encode_attr(Attr(uid, gid, kind | (mode & 0o7777), rdev)))
        elif not stat.S_ISLNK(st.st_mode):
            bits = passthrough_create_mode(mode)
            if stat.S_ISDIR(st.st_mode):
                # The host's own set-group-ID inheritance (a new directory in a set-gid
                # directory) is the host's policy: kept.
                bits |= st.st_mode & stat.S_ISGID
            os.chmod(path, bits)

    def _undo(self, d: Handle, name: str, fd: int) -> None:
        """Remove a half-made file, if ``name`` still is that file."""
        try:
            st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
            mine = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(name, dir_fd=d.fd)
                else:
                    os.unlink(name, dir_fd=d.fd)
        except OSError:
            pass

    def _made(self, d: Handle, name: str, fd: int, kind: int, mode: int, uid: int,
              gid: int, rdev: int = 0) -> None:
        """:meth:`_settle`, removing the new file if that fails."""
        try:
            self._settle(fd, kind, mode, uid, gid, rdev)
        except BaseException:
            self._undo(d, name, fd)
            raise

    def _new_regular(self, d: Handle, name: str, flags: int) -> int:
        """Create ``name`` as a new, empty host regular file (never an existing one)."""
        return os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o600, dir_fd=d.fd)

    # ------------------------------------------------------------------ operations

    def open(self, h: Handle, dotl_flags: int) -> int:
        """Open for I/O.  Nothing here can wait for another party: a fifo is opened
        non-blocking (no writer: the open succeeds; no reader: ENXIO), a device node is
        EACCES (the export is nodev), a socket, or a file standing for a special file,
        is ENXIO."""
        flags = dotl_to_open_flags(dotl_flags)
        st = os.fstat(h.fd)
        kind = stat.S_IFMT(self._view(st, _PROC_FD + str(h.fd)).mode)
        if kind == stat.S_IFLNK:
            raise OSError(errno.ELOOP, "is a symbolic link")
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            raise OSError(errno.EACCES, "device nodes cannot be opened through the export")
        if kind != stat.S_IFMT(st.st_mode) or kind == stat.S_IFSOCK:
            raise OSError(errno.ENXIO, "no such device or address")
        if kind == stat.S_IFIFO:
            flags |= os.O_NONBLOCK
        writes = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if writes:
            self._writable()
            if kind == stat.S_IFDIR:
                raise OSError(errno.EISDIR, "is a directory")
        return os.open(_PROC_FD + str(h.fd), flags)

    def create(self, d: Handle, name: str, dotl_flags: int, mode: int,
               uid: int, gid: int) -> tuple[Handle, int]:
        """Tlcreate: a new regular file, open; without O_EXCL, an existing file is
        opened as it is (never re-owned, never re-moded)."""
        self._writable()
        _valid_name(name)
        flags = dotl_to_open_flags(dotl_flags)
        for _ in range(16):
            try:
                fd = self._new_regular(d, name, flags)
            except FileExistsError:
                if dotl_flags & 0o200:
                    raise
                try:
                    h = self.walk1(d, name)
                except FileNotFoundError:
                    continue  # removed between the two calls: create it after all
                try:
                    if stat.S_ISDIR(os.fstat(h.fd).st_mode):
                        raise OSError(errno.EISDIR, "is a directory")  # as open(O_CREAT)
                    return h, self.open(h, dotl_flags)
                except BaseException:
                    h.close()
                    raise
            break
        else:
            raise OSError(errno.EAGAIN, "file keeps appearing and disappearing")
        try:
            self._made(d, name, fd, stat.S_IFREG, mode, uid, gid)
            pfd = os.open(_PROC_FD + str(fd), os.O_PATH | os.O_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        return Handle(pfd, d.path + (name,)), fd

    def _made_path(self, d: Handle, name: str, kind: int, mode: int, uid: int, gid: int,
                   rdev: int = 0, directory: bool = False) -> os.stat_result:
        """Settle a file made by name (mkdir, mknod, symlink) and return its stat."""
        flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
        try:
            fd = os.open(name, flags, dir_fd=d.fd)
        except OSError:
            raise OSError(errno.EAGAIN, "new file replaced while it was made") from None
        try:
            self._made(d, name, fd, kind, mode, uid, gid, rdev)
            h = Handle(fd, d.path + (name,))
            return self.stat(h)
        finally:
            os.close(fd)

    def mkdir(self, d: Handle, name: str, mode: int, uid: int, gid: int) -> os.stat_result:
        self._writable()
        _valid_name(name)
        os.mkdir(name, 0o700, dir_fd=d.fd)
        return self._made_path(d, name, stat.S_IFDIR, mode, uid, gid, directory=True)

    def symlink(self, d: Handle, name: str, target: str, uid: int,
                gid: int) -> os.stat_result:
        # The target is stored verbatim: it is never followed by this server.
        self._writable()
        _valid_name(name)
        if not target:
            raise OSError(errno.ENOENT, "empty symlink target")
        data = target.encode("utf-8", "surrogateescape")
        if len(data) >= _PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, "symlink target too long")
        if not self.mapped:
            os.symlink(target, name, dir_fd=d.fd)
            return self._made_path(d, name, stat.S_IFLNK, 0o777, uid, gid)
        # Mapped: a regular file holding the target, so no host program ever follows a
        # link the client planted, and its owner has somewhere to live.
        fd = self._new_regular(d, name, os.O_WRONLY)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except BaseException:
                self._undo(d, name, fd)
                raise
            self._made(d, name, fd, stat.S_IFLNK, 0o777, uid, gid)
            return self.stat(Handle(fd, ()))
        finally:
            os.close(fd)

    def mknod(self, d: Handle, name: str, mode: int, major: int, minor: int,
              uid: int, gid: int) -> os.stat_result:
        self._writable()
        _valid_name(name)
        if not (0 <= major < 1 << 31 and 0 <= minor < 1 << 31):  # what os.makedev takes
            raise OSError(errno.EINVAL, "device number out of range")
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise OSError(errno.EINVAL, "mknod makes files, devices, fifos and sockets only")
        rdev = os.makedev(major, minor) if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        if self.mapped:
            # The client's node is a record on an empty regular file: nothing on the
            # host can open it as a device or block on it as a fifo.
            fd = self._new_regular(d, name, os.O_RDONLY)
            try:
                self._made(d, name, fd, kind, mode, uid, gid, rdev)
                return self.stat(Handle(fd, ()))
            finally:
                os.close(fd)
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            raise OSError(errno.EPERM, "device nodes cannot be made through the export")
        os.mknod(name, kind | 0o600, 0, dir_fd=d.fd)
        return self._made_path(d, name, kind, mode, uid, gid)

    def readlink(self, h: Handle) -> str:
        st = os.fstat(h.fd)
        if stat.S_ISLNK(st.st_mode):
            # readlinkat(fd, "") reads the link an O_PATH|O_NOFOLLOW descriptor refers to.
            return _readlink_empty(h.fd)
        path = _PROC_FD + str(h.fd)
        if stat.S_IFMT(self._view(st, path).mode) != stat.S_IFLNK:
            raise OSError(errno.EINVAL, "not a symbolic link")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, _PATH_MAX)
        finally:
            os.close(fd)
        if not data or len(data) >= _PATH_MAX:
            raise OSError(errno.EIO, "damaged symlink record")
        return data.decode("utf-8", "surrogateescape")

    def setattr(self, h: Handle, valid: int, mode: int, uid: int, gid: int, size: int,
                atime: tuple[int, int], mtime: tuple[int, int]) -> None:
        """Tsetattr: every field ``valid`` names is applied, or the call fails."""
        self._writable()
        path = _PROC_FD + str(h.fd)
        st = os.fstat(h.fd)
        view = self._view(st, path)
        kind = stat.S_IFMT(view.mode)
        if valid & _SETATTR_UID and uid == _NOID:
            valid &= ~_SETATTR_UID
        if valid & _SETATTR_GID and gid == _NOID:
            valid &= ~_SETATTR_GID
        touched = False
        if valid & (_SETATTR_MODE | _SETATTR_UID | _SETATTR_GID):
            if self.mapped:
                self._set_record(h.fd, st, view, valid, mode, uid, gid)
            else:
                self._set_host(h.fd, st, valid, mode, uid, gid)
            touched = True
        if valid & _SETATTR_SIZE:
            if kind == stat.S_IFDIR:
                raise OSError(errno.EISDIR, "is a directory")
            if kind != stat.S_IFREG:
                raise OSError(errno.EINVAL, "not a regular file")
            os.truncate(path, size)
            touched = True
        if valid & (_SETATTR_ATIME | _SETATTR_MTIME):
            # Through /proc/self/fd the call lands on the handle's inode itself, a
            # symlink included (no follow: the magic link names the link).
            _utimens(path, _timespec(valid, _SETATTR_ATIME, _SETATTR_ATIME_SET, atime),
                     _timespec(valid, _SETATTR_MTIME, _SETATTR_MTIME_SET, mtime))
            touched = True
        if valid & _SETATTR_CTIME and not touched:
            # chown(f, -1, -1): nothing changes but the change time, as on Linux.
            _lchown_fd(h.fd, -1, -1)

    def _set_record(self, fd: int, st: os.stat_result, view: Attr, valid: int, mode: int,
                    uid: int, gid: int) -> None:
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.EOPNOTSUPP, "a host symlink has no room for a record")
        kind = stat.S_IFMT(view.mode)
        new = Attr(uid if valid & _SETATTR_UID else view.uid,
                   gid if valid & _SETATTR_GID else view.gid,
                   kind | (mode & 0o7777) if valid & _SETATTR_MODE else view.mode,
                   view.rdev)
        path = _PROC_FD + str(fd)
        os.setxattr(path, ATTR_XATTR, encode_attr(new))
        if valid & _SETATTR_MODE and kind == stat.S_IFMT(st.st_mode):
            bits = host_mode(kind, mode)
            if bits != stat.S_IMODE(st.st_mode):
                os.chmod(path, bits)

    def _set_host(self, fd: int, st: os.stat_result, valid: int, mode: int, uid: int,
                  gid: int) -> None:
        # Ownership first: the host clears set-id bits on chown, and a client that
        # changes both sent the mode it wants to end with.
        if valid & (_SETATTR_UID | _SETATTR_GID):
            u = uid if valid & _SETATTR_UID else -1
            g = gid if valid & _SETATTR_GID else -1
            if self.squash_uid is not None or self.squash_gid is not None:
                if (u not in (-1, st.st_uid)) or (g not in (-1, st.st_gid)):
                    raise OSError(errno.EPERM, "ownership is fixed on a squashed export")
                u = g = -1
            _lchown_fd(fd, u, g)
        if valid & _SETATTR_MODE:
            if stat.S_ISLNK(st.st_mode):
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
            os.chmod(_PROC_FD + str(fd), passthrough_chmod(mode, st.st_mode))

    def drop_setid(self, h: Handle) -> None:
        """What a write by a user without CAP_FSETID does on Linux: clear S_ISUID, and
        S_ISGID if the file is group-executable (otherwise S_ISGID means mandatory
        locking and stays).  The server calls it before the first write through a fid
        attached by a uid other than 0; the guest kernel leaves it to the server."""
        path = _PROC_FD + str(h.fd)
        st = os.fstat(h.fd)
        view = self._view(st, path)
        if stat.S_IFMT(view.mode) != stat.S_IFREG:
            return
        bits = stat.S_ISUID | (stat.S_ISGID if view.mode & stat.S_IXGRP else 0)
        if not view.mode & bits or self.read_only:
            return
        if self.mapped and stat.S_ISREG(st.st_mode):
            self._set_record(h.fd, st, view, _SETATTR_MODE, view.mode & ~bits, 0, 0)
        else:
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~bits)

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
                if self.mapped and stat.S_ISREG(st.st_mode):
                    # The record says what the client sees: a symlink, a device...
                    a = self._attr(st, _PROC_FD + str(dirfd) + "/" + name, entry=True)
                    if a is not None:
                        st = _restat(st, a)
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

    # xattrs: through /proc/self/fd so they apply to the handle's inode, and through the
    # model, which decides what each name is on the host (or refuses it).
    def check_xattr_name(self, name: str) -> None:
        """Raise the errno a set of attribute ``name`` would get from the model."""
        xattr_to_host(self.model, name)

    def _xattr_target(self, h: Handle, name: str, writing: bool) -> tuple[str, str]:
        st = os.fstat(h.fd)
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.EPERM if writing else errno.ENODATA, "no xattrs on symlinks here")
        path = _PROC_FD + str(h.fd)
        if name and name.startswith("user."):
            # Linux keeps user.* to regular files and directories: so do the files the
            # mapped model makes stand for symlinks and special files.
            kind = stat.S_IFMT(self._view(st, path).mode)
            if kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise OSError(errno.EPERM if writing else errno.ENODATA,
                              "user attributes belong to files and directories")
        return path, xattr_to_host(self.model, name) if name else ""

    def getxattr(self, h: Handle, name: str) -> bytes:
        path, host = self._xattr_target(h, name, False)
        if not name:
            names = []
            for n in os.listxattr(path):
                client = xattr_to_client(self.model, n)
                if client is not None:
                    names.append(client.encode("utf-8", "surrogateescape") + b"\0")
            return b"".join(names)
        return os.getxattr(path, host)

    def setxattr(self, h: Handle, name: str, value: bytes | None, flags: int) -> None:
        self._writable()
        path, host = self._xattr_target(h, name, True)
        if not name:
            raise OSError(errno.EINVAL, "empty attribute name")
        if value is None:
            os.removexattr(path, host)
        else:
            os.setxattr(path, host, value, flags & 3)

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


def _restat(st: os.stat_result, a: Attr) -> os.stat_result:
    """``st`` with the owner, mode and device number the client sees."""
    # A stat_result pickles as (its ten tuple fields, a dict of the rest): the cheapest
    # way to copy one with a few fields changed.
    reduced = cast("tuple[Any, tuple[tuple[int, ...], dict[str, Any]]]", st.__reduce__())
    seq, extra = reduced[1]
    extra["st_rdev"] = a.rdev
    return os.stat_result((a.mode, seq[1], seq[2], seq[3], a.uid, a.gid) + seq[6:], extra)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2
_AT_FDCWD = -100


def _timespec(valid: int, bit: int, set_bit: int, t: tuple[int, int]) -> tuple[int, int]:
    """One time of a Tsetattr: left alone, now, or the client's (sec, nsec)."""
    if not valid & bit:
        return 0, _UTIME_OMIT
    if not valid & set_bit:
        return 0, _UTIME_NOW
    sec, nsec = t
    if nsec >= 1_000_000_000:
        raise OSError(errno.EINVAL, "nanoseconds out of range")
    # The wire carries the seconds as u64; a time before 1970 arrives as two's complement.
    return (sec - (1 << 64) if sec >= 1 << 63 else sec), nsec


def _utimens(path: str, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(_AT_FDCWD, os.fsencode(path), times, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


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
