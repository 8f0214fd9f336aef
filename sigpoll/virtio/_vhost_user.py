"""The vhost-user wire format, as pure functions: no sockets, no file descriptors opened.

A message is a 12-byte header (``u32 request, u32 flags, u32 size``, little-endian) and
``size`` bytes of payload.  File descriptors travel beside the bytes as SCM_RIGHTS ancillary
data; the codec only counts them.  Everything a frontend sends is untrusted: every decoder
checks lengths and ranges and raises :class:`ProtocolError` with a sentence saying what was
wrong, so the server can log it and drop the connection.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

__all__ = [
    "HEADER",
    "MAX_CONFIG_SIZE",
    "MAX_MEM_REGIONS",
    "MAX_PAYLOAD",
    "VERSION",
    "VRING_INDEX_MASK",
    "VRING_NOFD",
    "BackendRequest",
    "ConfigPayload",
    "Feature",
    "Flag",
    "MemoryRegion",
    "Message",
    "MessageFramer",
    "ProtocolError",
    "ProtocolFeature",
    "Request",
    "VringAddr",
    "decode_config",
    "decode_header",
    "decode_mem_table",
    "decode_u64",
    "decode_vring_addr",
    "decode_vring_file",
    "decode_vring_state",
    "encode_config",
    "encode_message",
    "encode_mem_table",
    "encode_u64",
    "encode_vring_addr",
    "encode_vring_state",
]


class ProtocolError(Exception):
    """A frontend sent something the protocol does not allow (the connection is dropped)."""


class Request(enum.IntEnum):
    """Frontend-to-backend request codes."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    RESET_DEVICE = 34


class BackendRequest(enum.IntEnum):
    """Backend-to-frontend requests (on the channel from SET_BACKEND_REQ_FD)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2


class Flag(enum.IntFlag):
    """Header flag bits: the low two bits are the protocol version."""

    VERSION_MASK = 0x3
    REPLY = 0x4
    NEED_REPLY = 0x8


class Feature(enum.IntFlag):
    """Transport-level virtio feature bits a vhost-user backend deals with."""

    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30  # vhost-user's own bit: rings start disabled when acked
    VERSION_1 = 1 << 32


class ProtocolFeature(enum.IntFlag):
    """vhost-user protocol feature bits (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CONFIG = 1 << 9
    RESET_DEVICE = 1 << 13


VERSION = 0x1
HEADER = struct.Struct("<III")
MAX_MEM_REGIONS = 8
MAX_CONFIG_SIZE = 256
# The largest payload any request we accept can have (a GET/SET_CONFIG with a full config
# space); anything bigger is a broken or hostile frontend, not a message to buffer.
MAX_PAYLOAD = 4096
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8

_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_MEM_HEAD = struct.Struct("<II")
_REGION = struct.Struct("<QQQQ")
_CONFIG_HEAD = struct.Struct("<III")


@dataclass
class Message:
    """One decoded message: its request code, flags, payload bytes and the fds that came with it."""

    request: int
    flags: int
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & Flag.NEED_REPLY)

    @property
    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"


def encode_message(request: int, payload: bytes = b"", *, reply: bool = False, need_reply: bool = False) -> bytes:
    """Header plus payload, ready for one ``sendmsg``."""
    flags = VERSION | (Flag.REPLY if reply else 0) | (Flag.NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, int(flags), len(payload)) + payload


def decode_header(data: bytes) -> tuple[int, int, int]:
    """``(request, flags, size)`` from 12 header bytes, checking version and size."""
    if len(data) != HEADER.size:
        raise ProtocolError(f"header is {len(data)} bytes, not {HEADER.size}")
    request, flags, size = HEADER.unpack(data)
    if flags & Flag.VERSION_MASK != VERSION:
        raise ProtocolError(f"unsupported vhost-user version {flags & Flag.VERSION_MASK} (flags {flags:#x})")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"payload size {size} exceeds the limit of {MAX_PAYLOAD}")
    return request, flags, size


