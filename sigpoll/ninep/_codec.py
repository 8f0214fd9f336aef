"""Pure 9P2000.L codec: message classes, encoding, decoding and framing.  No I/O.

Every message is ``size[4] type[1] tag[2] body``, little-endian.  The decoder trusts
nothing: a length field is checked against the bytes that are actually there before
anything is sliced or allocated, and every failure is a :class:`ProtocolError`.  Two kinds
are told apart because a peer must react differently to them:

* :class:`FramingError` -- the byte stream itself cannot be cut into messages (a size
  field below the header size or above the negotiated msize).  Nothing after it can be
  trusted; the connection has to be closed.
* :class:`MessageError` -- one well-framed message has a bad body or an unknown type.
  Its tag is known, so a server answers it with Rlerror and carries on.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

__all__ = [
    "ProtocolError",
    "FramingError",
    "MessageError",
    "Qid",
    "Dirent",
    "Message",
    "MESSAGE_CLASSES",
    "NOTAG",
    "NOFID",
    "NONUNAME",
    "MAXWELEM",
    "HEADER_SIZE",
    "VERSION_9P2000L",
    "encode",
    "decode",
    "decode_header",
    "encode_dirents",
    "decode_dirents",
    "FrameBuffer",
    "QTDIR",
    "QTSYMLINK",
    "QTFILE",
    "GETATTR_BASIC",
    "GETATTR_ALL",
    "SETATTR_MODE",
    "SETATTR_UID",
    "SETATTR_GID",
    "SETATTR_SIZE",
    "SETATTR_ATIME",
    "SETATTR_MTIME",
    "SETATTR_CTIME",
    "SETATTR_ATIME_SET",
    "SETATTR_MTIME_SET",
    "LOCK_SUCCESS",
    "LOCK_BLOCKED",
    "LOCK_ERROR",
    "LOCK_GRACE",
    "LOCK_TYPE_RDLCK",
    "LOCK_TYPE_WRLCK",
    "LOCK_TYPE_UNLCK",
]

NOTAG = 0xFFFF
NOFID = 0xFFFFFFFF
NONUNAME = 0xFFFFFFFF
#: Linux and Plan 9 never put more than 16 names in one Twalk.
MAXWELEM = 16
HEADER_SIZE = 7
VERSION_9P2000L = "9P2000.L"

QTDIR = 0x80
QTSYMLINK = 0x02
QTFILE = 0x00

GETATTR_BASIC = 0x000007FF
GETATTR_ALL = 0x00003FFF

SETATTR_MODE = 0x001
SETATTR_UID = 0x002
SETATTR_GID = 0x004
SETATTR_SIZE = 0x008
SETATTR_ATIME = 0x010
SETATTR_MTIME = 0x020
SETATTR_CTIME = 0x040
SETATTR_ATIME_SET = 0x080
SETATTR_MTIME_SET = 0x100

LOCK_TYPE_RDLCK = 0
LOCK_TYPE_WRLCK = 1
LOCK_TYPE_UNLCK = 2
LOCK_SUCCESS = 0
LOCK_BLOCKED = 1
LOCK_ERROR = 2
LOCK_GRACE = 3


class ProtocolError(Exception):
    """Bytes that are not valid 9P2000.L (or a message that cannot be encoded)."""

    #: errno a server puts in the Rlerror for this error.
    errno: int = errno.EPROTO


class FramingError(ProtocolError):
    """The stream cannot be cut into messages any more: close the connection.

    ``frames`` holds the complete frames that came before the bad size field (from
    :meth:`FrameBuffer.feed`), so a peer may still answer them before closing.
    """

    def __init__(self, message: str, frames: list[bytes] | None = None) -> None:
        super().__init__(message)
        self.frames = frames or []


class MessageError(ProtocolError):
    """One framed message is malformed.  ``tag``/``type`` say which one, when known."""

    def __init__(self, message: str, tag: int | None = None, type: int | None = None) -> None:
        super().__init__(message)
        self.tag = tag
        self.type = type


class Qid(NamedTuple):
    """A server's unique id for a file: type bits, version, path (its inode here)."""

    type: int
    version: int
    path: int


class Dirent(NamedTuple):
    """One entry of an Rreaddir payload."""

    qid: Qid
    offset: int
    type: int
    name: str


