"""Guest memory: the regions of a SET_MEM_TABLE, address translation, and guarded copies.

:class:`GuestMemory` turns guest or frontend ("user") addresses into memoryviews, refusing
any range that is not wholly inside one region.  Over plain buffers (a ``bytearray`` in
the property tests) it is pure Python.  Over a real frontend's memory (:meth:`map_fds`) the
regions are shared mappings of files the frontend may truncate at any moment, so every
mapping is registered with the C core's SIGBUS guard (csrc/sigpoll.h, "Guest memory"):

- :meth:`copy_out` and :meth:`copy_in`, the data path, are guarded copies.  If the memory
  has gone they copy nothing and return False; no byte the guest did not write reaches the
  host.
- Any other access (ring indexes through memoryviews, descriptors through ``struct``) that
  hits a vanished page completes on zero pages the guard maps in its place, and
  :attr:`faulted` turns true.  The ``notify_fd`` given to :meth:`map_fds` is written at the
  first fault, so the backend drops the frontend from its event loop.

docs/virtio.md ("Guest memory that shrinks") says why it is done this way.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._core import ffi, lib
from ._vhost_user import MemoryRegion

__all__ = ["GuestMemory", "MemoryFault"]

log = logging.getLogger("sigpoll.virtio")


class MemoryFault(Exception):
    """A guest address range that is not wholly inside one mapped region, or memory the
    frontend has taken away."""


@dataclass
class _Region:
    guest_addr: int
    user_addr: int
    size: int
    view: memoryview
    host: int = 0  # address of view[0] in this process when guarded, else 0
    backing: Any = None  # the mmap, kept to close it
    guard: int = -1  # the C core's range id


def _address_of(buf: Any) -> int:
    """Where a writable buffer's first byte lives in this process."""
    ptr = ffi.from_buffer(buf)
    try:
        return int(ffi.cast("uintptr_t", ptr))
    finally:
        ffi.release(ptr)


def _sealed_against_shrinking(fd: int) -> bool:
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:
        return False  # not a memfd: it cannot carry seals


