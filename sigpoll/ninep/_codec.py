"""Pure 9P2000.L codec: message classes, encoding, decoding and framing.  No I/O.

Every message is ``size[4] type[1] tag[2] body``, little-endian.  Each message is a class
below whose annotations *are* its wire layout, in order (``fid: U32``, ``name: Str``...);
encoders and decoders are compiled from them once, at import, and there is no other
description of the wire anywhere (the server's hot paths take their structs from
:func:`prefix_struct`).

The decoder trusts nothing: a length field is checked against the bytes that are actually
there before anything is sliced or allocated, and every failure is a
:class:`ProtocolError`.  Two kinds are told apart because a peer must react differently:

* :class:`FramingError` -- the byte stream itself cannot be cut into messages (a size
  field below the header size or above the negotiated msize).  Nothing after it can be
  trusted; the connection has to be closed.
* :class:`MessageError` -- one well-framed message has a bad body or an unknown type.
  Its tag is known, so a server answers it with Rlerror and carries on.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Iterable
from itertools import chain
from operator import attrgetter
from typing import Any, ClassVar, NamedTuple, Union, dataclass_transform

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
    "U8",
    "U16",
    "U32",
    "U64",
    "Str",
    "Data",
    "Names",
    "Qids",
    "encode",
    "decode",
    "decode_header",
    "prefix_struct",
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
    "XATTR_CREATE",
    "XATTR_REPLACE",
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

#: Txattrcreate flags (Linux's setxattr flags).
XATTR_CREATE = 1
XATTR_REPLACE = 2

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

    def __init__(self, message: str, frames: list[memoryview] | None = None) -> None:
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


# ---------------------------------------------------------------------- wire kinds
#
# The annotation of a message field names its wire kind; for type checkers each is the
# Python type its values have.  ``Data`` is ``bytes`` from :func:`decode`, or a view of
# the frame with ``decode(..., views=True)`` (the server's zero-copy Twrite).

U8 = int
U16 = int
U32 = int
U64 = int
Str = str
Data = Union[bytes, memoryview]
Names = list[str]
Qids = list[Qid]

#: Annotation name -> (kind, struct code for the fixed-size kinds).
_KINDS: dict[str, tuple[str, str]] = {
    "U8": ("u8", "B"), "U16": ("u16", "H"), "U32": ("u32", "I"), "U64": ("u64", "Q"),
    "Qid": ("qid", "BIQ"), "Str": ("s", ""), "Data": ("data", ""), "Names": ("wnames", ""),
    "Qids": ("wqids", ""),
}

_S_U16 = struct.Struct("<H")
_S_U32 = struct.Struct("<I")
_S_HEADER = struct.Struct("<IBH")
_S_QID = struct.Struct("<BIQ")

#: Wire id -> message class.
MESSAGE_CLASSES: dict[int, type[Message]] = {}
_ENCODERS: dict[int, Callable[[Any], bytes]] = {}
_DECODERS: dict[int, Callable[[Any, int, int, bool], Any]] = {}
_PREFIXES: dict[int, struct.Struct] = {}


def _tag_field(*, default: int = NOTAG, kw_only: bool = True) -> Any:
    """Declares ``Message.tag`` for type checkers: keyword-only, NOTAG by default."""
    return default


def _annotations(ns: dict[str, Any]) -> dict[str, str]:
    # With ``from __future__ import annotations`` (above) a class body's annotations are
    # strings in its namespace, on every Python this package supports (PEP 749 keeps that
    # for the future import).  A message with no fields has none.
    return dict(ns.get("__annotations__", {}))


@dataclass_transform(field_specifiers=(_tag_field,))
class _MessageType(type):
    """Builds a message class from its annotations: slots, ``FIELDS``/``KINDS``/
    ``OPTIONAL``, a plain ``__init__``, and its encoder and decoder."""

    def __new__(mcs, name: str, bases: tuple[type, ...], ns: dict[str, Any]) -> _MessageType:
        if not bases:  # Message itself: only the tag
            ns.pop("tag", None)
            ns["__slots__"] = ("tag",)
            return super().__new__(mcs, name, bases, ns)
        fields: list[tuple[str, str]] = []
        optional: dict[str, Any] = {}
        for field, annotation in _annotations(ns).items():
            if annotation not in _KINDS:
                raise TypeError(f"{name}.{field}: {annotation!r} is not a wire kind")
            kind = _KINDS[annotation][0]
            if field in ns:  # a default: an optional trailing field older peers leave out
                optional[field] = ns.pop(field)
                kind += "?"
            elif optional:
                raise TypeError(f"{name}.{field}: only trailing fields may be optional")
            fields.append((field, kind))
        names = tuple(f for f, _ in fields)
        ns.update(__slots__=names, FIELDS=names, KINDS=tuple(k for _, k in fields),
                  OPTIONAL=optional, __init__=_make_init(names, optional))
        ns.setdefault("__doc__", f"9P2000.L {name} (type {ns['TYPE']}).")
        cls = super().__new__(mcs, name, bases, ns)
        tid: int = ns["TYPE"]
        MESSAGE_CLASSES[tid] = cls  # type: ignore[assignment]
        _compile(tid, cls, fields)
        return cls


def _make_init(names: tuple[str, ...], optional: dict[str, Any]) -> Callable[..., None]:
    # Generated like a dataclass's: one plain assignment per field, so that building a
    # message costs what building any small object costs (the decoder builds thousands).
    params = "".join(f", {n}" + (f"=_default_{n}" if n in optional else "") for n in names)
    body = "".join(f"    self.{n} = {n}\n" for n in names)
    source = f"def __init__(self{params}, *, tag=NOTAG):\n    self.tag = tag\n{body}"
    scope: dict[str, Any] = {"NOTAG": NOTAG, **{f"_default_{n}": v for n, v in optional.items()}}
    exec(source, scope)  # noqa: S102 - our own text, built from the class annotations
    init: Callable[..., None] = scope["__init__"]
    return init


class Message(metaclass=_MessageType):
    """Base class of every 9P2000.L message.

    Each subclass has ``TYPE`` (the wire id), ``FIELDS``/``KINDS`` (names and wire kinds,
    in wire order), ``OPTIONAL`` (trailing fields older peers may leave out, with their
    defaults), one attribute per field, and ``tag``.  ``Twalk(fid, newfid, wnames, tag=3)``.
    """

    TYPE: ClassVar[int] = -1
    FIELDS: ClassVar[tuple[str, ...]] = ()
    KINDS: ClassVar[tuple[str, ...]] = ()
    OPTIONAL: ClassVar[dict[str, Any]] = {}
    #: For a T-message, the class of its reply (None for R-messages).
    REPLY: ClassVar[type[Message] | None] = None
    tag: int = _tag_field(default=NOTAG, kw_only=True)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.tag == other.tag and all(
            getattr(self, f) == getattr(other, f) for f in self.FIELDS)

    def __repr__(self) -> str:
        parts = [f"tag={self.tag}"]
        for f in self.FIELDS:
            v = getattr(self, f)
            if isinstance(v, (bytes, bytearray, memoryview)) and len(v) > 32:
                v = f"<{len(v)} bytes>"
            parts.append(f"{f}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


# --------------------------------------------------------------------------- layouts
#
# A plan is a list of steps: a run of fixed-size fields shares one Struct (most of the cost
# of a small message is the number of struct calls), a variable-size field is a step of
# its own, and an optional trailing field too (so decoding can stop before it).


class _Fixed(NamedTuple):
    st: struct.Struct
    names: tuple[str, ...]
    qids: tuple[bool, ...]  # which of the names is a qid (three struct values)


_Step = Union[_Fixed, tuple[str, str]]


def _plan(fields: list[tuple[str, str]]) -> list[_Step]:
    plan: list[_Step] = []
    fmt, names, qids = "", [], []  # type: ignore[var-annotated]

    def close_run() -> None:
        nonlocal fmt, names, qids
        if names:
            plan.append(_Fixed(struct.Struct("<" + fmt), tuple(names), tuple(qids)))
        fmt, names, qids = "", [], []

    for name, kind in fields:
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        code = _KINDS[{v[0]: k for k, v in _KINDS.items()}[kind]][1]
        if optional:
            close_run()
        if code:
            fmt += code
            names.append(name)
            qids.append(kind == "qid")
            continue
        close_run()
        plan.append((kind, name))
    close_run()
    return plan


def _compile(tid: int, cls: Any, fields: list[tuple[str, str]]) -> None:
    plan = _plan(fields)
    first = plan[0] if plan else None
    head = first.st.format[1:] if isinstance(first, _Fixed) else ""
    after = plan[1] if isinstance(first, _Fixed) and len(plan) > 1 else first
    if after is not None and not isinstance(after, _Fixed) and after[0] == "data":
        head += "I"
    _PREFIXES[tid] = struct.Struct("<IBH" + head)
    if first is None or (len(plan) == 1 and isinstance(first, _Fixed) and not cls.OPTIONAL):
        _compile_fixed(tid, cls, first)
    elif not isinstance(plan[-1], _Fixed) and len(plan) <= 2 and not (
            isinstance(first, _Fixed) and any(first.qids)):
        _compile_tail(tid, cls, first if isinstance(first, _Fixed) else None, plan[-1][0])
    else:
        _ENCODERS[tid] = _generic_encoder(tid, cls, plan)
        _DECODERS[tid] = _generic_decoder(tid, cls, plan)


def _compile_fixed(tid: int, cls: Any, run: _Fixed | None) -> None:
    """Messages of fixed size (most of the traffic): one struct call each way."""
    names = run.names if run else ()
    body = run.st if run else struct.Struct("<")
    whole = struct.Struct("<IBH" + body.format[1:])
    size = whole.size
    pack, unpack = whole.pack, body.unpack_from
    enc: Callable[[Any], bytes]
    dec: Callable[[Any, int, int, bool], Any]
    if run is not None and any(run.qids):
        flatten = _flattener(run)
        enc = lambda m: pack(size, tid, m.tag, *flatten(m))  # noqa: E731
        group = _grouper(run)
        dec = lambda buf, tag, end, views: cls(*group(unpack(buf, HEADER_SIZE)), tag=tag)  # noqa: E731
    else:
        if not names:
            enc = lambda m: pack(size, tid, m.tag)  # noqa: E731
        elif len(names) == 1:
            get1 = attrgetter(names[0])
            enc = lambda m: pack(size, tid, m.tag, get1(m))  # noqa: E731
        else:
            get = attrgetter(*names)
            enc = lambda m: pack(size, tid, m.tag, *get(m))  # noqa: E731
        dec = lambda buf, tag, end, views: cls(*unpack(buf, HEADER_SIZE), tag=tag)  # noqa: E731

    def decode_fixed(buf: Any, tag: int, end: int, views: bool) -> Any:
        if end != size:
            what = "message is truncated" if end < size else f"{end - size} unexpected trailing bytes"
            raise MessageError(f"{cls.__name__}: {what}", tag, tid)
        return dec(buf, tag, end, views)

    _ENCODERS[tid] = enc
    _DECODERS[tid] = decode_fixed


def _compile_tail(tid: int, cls: Any, run: _Fixed | None, kind: str) -> None:
    """Fixed-size fields, then one variable-size field (Twalk, Rwalk, Twrite, Rread...):
    the fixed part and the variable part's count in one struct call each way."""
    names = run.names if run else ()
    fixed = run.st.format[1:] if run else ""
    count = "I" if kind == "data" else "H"
    head = struct.Struct("<IBH" + fixed + count)
    body = struct.Struct("<" + fixed + count)
    pack, unpack, hsize = head.pack, body.unpack_from, head.size
    get = attrgetter(*names) if len(names) > 1 else (
        (lambda m, one=attrgetter(names[0]): (one(m),)) if names else (lambda m: ()))
    get_tail = attrgetter(cls.FIELDS[-1])
    what = "data" if kind == "data" else "names" if kind == "wnames" else "qids"
    nfixed = len(names)

    def encode_tail(m: Any) -> bytes:
        value = get_tail(m)
        if kind == "data":
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f"data must be bytes, not {type(value).__name__}")
            n = len(value)
            return b"".join((pack(hsize + n, tid, m.tag, *get(m), n), value))
        if kind == "s":
            raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
            n = len(raw)
            if n > 0xFFFF:
                raise ProtocolError(f"string of {n} bytes does not fit a 9P string")
            return b"".join((pack(hsize + n, tid, m.tag, *get(m), n), raw))
        n = len(value)
        if n > MAXWELEM:
            raise ProtocolError(f"{cls.__name__} with {n} {what} (max {MAXWELEM})")
        if kind == "wqids":
            return pack(hsize + 13 * n, tid, m.tag, *get(m), n) + _qids_struct(n).pack(
                *chain.from_iterable(value))
        parts = [_enc_str(x) for x in value]
        size = hsize + sum(map(len, parts))
        return b"".join((pack(size, tid, m.tag, *get(m), n), *parts))

    def decode_tail(buf: Any, tag: int, end: int, views: bool) -> Any:
        if end < hsize:
            raise MessageError(f"{cls.__name__}: message is truncated", tag, tid)
        values = unpack(buf, HEADER_SIZE)
        n = values[nfixed]
        pos = hsize
        if kind == "data" or kind == "s":
            if n > end - pos:
                raise MessageError(f"{cls.__name__}: {what} count {n} exceeds the "
                                   f"{end - pos} bytes left", tag, tid)
            if kind == "data":
                if views:
                    tail: Any = (buf if isinstance(buf, memoryview) else memoryview(buf))[pos:pos + n]
                else:
                    tail = bytes(buf[pos:pos + n])
            else:
                tail = str(buf[pos:pos + n], "utf-8", "surrogateescape")
            pos += n
        elif n > MAXWELEM:
            raise MessageError(f"{cls.__name__}: {n} walk elements (max {MAXWELEM})", tag, tid)
        elif kind == "wqids":
            if pos + 13 * n > end:
                raise MessageError(f"{cls.__name__}: walk qids run past the end", tag, tid)
            raw = _qids_struct(n).unpack_from(buf, pos)
            tail = [Qid(raw[i], raw[i + 1], raw[i + 2]) for i in range(0, 3 * n, 3)]
            pos += 13 * n
        else:
            tail = []
            for _ in range(n):
                if pos + 2 > end:
                    raise MessageError(f"{cls.__name__}: string length runs past the end",
                                       tag, tid)
                ln = buf[pos] | buf[pos + 1] << 8
                pos += 2
                if pos + ln > end:
                    raise MessageError(f"{cls.__name__}: string of {ln} bytes runs past the "
                                       f"end", tag, tid)
                tail.append(str(buf[pos:pos + ln], "utf-8", "surrogateescape"))
                pos += ln
        if pos != end:
            raise MessageError(f"{cls.__name__}: {end - pos} unexpected trailing bytes", tag, tid)
        return cls(*values[:nfixed], tail, tag=tag)

    _ENCODERS[tid] = encode_tail
    _DECODERS[tid] = decode_tail


