"""A directory read a batch at a time, with the kernel's own positions as 9P offsets.

Treaddir carries an offset: the one the last entry of the previous Rreaddir gave.  Using
the kernel's directory positions for it (``d_off`` from ``getdents64``, the cookie
``lseek`` takes back, as QEMU and diod use ``telldir``/``seekdir``) means the server keeps
nothing between two Treaddirs: no listing per fid, however large the directory and however
many fids read it, and a directory that changes between reads is read as the kernel reads
it for a local program.  Each entry is looked at through :meth:`Export.entry`, which
decides what the client sees of it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

from . import _codec as c
from ._fs import Export, Handle

__all__ = ["read_entries"]

_libc = ctypes.CDLL(None, use_errno=True)
# struct linux_dirent64: d_ino u64, d_off s64, d_reclen u16, d_type u8, then the name.
_HEAD = struct.Struct("=QqHB")
# Bytes of a dirent on the 9P wire besides its name (qid, offset, type, name length).
_WIRE_HEAD = 13 + 8 + 1 + 2
_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "riscv64": 61, "i686": 220, "i386": 220,
                   "armv7l": 217, "ppc64le": 202, "s390x": 220}


def _getdents(fd: int, buf: ctypes.Array[ctypes.c_char]) -> int:
    fn = getattr(_libc, "getdents64", None)
    if fn is not None:
        n = int(fn(fd, buf, len(buf)))
    else:  # pragma: no cover - glibc before 2.30
        nr = _SYS_GETDENTS64.get(platform.machine())
        if nr is None:
            raise OSError(errno.ENOSYS, "no getdents64 here")
        n = int(_libc.syscall(nr, fd, buf, len(buf)))
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return n


def read_entries(fs: Export, fd: int, h: Handle, offset: int, limit: int) -> list[c.Dirent]:
    """Entries of the directory open as ``fd`` (the fid's handle ``h``) from ``offset``
    (0: the start) that fit in ``limit`` bytes of an Rreaddir.  Blocking; one reader of
    ``fd`` at a time (the position is the descriptor's)."""
    if offset > (1 << 63) - 1:
        raise OSError(errno.EINVAL, "offset past the largest the host takes")
    os.lseek(fd, offset, os.SEEK_SET)
    buf = ctypes.create_string_buffer(max(4096, min(limit, 256 * 1024)))
    out: list[c.Dirent] = []
    used = 0
    while True:
        n = _getdents(fd, buf)
        if n == 0:
            return out
        raw = ctypes.string_at(buf, n)
        pos = 0
        while pos < n:
            _ino, d_off, reclen, _dtype = _HEAD.unpack_from(raw, pos)
            end = raw.index(b"\0", pos + _HEAD.size, pos + reclen)
            name = raw[pos + _HEAD.size:end].decode("utf-8", "surrogateescape")
            pos += reclen
            size = _WIRE_HEAD + len(name.encode("utf-8", "surrogateescape"))
            if used + size > limit:
                return out  # the next Treaddir asks again from the last offset given
            found = fs.entry(fd, h, name)
            if found is not None:
                out.append(c.Dirent(found[0], d_off, found[1], name))
                used += size
