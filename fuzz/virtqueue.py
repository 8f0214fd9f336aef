"""Fuzz target: the split-virtqueue walker (``sigpoll.virtio._virtqueue``) over hostile memory.

One input describes a guest: one to three memory regions (bytearrays) at fuzzed guest and
frontend ("user") base addresses -- zero, page-aligned, right below 2**64 -- a queue size
(powers of two and not), ring addresses (inside, straddling or outside the regions,
misaligned), a ring base and EVENT_IDX on or off.  The rest of the input is a program
of guest writes (descriptors with fuzzed address/length/flags/next, indirect tables, avail
entries, the avail index, raw bytes anywhere) interleaved with device actions (pop,
push, fill, enable_kicks, should_notify).

Checked on every pop, against a small reference walk written from the virtio spec's
rules as this module enforces them: a chain comes back only if the reference finds it
well formed, and then with exactly the reference's buffers -- same guest bytes (compared
by address), same lengths, readable before writable; otherwise the queue is broken with a
non-empty reason and stays silent.  No exception of any kind may escape, every buffer
lies wholly inside one region, and filling a chain writes nowhere else (guard bytes
around every region are checked).

Run longer: ``python fuzz/virtqueue.py [workdir] [-max_total_time=600] ...``
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (_HERE, os.path.dirname(_HERE)) if p not in sys.path]

from _fuzzcommon import ByteReader, fuzz_main, instrumentation  # noqa: E402

with instrumentation(__name__):
    from sigpoll.virtio._memory import GuestMemory
    from sigpoll.virtio._vhost_user import VringAddr
    from sigpoll.virtio._virtqueue import (
        DESC_F_INDIRECT,
        DESC_F_NEXT,
        DESC_F_WRITE,
        MAX_CHAIN_BYTES,
        MAX_CHAIN_READ,
        MAX_INDIRECT,
        Chain,
        Virtqueue,
    )

__all__ = ["TARGET", "one_input"]

TARGET = "virtqueue"

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_GUARD = 64
_GUARD_BYTE = 0xA5
_TOP = 1 << 64
_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 0, 3, 48, 32768, 65536]
_LENGTHS = [0, 1, 2, 15, 16, 17, 32, 64, 4096, 0xFFFFFFFF, 0x80000000, 1 << 20, (1 << 20) + 1]


class _Region:
    """One region: a guarded slice of a bytearray, and where it sits for the guest."""

    def __init__(self, guest: int, user: int, size: int, fill: bytes) -> None:
        self.guest, self.user, self.size = guest, user, size
        self.backing = bytearray([_GUARD_BYTE]) * (size + 2 * _GUARD)
        if fill:
            self.backing[_GUARD:_GUARD + size] = (fill * (size // len(fill) + 1))[:size]
        self.view = memoryview(self.backing)[_GUARD:_GUARD + size]
        probe = ctypes.c_char.from_buffer(self.backing)
        self.address = ctypes.addressof(probe) + _GUARD  # host address of byte 0
        del probe

    def guards_intact(self) -> bool:
        g = bytes([_GUARD_BYTE]) * _GUARD
        return self.backing[:_GUARD] == g and self.backing[_GUARD + self.size:] == g


def _address(r: ByteReader, regions: list[_Region], user: bool) -> int:
    """A fuzzed address: mostly inside (or just past) a region, sometimes anything."""
    mode = r.u8() % 8
    if mode == 7:
        return r.uint(8)
    reg = regions[r.u8() % len(regions)]
    base = reg.user if user else reg.guest
    if mode == 6:
        return (base + reg.size - r.u8()) % _TOP
    return (base + r.uint(2) % (reg.size + 32)) % _TOP


def _find(regions: list[_Region], addr: int, length: int, user: bool) -> tuple[_Region, int] | None:
    """The region wholly holding ``addr``+``length`` (first match, as GuestMemory does)."""
    for reg in regions:
        off = addr - (reg.user if user else reg.guest)
        if 0 <= off and off + length <= reg.size:
            return reg, off
    return None


def _poke(regions: list[_Region], addr: int, data: bytes, user: bool) -> None:
    """Guest write of ``data`` at ``addr`` (clipped to the region it starts in)."""
    hit = _find(regions, addr, 1, user)
    if hit is None:
        return
    reg, off = hit
    n = min(len(data), reg.size - off)
    reg.view[off:off + n] = data[:n]


def _peek(regions: list[_Region], addr: int, length: int, user: bool) -> bytes | None:
    hit = _find(regions, addr, length, user)
    if hit is None:
        return None
    reg, off = hit
    return bytes(reg.view[off:off + length])


def _reference_walk(regions: list[_Region], desc_user: int, num: int,
                    head: int) -> list[tuple[int, int, bool]] | None:
    """The chain from ``head`` as ``(host address, length, writable)``; None if malformed."""
    if head >= num:
        return None
    table_addr, table_len, user = desc_user, num, True
    index, seen, total, readable, in_indirect = head, 0, 0, 0, False
    out: list[tuple[int, int, bool]] = []
    while True:
        seen += 1
        if seen > table_len:
            return None
        raw = _peek(regions, table_addr + 16 * index, 16, user)
        assert raw is not None  # the table itself was translated already
        addr, length, flags, nxt = _DESC.unpack(raw)
        if flags & DESC_F_INDIRECT:
            if in_indirect or flags & DESC_F_NEXT:
                return None
            if length == 0 or length % 16 or length // 16 > MAX_INDIRECT:
                return None
            if _find(regions, addr, length, False) is None:
                return None
            table_addr, table_len, user = addr, length // 16, False
            index, seen, in_indirect = 0, 0, True
            continue
        total += length
        if total > MAX_CHAIN_BYTES:
            return None
        if not flags & DESC_F_WRITE:
            readable += length  # repeats count: each is a copy the device would make
            if readable > MAX_CHAIN_READ:
                return None
        if length:
            hit = _find(regions, addr, length, False)
            if hit is None:
                return None
            writable = bool(flags & DESC_F_WRITE)
            if not writable and any(w for _, _, w in out):
                return None
            out.append((hit[0].address + hit[1], length, writable))
        if not flags & DESC_F_NEXT:
            return out
        if nxt >= table_len:
            return None
        index = nxt


def _host_address(view: memoryview) -> int:
    probe = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


def _check_chain(chain: Chain, expected: list[tuple[int, int, bool]], regions: list[_Region]) -> None:
    got = [(_host_address(v), len(v), False) for v in chain.readable]
    got += [(_host_address(v), len(v), True) for v in chain.writable]
    assert got == expected, (got, expected)
    for addr, length, _ in got:
        assert any(reg.address <= addr and addr + length <= reg.address + reg.size for reg in regions)


def one_input(data: bytes) -> None:
    """Build a guest from ``data`` and run the queue over it; any escape is a bug."""
    r = ByteReader(data)
    nregions = 1 + r.u8() % 3
    regions: list[_Region] = []
    for _ in range(nregions):
        size = (1 + r.u8() % 16) * 4096 if r.u8() % 4 else 1 + r.uint(2) % 8192
        bases = []
        for _ in range(2):
            mode = r.u8() % 4
            if mode == 0:
                base = r.uint(2) * 4096
            elif mode == 1:
                base = _TOP - size - r.u8() * 4096
            elif mode == 2:
                base = r.uint(8)
            else:
                base = (0x100000 * (len(regions) + 1)) if not bases else 0x7F0000000000 + 0x1000000 * len(regions)
            bases.append(max(0, min(base, _TOP - size)))
        regions.append(_Region(bases[0], bases[1], size, r.take(r.u8() % 32)))
    mem = GuestMemory([(reg.guest, reg.user, reg.view) for reg in regions])
    q = Virtqueue(0, name="fuzz")
    num = r.pick(_SIZES) if r.u8() % 4 == 0 else 1 << (r.u8() % 9)
    q.set_num(num)
    q.set_base(r.uint(2) if r.u8() % 2 else 0)
    q.event_idx = bool(r.u8() % 2)
    # Lay the three rings out one after another in a region unless the input says otherwise.
    home = regions[0]
    if r.u8() % 4:
        desc = home.user + 16 * (r.u8() % 4)
        avail = desc + 16 * max(num, 1) + 2 * (r.u8() % 2)
        used = (avail + 6 + 2 * max(num, 1) + 3) // 4 * 4
    else:
        desc, avail, used = (_address(r, regions, True) for _ in range(3))
    q.set_addr(VringAddr(0, 0, desc, used, avail, 0))
    active = q.activate(mem)
    if not active:
        assert q.broken, "activate failed without a reason"
    chains: list[Chain] = []
    avail_idx = q.last_avail
    try:
        for _ in range(96):
            if not len(r):
                break
            op = r.u8() % 10
            if op == 0 or op == 1:  # a descriptor in the ring's table
                index = r.u8() % max(num, 1)
                _poke(regions, desc + 16 * index, _DESC.pack(
                    _address(r, regions, False), r.pick(_LENGTHS) if r.u8() % 2 else r.uint(2),
                    r.u8() % 8, r.u8() % (max(num, 1) + 2)), True)
            elif op == 2:  # an indirect table entry somewhere in guest memory
                at = _address(r, regions, False)
                _poke(regions, at, _DESC.pack(_address(r, regions, False), r.pick(_LENGTHS),
                                             r.u8() % 8, r.u8() % 8), False)
            elif op == 3:  # make a head available
                _poke(regions, avail + 4 + 2 * (avail_idx % max(num, 1)),
                      _U16.pack(r.u8() % (max(num, 1) + 1)), True)
                avail_idx = (avail_idx + 1) & 0xFFFF
                _poke(regions, avail + 2, _U16.pack(avail_idx), True)
            elif op == 4:  # the avail index jumps anywhere
                avail_idx = r.uint(2)
                _poke(regions, avail + 2, _U16.pack(avail_idx), True)
            elif op == 5:  # raw guest bytes anywhere
                _poke(regions, _address(r, regions, r.u8() % 2 == 0), r.take(r.u8() % 24), False)
            elif op == 6 or op == 7:  # the device pops
                was_broken = q.broken
                pending = q.pending()
                if not q.active:
                    assert q.pop() is None
                    continue
                if pending == 0:
                    assert q.pop() is None and not q.broken
                    continue
                slot = avail + 4 + 2 * (q.last_avail % num)
                head_raw = _peek(regions, slot, 2, True)
                assert head_raw is not None
                expected = _reference_walk(regions, desc, num, _U16.unpack(head_raw)[0])
                before = q.last_avail
                chain = q.pop()
                if expected is None:
                    assert chain is None and q.broken and not was_broken, (chain, q.broken)
                    assert not q.active and q.pop() is None
                else:
                    assert chain is not None, q.broken
                    assert q.last_avail == (before + 1) & 0xFFFF
                    _check_chain(chain, expected, regions)
                    chains.append(chain)
            elif op == 8:  # the device fills and returns the oldest chain
                if chains:
                    chain = chains.pop(0)
                    payload = r.take(r.u8())
                    taken = chain.fill(payload)
                    assert taken == min(len(payload), chain.writable_len)
                    chain.fill(payload)
                    assert chain.written <= chain.writable_len
                    q.push(chain.head, chain.written)
                    chain.release()
                else:
                    q.push(r.uint(2), r.uint(4))
            else:
                if r.u8() % 2:
                    q.enable_kicks()
                else:
                    q.should_notify()
            if q.broken:
                assert isinstance(q.broken, str) and q.broken
                assert not q.active
    finally:
        for chain in chains:
            chain.release()
        q.deactivate()
        mem.close()
    for reg in regions:
        assert reg.guards_intact(), "a write landed outside guest memory"


if __name__ == "__main__":
    fuzz_main(one_input, TARGET)