_QIDS: dict[int, struct.Struct] = {}


def _qids_struct(n: int) -> struct.Struct:
    st = _QIDS.get(n)
    if st is None:
        st = _QIDS[n] = struct.Struct("<" + "BIQ" * n)
    return st


def _flattener(run: _Fixed) -> Callable[[Any], list[Any]]:
    pairs = tuple(zip(run.names, run.qids))

    def flatten(m: Any) -> list[Any]:
        values: list[Any] = []
        for name, is_qid in pairs:
            if is_qid:
                values.extend(getattr(m, name))
            else:
                values.append(getattr(m, name))
        return values

    return flatten


def _grouper(run: _Fixed) -> Callable[[tuple[Any, ...]], list[Any]]:
    qids = run.qids

    def group(raw: tuple[Any, ...]) -> list[Any]:
        out: list[Any] = []
        i = 0
        for is_qid in qids:
            if is_qid:
                out.append(Qid(raw[i], raw[i + 1], raw[i + 2]))
                i += 3
            else:
                out.append(raw[i])
                i += 1
        return out

    return group


def _enc_str(value: str | bytes) -> bytes:
    # File names are bytes on Linux; surrogateescape carries undecodable ones through.
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    if len(raw) > 0xFFFF:
        raise ProtocolError(f"string of {len(raw)} bytes does not fit a 9P string")
    return _S_U16.pack(len(raw)) + raw