class GuestMemory:
    """Guest memory as a set of regions; translation with bounds checks.

    ``regions`` are ``(guest_addr, user_addr, buffer)`` triples (any writable buffer: a
    bytearray in tests).  Use :meth:`map_fds` for a SET_MEM_TABLE.
    """

    def __init__(self, regions: Sequence[tuple[int, int, Any]] = ()) -> None:
        self._regions: list[_Region] = []
        self._scratch = ffi.new("char[]", 64 * 1024)  # copy_out's landing buffer, grown on demand
        self._scratch_len = 64 * 1024
        for guest_addr, user_addr, buf in regions:
            view = memoryview(buf).cast("B")
            if view.readonly:
                raise ValueError("guest memory must be writable")
            self._regions.append(_Region(guest_addr, user_addr, len(view), view))

    @classmethod
    def map_fds(cls, regions: Sequence[MemoryRegion], fds: Sequence[int], *,
                notify_fd: int = -1, require_sealed: bool = False) -> GuestMemory:
        """Map SET_MEM_TABLE regions (one fd each, shared, read-write), each guarded.

        ``notify_fd`` (an eventfd) is written when the frontend takes memory away under
        us.  With ``require_sealed`` every fd must be a memfd sealed against shrinking
        (F_SEAL_SHRINK).  Raises :class:`MemoryFault` (after unmapping what was mapped) if
        a region is refused: unsealed when seals are required, or a mapping the kernel
        refuses, such as an offset or size beyond the end of the fd.
        """
        mem = cls()
        page = mmap.ALLOCATIONGRANULARITY
        try:
            for r, fd in zip(regions, fds, strict=True):
                if require_sealed and not _sealed_against_shrinking(fd):
                    raise MemoryFault(f"region at {r.guest_addr:#x}: its fd is not a memfd sealed "
                                      "against shrinking (F_SEAL_SHRINK)")
                # mmap wants a page-aligned offset; map from the page start and slice.
                skew = r.mmap_offset % page
                try:
                    size = os.fstat(fd).st_size
                    if size and r.mmap_offset + r.size > size:
                        raise MemoryFault(f"region at {r.guest_addr:#x} extends past the end of its fd")
                    mm = mmap.mmap(fd, r.size + skew, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=r.mmap_offset - skew)
                except (OSError, ValueError, OverflowError) as exc:
                    raise MemoryFault(f"cannot map region at {r.guest_addr:#x}: {exc}") from exc
                base = _address_of(mm)
                region = _Region(r.guest_addr, r.user_addr, r.size, memoryview(mm)[skew : skew + r.size],
                                 base + skew, mm)
                mem._regions.append(region)
                region.guard = lib.sp_guest_add(base, r.size + skew, notify_fd)
                if region.guard < 0:
                    raise MemoryFault(f"cannot guard region at {r.guest_addr:#x}: "
                                      f"{os.strerror(-region.guard)}")
        except BaseException:
            mem.close()
            raise
        return mem

    @property
    def regions(self) -> list[tuple[int, int, int]]:
        """``(guest_addr, user_addr, size)`` of each region."""
        return [(r.guest_addr, r.user_addr, r.size) for r in self._regions]

    @property
    def faulted(self) -> bool:
        """Whether the frontend took mapped memory away (an access met a SIGBUS)."""
        return any(r.guard >= 0 and lib.sp_guest_faults(r.guard) > 0 for r in self._regions)

    def _find(self, addr: int, length: int, user: bool) -> tuple[_Region, int]:
        if length < 0 or addr < 0:
            raise MemoryFault(f"bad range {addr:#x}+{length}")
        for r in self._regions:
            off = addr - (r.user_addr if user else r.guest_addr)
            if 0 <= off and off + length <= r.size:
                return r, off
        kind = "user" if user else "guest"
        raise MemoryFault(f"{kind} range {addr:#x}+{length:#x} is outside every memory region")

    def translate(self, addr: int, length: int, *, user: bool = False) -> memoryview:
        """A view of ``length`` bytes at guest (or, with ``user``, frontend) address ``addr``."""
        r, off = self._find(addr, length, user)
        return r.view[off : off + length]

    def locate(self, addr: int, length: int) -> tuple[memoryview, int]:
        """Like :meth:`translate` for a guest address, plus the host address to give
        :meth:`copy_out`/:meth:`copy_in` (0 for unguarded memory)."""
        r, off = self._find(addr, length, False)
        return r.view[off : off + length], r.host + off if r.host else 0

    def copy_out(self, views: Sequence[memoryview], hosts: Sequence[int], limit: int) -> bytes | None:
        """Up to ``limit`` bytes from the buffers ``views`` (at ``hosts``, from
        :meth:`locate`), joined; None if the memory has gone."""
        if len(views) == 1:  # the common case, with the least Python around the copy
            host = hosts[0]
            n = min(limit, len(views[0]))
            if not host:
                return views[0][:n].tobytes()
            buf = self._scratch if n <= self._scratch_len else self._grow_scratch(n)
            if lib.sp_guest_read(buf, host, n) < 0:
                return None
            # The guarded copy lands in our own buffer; one more memcpy makes it bytes.
            data: bytes = ffi.unpack(buf, n)
            return data
        total = min(limit, sum(len(v) for v in views))
        buf = self._scratch if total <= self._scratch_len else self._grow_scratch(total)
        at = 0
        for view, host in zip(views, hosts):
            n = min(len(view), total - at)
            if n <= 0:
                break
            if host:
                if lib.sp_guest_read(buf + at, host, n) < 0:
                    return None
            else:
                ffi.memmove(buf + at, view[:n], n)
            at += n
        joined: bytes = ffi.unpack(buf, total)
        return joined

    def _grow_scratch(self, n: int) -> Any:
        self._scratch = ffi.new("char[]", n)
        self._scratch_len = n
        return self._scratch

    def copy_in(self, view: memoryview, host: int, offset: int, data: memoryview) -> bool:
        """Write ``data`` into the buffer ``view`` (at ``host``) from ``offset``; False if
        the memory has gone."""
        if not host:
            view[offset : offset + len(data)] = data
            return True
        src = ffi.from_buffer(data)
        try:
            return bool(lib.sp_guest_write(host + offset, src, len(data)) == 0)
        finally:
            ffi.release(src)

    def close(self) -> None:
        """Unmap everything.  Views still held elsewhere keep their mapping alive until
        they are dropped (mmap refuses to close under exported buffers); nothing here can
        then touch it."""
        regions, self._regions = self._regions, []
        for r in regions:
            if r.guard >= 0:
                lib.sp_guest_remove(r.guard)  # before the address range can be reused
                r.guard = -1
            r.view.release()
            if r.backing is not None:
                try:
                    r.backing.close()
                except BufferError:
                    log.debug("guest memory region still referenced; unmapped when released")