# Field kinds.  Fixed-size ones map to struct codes; the rest are handled by hand.
_FIXED = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "qid": "BIQ"}
_S_U16 = struct.Struct("<H")
_S_U32 = struct.Struct("<I")
_S_HEADER = struct.Struct("<IBH")
_S_QID = struct.Struct("<BIQ")


class Message:
    """Base class of every 9P2000.L message.

    Subclasses are generated from the table below; each has ``TYPE`` (the wire id),
    ``FIELDS`` (names, in wire order) and one attribute per field plus ``tag``.
    """

    __slots__ = ("tag",)
    TYPE: ClassVar[int] = -1
    FIELDS: ClassVar[tuple[str, ...]] = ()
    KINDS: ClassVar[tuple[str, ...]] = ()
    #: Trailing fields that older peers may leave out, with their defaults.
    OPTIONAL: ClassVar[dict[str, Any]] = {}

    if TYPE_CHECKING:
        # Fields are generated per class; tell type checkers they exist.
        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, *args: Any, tag: int = NOTAG, **kwargs: Any) -> None:
        if len(args) > len(self.FIELDS):
            raise TypeError(f"{type(self).__name__} takes {len(self.FIELDS)} fields")
        self.tag = tag
        for name, value in zip(self.FIELDS, args):
            setattr(self, name, value)
        for name in self.FIELDS[len(args):]:
            if name in kwargs:
                setattr(self, name, kwargs.pop(name))
            elif name in self.OPTIONAL:
                setattr(self, name, self.OPTIONAL[name])
            else:
                raise TypeError(f"{type(self).__name__} is missing field {name!r}")
        if kwargs:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(kwargs))!r}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.tag == other.tag and all(
            getattr(self, f) == getattr(other, f) for f in self.FIELDS
        )

    def __repr__(self) -> str:
        parts = [f"tag={self.tag}"]
        for f in self.FIELDS:
            v = getattr(self, f)
            if isinstance(v, (bytes, bytearray, memoryview)) and len(v) > 32:
                v = f"<{len(v)} bytes>"
            parts.append(f"{f}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


# name, type id, fields as (name, kind).  Kinds: u8 u16 u32 u64 qid s (u16-prefixed
# string) data (u32-prefixed bytes) wnames (u16 count + s) wqids (u16 count + qid).
_TABLE: list[tuple[str, int, list[tuple[str, str]]]] = [
    ("Rlerror", 7, [("ecode", "u32")]),
    ("Tstatfs", 8, [("fid", "u32")]),
    ("Rstatfs", 9, [("fstype", "u32"), ("bsize", "u32"), ("blocks", "u64"), ("bfree", "u64"),
                    ("bavail", "u64"), ("files", "u64"), ("ffree", "u64"), ("fsid", "u64"),
                    ("namelen", "u32")]),
    ("Tlopen", 12, [("fid", "u32"), ("flags", "u32")]),
    ("Rlopen", 13, [("qid", "qid"), ("iounit", "u32")]),
    ("Tlcreate", 14, [("fid", "u32"), ("name", "s"), ("flags", "u32"), ("mode", "u32"),
                      ("gid", "u32")]),
    ("Rlcreate", 15, [("qid", "qid"), ("iounit", "u32")]),
    ("Tsymlink", 16, [("fid", "u32"), ("name", "s"), ("symtgt", "s"), ("gid", "u32")]),
    ("Rsymlink", 17, [("qid", "qid")]),
    ("Tmknod", 18, [("dfid", "u32"), ("name", "s"), ("mode", "u32"), ("major", "u32"),
                    ("minor", "u32"), ("gid", "u32")]),
    ("Rmknod", 19, [("qid", "qid")]),
    ("Trename", 20, [("fid", "u32"), ("dfid", "u32"), ("name", "s")]),
    ("Rrename", 21, []),
    ("Treadlink", 22, [("fid", "u32")]),
    ("Rreadlink", 23, [("target", "s")]),
    ("Tgetattr", 24, [("fid", "u32"), ("request_mask", "u64")]),
    ("Rgetattr", 25, [("valid", "u64"), ("qid", "qid"), ("mode", "u32"), ("uid", "u32"),
                      ("gid", "u32"), ("nlink", "u64"), ("rdev", "u64"), ("size", "u64"),
                      ("blksize", "u64"), ("blocks", "u64"), ("atime_sec", "u64"),
                      ("atime_nsec", "u64"), ("mtime_sec", "u64"), ("mtime_nsec", "u64"),
                      ("ctime_sec", "u64"), ("ctime_nsec", "u64"), ("btime_sec", "u64"),
                      ("btime_nsec", "u64"), ("gen", "u64"), ("data_version", "u64")]),
    ("Tsetattr", 26, [("fid", "u32"), ("valid", "u32"), ("mode", "u32"), ("uid", "u32"),
                      ("gid", "u32"), ("size", "u64"), ("atime_sec", "u64"),
                      ("atime_nsec", "u64"), ("mtime_sec", "u64"), ("mtime_nsec", "u64")]),
    ("Rsetattr", 27, []),
    ("Txattrwalk", 30, [("fid", "u32"), ("newfid", "u32"), ("name", "s")]),
    ("Rxattrwalk", 31, [("size", "u64")]),
    ("Txattrcreate", 32, [("fid", "u32"), ("name", "s"), ("attr_size", "u64"),
                          ("flags", "u32")]),
    ("Rxattrcreate", 33, []),
    ("Treaddir", 40, [("fid", "u32"), ("offset", "u64"), ("count", "u32")]),
    ("Rreaddir", 41, [("data", "data")]),
    # Linux sends a datasync word after the fid; diod's table has only the fid.
    ("Tfsync", 50, [("fid", "u32"), ("datasync", "u32?")]),
    ("Rfsync", 51, []),
    ("Tlock", 52, [("fid", "u32"), ("type", "u8"), ("flags", "u32"), ("start", "u64"),
                   ("length", "u64"), ("proc_id", "u32"), ("client_id", "s")]),
    ("Rlock", 53, [("status", "u8")]),
    ("Tgetlock", 54, [("fid", "u32"), ("type", "u8"), ("start", "u64"), ("length", "u64"),
                      ("proc_id", "u32"), ("client_id", "s")]),
    ("Rgetlock", 55, [("type", "u8"), ("start", "u64"), ("length", "u64"),
                      ("proc_id", "u32"), ("client_id", "s")]),
    ("Tlink", 70, [("dfid", "u32"), ("fid", "u32"), ("name", "s")]),
    ("Rlink", 71, []),
    ("Tmkdir", 72, [("dfid", "u32"), ("name", "s"), ("mode", "u32"), ("gid", "u32")]),
    ("Rmkdir", 73, [("qid", "qid")]),
    ("Trenameat", 74, [("olddirfid", "u32"), ("oldname", "s"), ("newdirfid", "u32"),
                       ("newname", "s")]),
    ("Rrenameat", 75, []),
    ("Tunlinkat", 76, [("dirfid", "u32"), ("name", "s"), ("flags", "u32")]),
    ("Runlinkat", 77, []),
    ("Tversion", 100, [("msize", "u32"), ("version", "s")]),
    ("Rversion", 101, [("msize", "u32"), ("version", "s")]),
    # n_uname is part of 9P2000.u/.L; a 9P2000 client leaves it out.
    ("Tauth", 102, [("afid", "u32"), ("uname", "s"), ("aname", "s"), ("n_uname", "u32?")]),
    ("Rauth", 103, [("aqid", "qid")]),
    ("Tattach", 104, [("fid", "u32"), ("afid", "u32"), ("uname", "s"), ("aname", "s"),
                      ("n_uname", "u32?")]),
    ("Rattach", 105, [("qid", "qid")]),
    ("Tflush", 108, [("oldtag", "u16")]),
    ("Rflush", 109, []),
    ("Twalk", 110, [("fid", "u32"), ("newfid", "u32"), ("wnames", "wnames")]),
    ("Rwalk", 111, [("wqids", "wqids")]),
    ("Tread", 116, [("fid", "u32"), ("offset", "u64"), ("count", "u32")]),
    ("Rread", 117, [("data", "data")]),
    ("Twrite", 118, [("fid", "u32"), ("offset", "u64"), ("data", "data")]),
    ("Rwrite", 119, [("count", "u32")]),
    ("Tclunk", 120, [("fid", "u32")]),
    ("Rclunk", 121, []),
    ("Tremove", 122, [("fid", "u32")]),
    ("Rremove", 123, []),
]

_OPTIONAL_DEFAULTS = {"datasync": 0, "n_uname": NONUNAME}

#: Wire id -> message class.
MESSAGE_CLASSES: dict[int, type[Message]] = {}


# A compiled plan is a list of steps: ("fixed", Struct, names-with-qid-markers) or
# (kind, name).  Consecutive fixed-size fields share one Struct call, which is most of
# the cost of a small message.
_Plan = list[tuple[Any, ...]]


def _compile(fields: list[tuple[str, str]]) -> _Plan:
    plan: _Plan = []
    fmt, names = "", []  # type: ignore[var-annotated]
    for name, kind in fields:
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if optional and fmt:
            # An optional field gets a step of its own so decode can stop before it.
            plan.append(("fixed", struct.Struct("<" + fmt), tuple(names)))
            fmt, names = "", []
        if kind in _FIXED:
            fmt += _FIXED[kind]
            names.append((name, kind == "qid"))
            continue
        if fmt:
            plan.append(("fixed", struct.Struct("<" + fmt), tuple(names)))
            fmt, names = "", []
        plan.append((kind, name))
    if fmt:
        plan.append(("fixed", struct.Struct("<" + fmt), tuple(names)))
    return plan


_PLANS: dict[int, _Plan] = {}

for _name, _tid, _fields in _TABLE:
    _cls = type(
        _name,
        (Message,),
        {
            "__slots__": tuple(n for n, _ in _fields),
            "TYPE": _tid,
            "FIELDS": tuple(n for n, _ in _fields),
            "KINDS": tuple(k for _, k in _fields),
            "OPTIONAL": {n: _OPTIONAL_DEFAULTS[n] for n, k in _fields if k.endswith("?")},
            "__module__": __name__,
            "__doc__": f"9P2000.L {_name} (type {_tid}).",
        },
    )
    MESSAGE_CLASSES[_tid] = _cls
    globals()[_name] = _cls
    __all__.append(_name)
    _PLANS[_tid] = _compile(_fields)
    # Optional trailing fields must be last and alone so decode can simply stop early.
    for _i, (_n, _k) in enumerate(_fields):
        if _k.endswith("?"):
            assert _i == len(_fields) - 1

del _name, _tid, _fields, _cls

# Explicit names for type checkers and readers; the classes are built above.
Rlerror: type[Message]
Tstatfs: type[Message]
Rstatfs: type[Message]
Tlopen: type[Message]
Rlopen: type[Message]
Tlcreate: type[Message]
Rlcreate: type[Message]
Tsymlink: type[Message]
Rsymlink: type[Message]
Tmknod: type[Message]
Rmknod: type[Message]
Trename: type[Message]
Rrename: type[Message]
Treadlink: type[Message]
Rreadlink: type[Message]
Tgetattr: type[Message]
Rgetattr: type[Message]
Tsetattr: type[Message]
Rsetattr: type[Message]
Txattrwalk: type[Message]
Rxattrwalk: type[Message]
Txattrcreate: type[Message]
Rxattrcreate: type[Message]
Treaddir: type[Message]
Rreaddir: type[Message]
Tfsync: type[Message]
Rfsync: type[Message]
Tlock: type[Message]
Rlock: type[Message]
Tgetlock: type[Message]
Rgetlock: type[Message]
Tlink: type[Message]
Rlink: type[Message]
Tmkdir: type[Message]
Rmkdir: type[Message]
Trenameat: type[Message]
Rrenameat: type[Message]
Tunlinkat: type[Message]
Runlinkat: type[Message]
Tversion: type[Message]
Rversion: type[Message]
Tauth: type[Message]
Rauth: type[Message]
Tattach: type[Message]
Rattach: type[Message]
Tflush: type[Message]
Rflush: type[Message]
Twalk: type[Message]
Rwalk: type[Message]
Tread: type[Message]
Rread: type[Message]
Twrite: type[Message]
Rwrite: type[Message]
Tclunk: type[Message]
Rclunk: type[Message]
Tremove: type[Message]
Rremove: type[Message]


# --------------------------------------------------------------------------- encoding


def _enc_str(value: str | bytes) -> bytes:
    # File names are bytes on Linux; surrogateescape carries undecodable ones through.
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    if len(raw) > 0xFFFF:
        raise ProtocolError(f"string of {len(raw)} bytes does not fit a 9P string")
    return _S_U16.pack(len(raw)) + raw


def encode(msg: Message) -> bytes:
    """Encode one message, header included.  Raises ProtocolError on unencodable values."""
    plan = _PLANS.get(msg.TYPE)
    if plan is None:
        raise ProtocolError(f"no encoding for message type {msg.TYPE}")
    parts: list[bytes | bytearray | memoryview] = [b""]
    try:
        for step in plan:
            kind = step[0]
            if kind == "fixed":
                values: list[Any] = []
                for name, is_qid in step[2]:
                    v = getattr(msg, name)
                    if is_qid:
                        values.extend(v)
                    else:
                        values.append(v)
                parts.append(step[1].pack(*values))
            elif kind == "s":
                parts.append(_enc_str(getattr(msg, step[1])))
            elif kind == "data":
                data = getattr(msg, step[1])
                parts.append(_S_U32.pack(len(data)))
                parts.append(data)
            elif kind == "wnames":
                names = getattr(msg, step[1])
                if len(names) > MAXWELEM:
                    raise ProtocolError(f"Twalk with {len(names)} names (max {MAXWELEM})")
                parts.append(_S_U16.pack(len(names)))
                parts.extend(_enc_str(n) for n in names)
            elif kind == "wqids":
                qids = getattr(msg, step[1])
                if len(qids) > MAXWELEM:
                    raise ProtocolError(f"Rwalk with {len(qids)} qids (max {MAXWELEM})")
                parts.append(_S_U16.pack(len(qids)))
                parts.extend(_S_QID.pack(*q) for q in qids)
            else:  # pragma: no cover - table and plan are built together
                raise AssertionError(kind)
    except struct.error as exc:
        raise ProtocolError(f"{type(msg).__name__}: {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"{type(msg).__name__}: {exc}") from None
    size = sum(len(p) for p in parts) + HEADER_SIZE
    if size > 0xFFFFFFFF:
        raise ProtocolError("message too large")
    if not 0 <= msg.tag <= 0xFFFF:
        raise ProtocolError(f"tag {msg.tag} out of range")
    parts[0] = _S_HEADER.pack(size, msg.TYPE, msg.tag)
    return b"".join(parts)


# --------------------------------------------------------------------------- decoding


def decode_header(frame: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """``(size, type, tag)`` of a frame's first seven bytes (FramingError if short)."""
    if len(frame) < HEADER_SIZE:
        raise FramingError(f"frame of {len(frame)} bytes is shorter than the 7-byte header")
    return _S_HEADER.unpack_from(frame, 0)


def decode(frame: bytes | bytearray | memoryview) -> Message:
    """Decode one complete frame (header included) into a Message.

    Raises FramingError when the header is unusable and MessageError (with the tag) when
    the body is wrong; nothing else escapes.  ``data`` fields are ``bytes``.
    """
    size, mtype, tag = decode_header(frame)
    if size != len(frame):
        raise FramingError(f"size field says {size} bytes, frame has {len(frame)}")
    plan = _PLANS.get(mtype)
    cls = MESSAGE_CLASSES.get(mtype)
    if plan is None or cls is None:
        raise MessageError(f"unknown message type {mtype}", tag, mtype)
    buf = memoryview(frame)
    pos = HEADER_SIZE
    end = size
    values: dict[str, Any] = {}

    def fail(what: str) -> MessageError:
        return MessageError(f"{cls.__name__}: {what}", tag, mtype)

    def read_str(at: int) -> tuple[str, int]:
        if at + 2 > end:
            raise fail("string length runs past the end")
        (n,) = _S_U16.unpack_from(buf, at)
        at += 2
        if at + n > end:
            raise fail(f"string of {n} bytes runs past the end")
        return bytes(buf[at:at + n]).decode("utf-8", "surrogateescape"), at + n

    for step in plan:
        kind = step[0]
        if kind == "fixed":
            st: struct.Struct = step[1]
            if pos + st.size > end:
                # Optional trailing word left out by an older peer.
                if pos == end and len(step[2]) == 1 and step[2][0][0] in cls.OPTIONAL:
                    values[step[2][0][0]] = cls.OPTIONAL[step[2][0][0]]
                    continue
                raise fail("message is truncated")
            raw = st.unpack_from(buf, pos)
            pos += st.size
            i = 0
            for name, is_qid in step[2]:
                if is_qid:
                    values[name] = Qid(raw[i], raw[i + 1], raw[i + 2])
                    i += 3
                else:
                    values[name] = raw[i]
                    i += 1
        elif kind == "s":
            values[step[1]], pos = read_str(pos)
        elif kind == "data":
            if pos + 4 > end:
                raise fail("data count runs past the end")
            (n,) = _S_U32.unpack_from(buf, pos)
            pos += 4
            # Checked against the frame before slicing: a hostile count allocates nothing.
            if n > end - pos:
                raise fail(f"data count {n} exceeds the {end - pos} bytes left")
            values[step[1]] = bytes(buf[pos:pos + n])
            pos += n
        elif kind == "wnames":
            if pos + 2 > end:
                raise fail("name count runs past the end")
            (n,) = _S_U16.unpack_from(buf, pos)
            pos += 2
            if n > MAXWELEM:
                raise fail(f"{n} walk names (max {MAXWELEM})")
            names = []
            for _ in range(n):
                name, pos = read_str(pos)
                names.append(name)
            values[step[1]] = names
        elif kind == "wqids":
            if pos + 2 > end:
                raise fail("qid count runs past the end")
            (n,) = _S_U16.unpack_from(buf, pos)
            pos += 2
            if n > MAXWELEM:
                raise fail(f"{n} walk qids (max {MAXWELEM})")
            if pos + 13 * n > end:
                raise fail("walk qids run past the end")
            values[step[1]] = [Qid(*_S_QID.unpack_from(buf, pos + 13 * i)) for i in range(n)]
            pos += 13 * n
    if pos != end:
        raise fail(f"{end - pos} unexpected trailing bytes")
    return cls(tag=tag, **values)


# --------------------------------------------------------------------------- readdir


_S_DIRENT_HEAD = struct.Struct("<BIQQBH")


def encode_dirents(entries: list[Dirent] | Iterator[Dirent], limit: int) -> tuple[bytes, int]:
    """Pack as many entries as fit in ``limit`` bytes; returns (payload, how many)."""
    out = bytearray()
    count = 0
    for ent in entries:
        raw = ent.name.encode("utf-8", "surrogateescape")
        if len(raw) > 0xFFFF:
            raise ProtocolError("directory entry name too long")
        rec = _S_DIRENT_HEAD.pack(*ent.qid, ent.offset, ent.type, len(raw)) + raw
        if len(out) + len(rec) > limit:
            break
        out += rec
        count += 1
    return bytes(out), count


def decode_dirents(data: bytes | bytearray | memoryview) -> list[Dirent]:
    """Unpack an Rreaddir payload (MessageError if an entry is cut short)."""
    buf = memoryview(data)
    pos, end = 0, len(buf)
    out: list[Dirent] = []
    while pos < end:
        if pos + _S_DIRENT_HEAD.size > end:
            raise MessageError("directory entry header runs past the end")
        qt, qv, qp, off, dt, n = _S_DIRENT_HEAD.unpack_from(buf, pos)
        pos += _S_DIRENT_HEAD.size
        if pos + n > end:
            raise MessageError("directory entry name runs past the end")
        name = bytes(buf[pos:pos + n]).decode("utf-8", "surrogateescape")
        pos += n
        out.append(Dirent(Qid(qt, qv, qp), off, dt, name))
    return out


# --------------------------------------------------------------------------- framing


class FrameBuffer:
    """Cuts a byte stream into frames.

    ``feed(data)`` returns the complete frames now available (as ``bytes``).  A size
    field below 7 or above ``max_size`` raises FramingError: the stream is lost, and the
    buffer refuses further input.  ``max_size`` may be lowered after Tversion.
    """

    __slots__ = ("_buf", "max_size", "_broken")

    def __init__(self, max_size: int) -> None:
        self._buf = bytearray()
        self.max_size = max_size
        self._broken = False

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if self._broken:
            raise FramingError("stream already failed to frame")
        self._buf += data
        frames: list[bytes] = []
        buf = self._buf
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (size,) = _S_U32.unpack_from(buf, pos)
            if size < HEADER_SIZE or size > self.max_size:
                self._broken = True
                del buf[:pos]
                raise FramingError(
                    f"frame size {size} outside [{HEADER_SIZE}, {self.max_size}]", frames
                )
            if n - pos < size:
                break
            frames.append(bytes(buf[pos:pos + size]))
            pos += size
        if pos:
            del buf[:pos]
        return frames