def _generic_encoder(tid: int, cls: Any, plan: list[_Step]) -> Callable[[Any], bytes]:
    steps: list[Callable[[Any, list[Any]], None]] = []
    for step in plan:
        if isinstance(step, _Fixed):
            pack = step.st.pack
            if any(step.qids):
                flatten = _flattener(step)
                steps.append(lambda m, parts, pack=pack, flatten=flatten:  # type: ignore[misc]
                             parts.append(pack(*flatten(m))))
            else:
                get = attrgetter(*step.names) if len(step.names) > 1 else None
                one = step.names[0]
                steps.append(
                    (lambda m, parts, pack=pack, get=get: parts.append(pack(*get(m))))  # type: ignore[misc]
                    if get else
                    (lambda m, parts, pack=pack, one=one: parts.append(pack(getattr(m, one)))))  # type: ignore[misc]
        else:
            steps.append(_VAR_ENCODERS[step[0]](step[1]))

    def encode_generic(m: Any) -> bytes:
        parts: list[Any] = [b""]
        for step in steps:
            step(m, parts)
        size = sum(map(len, parts)) + HEADER_SIZE
        if size > 0xFFFFFFFF:
            raise ProtocolError("message too large")
        parts[0] = _S_HEADER.pack(size, tid, m.tag)
        return b"".join(parts)

    return encode_generic