class MessageFramer:
    """Cuts a byte stream (plus the fds received with it) into :class:`Message` objects.

    The caller asks :meth:`wanted` how many bytes to read next and reads at most that many,
    so the fds of one sendmsg are never attributed to another message: a frontend sends each
    message (header and payload, fds attached) in one sendmsg, and reading no further than
    the current message keeps that boundary.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: tuple[int, int, int] | None = None
        self._fds: list[int] = []

    def wanted(self) -> int:
        """How many more bytes the current message needs (> 0)."""
        if self._header is None:
            return HEADER.size - len(self._buf)
        return self._header[2] - len(self._buf)

    def pending_fds(self) -> list[int]:
        """Fds received for a message that is not complete yet (to close on teardown)."""
        return list(self._fds)

    def feed(self, data: bytes, fds: list[int] = ()) -> Message | None:  # type: ignore[assignment]
        """Add bytes (no more than :meth:`wanted`) and fds; return a message once complete."""
        self._fds.extend(fds)
        if len(data) > self.wanted():
            raise ValueError("fed more bytes than wanted()")
        self._buf += data
        if self._header is None:
            if len(self._buf) < HEADER.size:
                return None
            self._header = decode_header(bytes(self._buf))
            self._buf.clear()
        request, flags, size = self._header
        if len(self._buf) < size:
            return None
        msg = Message(request, flags, bytes(self._buf), self._fds)
        self._buf = bytearray()
        self._header = None
        self._fds = []
        return msg


def _exact(payload: bytes, st: struct.Struct, what: str) -> tuple[int, ...]:
    if len(payload) != st.size:
        raise ProtocolError(f"{what} payload is {len(payload)} bytes, not {st.size}")
    return st.unpack(payload)


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64(payload: bytes, what: str = "u64") -> int:
    return _exact(payload, _U64, what)[0]


def encode_vring_state(index: int, num: int) -> bytes:
    return _STATE.pack(index, num)


def decode_vring_state(payload: bytes) -> tuple[int, int]:
    """``(index, num)`` of a SET_VRING_NUM/BASE/ENABLE or GET_VRING_BASE payload."""
    index, num = _exact(payload, _STATE, "vring state")
    return index, num


def decode_vring_file(payload: bytes) -> tuple[int, bool]:
    """``(index, has_fd)`` of a SET_VRING_KICK/CALL/ERR payload."""
    value = decode_u64(payload, "vring file")
    if value & ~(VRING_INDEX_MASK | VRING_NOFD):
        raise ProtocolError(f"vring file payload has unknown bits set: {value:#x}")
    return value & VRING_INDEX_MASK, not value & VRING_NOFD


@dataclass(frozen=True)
class VringAddr:
    """SET_VRING_ADDR: the ring's three parts as frontend (user) addresses."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


def encode_vring_addr(addr: VringAddr) -> bytes:
    return _ADDR.pack(addr.index, addr.flags, addr.desc, addr.used, addr.avail, addr.log)


def decode_vring_addr(payload: bytes) -> VringAddr:
    return VringAddr(*_exact(payload, _ADDR, "vring address"))


@dataclass(frozen=True)
class MemoryRegion:
    """One SET_MEM_TABLE region: guest physical range, frontend virtual address, fd offset."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


def encode_mem_table(regions: list[MemoryRegion]) -> bytes:
    out = _MEM_HEAD.pack(len(regions), 0)
    for r in regions:
        out += _REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset)
    return out


def decode_mem_table(payload: bytes, nfds: int) -> list[MemoryRegion]:
    """Regions of a SET_MEM_TABLE; there must be exactly one fd per region."""
    if len(payload) < _MEM_HEAD.size:
        raise ProtocolError("memory table payload too short")
    count, _padding = _MEM_HEAD.unpack_from(payload)
    if not 1 <= count <= MAX_MEM_REGIONS:
        raise ProtocolError(f"memory table with {count} regions (1..{MAX_MEM_REGIONS} allowed)")
    # Frontends send `count` regions or their own fixed-size array (UML: always 2, QEMU: 8);
    # entries past `count` are ignored.
    body = len(payload) - _MEM_HEAD.size
    if body % _REGION.size or not count <= body // _REGION.size <= MAX_MEM_REGIONS:
        raise ProtocolError(f"memory table payload is {len(payload)} bytes for {count} regions")
    if nfds != count:
        raise ProtocolError(f"memory table has {count} regions but came with {nfds} fds")
    regions = []
    for i in range(count):
        r = MemoryRegion(*_REGION.unpack_from(payload, _MEM_HEAD.size + i * _REGION.size))
        if r.size == 0:
            raise ProtocolError(f"memory region {i} is empty")
        for what, base in (("guest", r.guest_addr), ("user", r.user_addr), ("offset", r.mmap_offset)):
            if base + r.size > 1 << 64:
                raise ProtocolError(f"memory region {i} {what} range wraps around")
        regions.append(r)
    ordered = sorted(regions, key=lambda r: r.guest_addr)
    for a, b in zip(ordered, ordered[1:]):
        if a.guest_addr + a.size > b.guest_addr:
            raise ProtocolError("memory regions overlap in guest address space")
    return regions


@dataclass(frozen=True)
class ConfigPayload:
    """GET/SET_CONFIG: ``size`` bytes of config space starting at ``offset``."""

    offset: int
    size: int
    flags: int
    data: bytes


def encode_config(cfg: ConfigPayload) -> bytes:
    return _CONFIG_HEAD.pack(cfg.offset, cfg.size, cfg.flags) + cfg.data


def decode_config(payload: bytes) -> ConfigPayload:
    if len(payload) < _CONFIG_HEAD.size:
        raise ProtocolError("config payload too short")
    offset, size, flags = _CONFIG_HEAD.unpack_from(payload)
    data = payload[_CONFIG_HEAD.size :]
    if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE or offset + size > MAX_CONFIG_SIZE:
        raise ProtocolError(f"config range {offset}+{size} beyond {MAX_CONFIG_SIZE} bytes")
    if len(data) != size:
        raise ProtocolError(f"config payload carries {len(data)} bytes but says {size}")
    return ConfigPayload(offset, size, flags, bytes(data))