def _enc_s(name: str) -> Callable[[Any, list[Any]], None]:
    return lambda m, parts: parts.append(_enc_str(getattr(m, name)))


def _enc_data(name: str) -> Callable[[Any, list[Any]], None]:
    def step(m: Any, parts: list[Any]) -> None:
        data = getattr(m, name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"{name} must be bytes, not {type(data).__name__}")
        parts.append(_S_U32.pack(len(data)))
        parts.append(data)

    return step


def _enc_counted(name: str, each: Callable[[Any], bytes], what: str) -> Callable[[Any, list[Any]], None]:
    def step(m: Any, parts: list[Any]) -> None:
        items = getattr(m, name)
        if len(items) > MAXWELEM:
            raise ProtocolError(f"{type(m).__name__} with {len(items)} {what} (max {MAXWELEM})")
        parts.append(_S_U16.pack(len(items)))
        parts.extend(map(each, items))

    return step


_VAR_ENCODERS: dict[str, Callable[[str], Callable[[Any, list[Any]], None]]] = {
    "s": _enc_s,
    "data": _enc_data,
    "wnames": lambda name: _enc_counted(name, _enc_str, "names"),
    "wqids": lambda name: _enc_counted(name, lambda q: _S_QID.pack(*q), "qids"),
}


def _generic_decoder(tid: int, cls: Any, plan: list[_Step]) -> Callable[[Any, int, int, bool], Any]:
    def fail(what: str, tag: int) -> MessageError:
        return MessageError(f"{cls.__name__}: {what}", tag, tid)

    steps: list[tuple[str, Any]] = []
    for step in plan:
        if isinstance(step, _Fixed):
            group = _grouper(step) if any(step.qids) else None
            optional = cls.OPTIONAL.get(step.names[0], _NONE) if len(step.names) == 1 else _NONE
            steps.append(("fixed", (step.st, group, optional)))
        else:
            steps.append(step)

    def decode_generic(buf: Any, tag: int, end: int, views: bool) -> Any:
        values: list[Any] = []
        pos = HEADER_SIZE
        try:
            for kind, arg in steps:
                if kind == "fixed":
                    st, group, optional = arg
                    if pos + st.size > end:
                        if pos == end and optional is not _NONE:
                            values.append(optional)  # left out by an older peer
                            continue
                        raise fail("message is truncated", tag)
                    raw = st.unpack_from(buf, pos)
                    pos += st.size
                    values.extend(group(raw) if group else raw)
                elif kind == "s":
                    value, pos = _dec_str(buf, pos, end)
                    values.append(value)
                elif kind == "data":
                    if pos + 4 > end:
                        raise fail("data count runs past the end", tag)
                    (n,) = _S_U32.unpack_from(buf, pos)
                    pos += 4
                    # Checked against the frame before slicing: a hostile count allocates nothing.
                    if n > end - pos:
                        raise fail(f"data count {n} exceeds the {end - pos} bytes left", tag)
                    values.append(memoryview(buf)[pos:pos + n] if views else bytes(buf[pos:pos + n]))
                    pos += n
                elif kind == "wnames":
                    n, pos = _dec_count(buf, pos, end)
                    names = []
                    for _ in range(n):
                        name, pos = _dec_str(buf, pos, end)
                        names.append(name)
                    values.append(names)
                else:  # wqids
                    n, pos = _dec_count(buf, pos, end)
                    if pos + 13 * n > end:
                        raise fail("walk qids run past the end", tag)
                    values.append([Qid(*_S_QID.unpack_from(buf, pos + 13 * i)) for i in range(n)])
                    pos += 13 * n
        except _Short as exc:
            raise fail(str(exc), tag) from None
        if pos != end:
            raise fail(f"{end - pos} unexpected trailing bytes", tag)
        return cls(*values, tag=tag)

    return decode_generic


class _Short(Exception):
    """A length inside the body runs past its end (turned into a MessageError)."""


_NONE = object()


def _dec_str(buf: Any, at: int, end: int) -> tuple[str, int]:
    if at + 2 > end:
        raise _Short("string length runs past the end")
    (n,) = _S_U16.unpack_from(buf, at)
    at += 2
    if at + n > end:
        raise _Short(f"string of {n} bytes runs past the end")
    return str(buf[at:at + n], "utf-8", "surrogateescape"), at + n


def _dec_count(buf: Any, at: int, end: int) -> tuple[int, int]:
    if at + 2 > end:
        raise _Short("count runs past the end")
    (n,) = _S_U16.unpack_from(buf, at)
    if n > MAXWELEM:
        raise _Short(f"{n} walk elements (max {MAXWELEM})")
    return n, at + 2


# --------------------------------------------------------------------------- messages


class Rlerror(Message):
    TYPE = 7
    ecode: U32


class Tstatfs(Message):
    TYPE = 8
    fid: U32


class Rstatfs(Message):
    TYPE = 9
    fstype: U32
    bsize: U32
    blocks: U64
    bfree: U64
    bavail: U64
    files: U64
    ffree: U64
    fsid: U64
    namelen: U32


class Tlopen(Message):
    TYPE = 12
    fid: U32
    flags: U32


class Rlopen(Message):
    TYPE = 13
    qid: Qid
    iounit: U32


class Tlcreate(Message):
    TYPE = 14
    fid: U32
    name: Str
    flags: U32
    mode: U32
    gid: U32


class Rlcreate(Message):
    TYPE = 15
    qid: Qid
    iounit: U32


class Tsymlink(Message):
    TYPE = 16
    fid: U32
    name: Str
    symtgt: Str
    gid: U32


class Rsymlink(Message):
    TYPE = 17
    qid: Qid


class Tmknod(Message):
    TYPE = 18
    dfid: U32
    name: Str
    mode: U32
    major: U32
    minor: U32
    gid: U32


class Rmknod(Message):
    TYPE = 19
    qid: Qid


class Trename(Message):
    TYPE = 20
    fid: U32
    dfid: U32
    name: Str


class Rrename(Message):
    TYPE = 21


class Treadlink(Message):
    TYPE = 22
    fid: U32


class Rreadlink(Message):
    TYPE = 23
    target: Str


class Tgetattr(Message):
    TYPE = 24
    fid: U32
    request_mask: U64


class Rgetattr(Message):
    TYPE = 25
    valid: U64
    qid: Qid
    mode: U32
    uid: U32
    gid: U32
    nlink: U64
    rdev: U64
    size: U64
    blksize: U64
    blocks: U64
    atime_sec: U64
    atime_nsec: U64
    mtime_sec: U64
    mtime_nsec: U64
    ctime_sec: U64
    ctime_nsec: U64
    btime_sec: U64
    btime_nsec: U64
    gen: U64
    data_version: U64


class Tsetattr(Message):
    TYPE = 26
    fid: U32
    valid: U32
    mode: U32
    uid: U32
    gid: U32
    size: U64
    atime_sec: U64
    atime_nsec: U64
    mtime_sec: U64
    mtime_nsec: U64


class Rsetattr(Message):
    TYPE = 27


class Txattrwalk(Message):
    TYPE = 30
    fid: U32
    newfid: U32
    name: Str


class Rxattrwalk(Message):
    TYPE = 31
    size: U64


class Txattrcreate(Message):
    TYPE = 32
    fid: U32
    name: Str
    attr_size: U64
    flags: U32


class Rxattrcreate(Message):
    TYPE = 33


class Treaddir(Message):
    TYPE = 40
    fid: U32
    offset: U64
    count: U32


class Rreaddir(Message):
    TYPE = 41
    data: Data


# Linux sends a datasync word after the fid; diod's table has only the fid.
class Tfsync(Message):
    TYPE = 50
    fid: U32
    datasync: U32 = 0


class Rfsync(Message):
    TYPE = 51


class Tlock(Message):
    TYPE = 52
    fid: U32
    type: U8
    flags: U32
    start: U64
    length: U64
    proc_id: U32
    client_id: Str


class Rlock(Message):
    TYPE = 53
    status: U8


class Tgetlock(Message):
    TYPE = 54
    fid: U32
    type: U8
    start: U64
    length: U64
    proc_id: U32
    client_id: Str


class Rgetlock(Message):
    TYPE = 55
    type: U8
    start: U64
    length: U64
    proc_id: U32
    client_id: Str


class Tlink(Message):
    TYPE = 70
    dfid: U32
    fid: U32
    name: Str


class Rlink(Message):
    TYPE = 71


class Tmkdir(Message):
    TYPE = 72
    dfid: U32
    name: Str
    mode: U32
    gid: U32


class Rmkdir(Message):
    TYPE = 73
    qid: Qid


class Trenameat(Message):
    TYPE = 74
    olddirfid: U32
    oldname: Str
    newdirfid: U32
    newname: Str


class Rrenameat(Message):
    TYPE = 75


class Tunlinkat(Message):
    TYPE = 76
    dirfid: U32
    name: Str
    flags: U32


class Runlinkat(Message):
    TYPE = 77


class Tversion(Message):
    TYPE = 100
    msize: U32
    version: Str


class Rversion(Message):
    TYPE = 101
    msize: U32
    version: Str


# n_uname is part of 9P2000.u/.L; a 9P2000 client leaves it out.
class Tauth(Message):
    TYPE = 102
    afid: U32
    uname: Str
    aname: Str
    n_uname: U32 = NONUNAME


class Rauth(Message):
    TYPE = 103
    aqid: Qid


class Tattach(Message):
    TYPE = 104
    fid: U32
    afid: U32
    uname: Str
    aname: Str
    n_uname: U32 = NONUNAME


class Rattach(Message):
    TYPE = 105
    qid: Qid


class Tflush(Message):
    TYPE = 108
    oldtag: U16


class Rflush(Message):
    TYPE = 109


class Twalk(Message):
    TYPE = 110
    fid: U32
    newfid: U32
    wnames: Names


class Rwalk(Message):
    TYPE = 111
    wqids: Qids


class Tread(Message):
    TYPE = 116
    fid: U32
    offset: U64
    count: U32


class Rread(Message):
    TYPE = 117
    data: Data


class Twrite(Message):
    TYPE = 118
    fid: U32
    offset: U64
    data: Data


class Rwrite(Message):
    TYPE = 119
    count: U32


class Tclunk(Message):
    TYPE = 120
    fid: U32


class Rclunk(Message):
    TYPE = 121


class Tremove(Message):
    TYPE = 122
    fid: U32


class Rremove(Message):
    TYPE = 123

for _cls in MESSAGE_CLASSES.values():
    if _cls.__name__.startswith("T"):
        _cls.REPLY = MESSAGE_CLASSES[_cls.TYPE + 1]
del _cls


# --------------------------------------------------------------------------- entry points


def encode(msg: Message) -> bytes:
    """Encode one message, header included.  Raises ProtocolError on unencodable values."""
    try:
        return _ENCODERS[msg.TYPE](msg)
    except ProtocolError:
        raise
    except KeyError:
        raise ProtocolError(f"no encoding for message type {msg.TYPE}") from None
    except (struct.error, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise ProtocolError(f"{type(msg).__name__}: {exc}") from None


def decode_header(frame: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """``(size, type, tag)`` of a frame's first seven bytes (FramingError if short)."""
    if len(frame) < HEADER_SIZE:
        raise FramingError(f"frame of {len(frame)} bytes is shorter than the 7-byte header")
    header: tuple[int, int, int] = _S_HEADER.unpack_from(frame, 0)
    return header


def decode(frame: bytes | bytearray | memoryview, *, views: bool = False) -> Message:
    """Decode one complete frame (header included) into a Message.

    Raises FramingError when the header is unusable and MessageError (with the tag) when
    the body is wrong; nothing else escapes.  ``data`` fields are ``bytes``, or, with
    ``views``, memoryviews of ``frame`` (which must then never change).
    """
    n = len(frame)
    if n < HEADER_SIZE:
        raise FramingError(f"frame of {n} bytes is shorter than the 7-byte header")
    size, mtype, tag = _S_HEADER.unpack_from(frame)
    if size != n:
        raise FramingError(f"size field says {size} bytes, frame has {n}")
    decoder = _DECODERS.get(mtype)
    if decoder is None:
        raise MessageError(f"unknown message type {mtype}", tag, mtype)
    msg: Message = decoder(frame, tag, size, views)
    return msg


def prefix_struct(cls: type[Message]) -> struct.Struct:
    """The struct of a message's header and its leading fixed-size fields, plus the count
    word when a ``Data`` field follows them: a whole Rgetattr, or Rread's head up to its
    data.  For code that lays a hot message out in place (a qid is three values)."""
    return _PREFIXES[cls.TYPE]


# --------------------------------------------------------------------------- readdir


_S_DIRENT_HEAD = struct.Struct("<BIQQBH")


def encode_dirents(entries: Iterable[Dirent], limit: int) -> tuple[bytes, int]:
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
        name = str(buf[pos:pos + n], "utf-8", "surrogateescape")
        pos += n
        out.append(Dirent(Qid(qt, qv, qp), off, dt, name))
    return out


# --------------------------------------------------------------------------- framing


class FrameBuffer:
    """Cuts a byte stream into frames, copying as little as possible.

    ``feed(data)`` returns the complete frames now available.  Whole frames inside one
    chunk are handed out as views of that chunk (which is why ``feed`` takes ``bytes``,
    which cannot change under a view); only a frame split across chunks is assembled in
    a fresh ``bytearray`` holding just its own bytes, never resized once a view of it
    exists.  So the buffer holds at most one partial frame, and only the bytes of it that
    have arrived.  A size field below 7 or above ``max_size`` raises FramingError (with
    the whole frames before it): the stream is lost, and the buffer refuses further
    input.  ``max_size`` may be changed after Tversion.
    """

    __slots__ = ("max_size", "_part", "_broken")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._part = bytearray()
        self._broken = False

    def __len__(self) -> int:
        """Bytes of the partial frame held."""
        return len(self._part)

    def _check(self, size: int, frames: list[memoryview]) -> None:
        if size < HEADER_SIZE or size > self.max_size:
            self._broken = True
            self._part = bytearray()
            raise FramingError(f"frame size {size} outside [{HEADER_SIZE}, {self.max_size}]",
                               frames)

    def feed(self, data: bytes) -> list[memoryview]:
        if self._broken:
            raise FramingError("stream already failed to frame")
        if not isinstance(data, bytes):
            data = bytes(data)  # a view must not see its bytes change
        frames: list[memoryview] = []
        view = memoryview(data)
        n = len(view)
        pos = 0
        part = self._part
        if part:
            # Finish the frame left over from the last chunk, copying only its bytes.
            if len(part) < 4:
                take = min(4 - len(part), n)
                part += view[:take]
                pos = take
                if len(part) < 4:
                    return frames
            (size,) = _S_U32.unpack_from(part)
            self._check(size, frames)
            take = min(size - len(part), n - pos)
            part += view[pos:pos + take]
            pos += take
            if len(part) < size:
                return frames
            frames.append(memoryview(part))
            self._part = bytearray()
        while n - pos >= 4:
            (size,) = _S_U32.unpack_from(view, pos)
            self._check(size, frames)
            if n - pos < size:
                break
            frames.append(view[pos:pos + size])
            pos += size
        if pos < n:
            self._part = bytearray(view[pos:])
        return frames
