"""A pure formatter for ``xxd``'s default output (no I/O).

The output is byte-identical to ``/usr/bin/xxd`` with no options: 16 input bytes per
line, hex in groups of two bytes, a ``%08x: `` offset that widens once it needs more than
eight digits, then two spaces and an ASCII column with ``.`` for anything outside
0x20..0x7e.  A partial last line is padded so its ASCII column lines up.

:class:`ZeroStream` and :func:`zero_chunk` produce the dump of an endless run of zero
bytes (what ``xxd /dev/zero`` prints) cheaply enough that the stress writer is never the
bottleneck: every line differs from the previous one only in its offset, so a block of
lines is stamped from a template instead of being formatted line by line.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = [
    "BYTES_PER_LINE",
    "ZeroStream",
    "format_lines",
    "line_length",
    "zero_chunk",
]

#: Input bytes shown on one line, as in xxd's default mode.
BYTES_PER_LINE = 16

# Offsets are C unsigned longs in xxd, so they wrap at 2**64; we mirror that.
_OFFSET_MASK = (1 << 64) - 1

# Width of the hex area of a full line: 8 groups of 4 digits with 7 spaces between.
_HEX_WIDTH = (BYTES_PER_LINE // 2) * 4 + (BYTES_PER_LINE // 2 - 1)

# xxd prints 0x20..0x7e as themselves and everything else as '.'.
_ASCII_TABLE = bytes(b if 0x20 <= b < 0x7F else 0x2E for b in range(256))

# Zero-stream blocks cover 2**16 input bytes: inside such an aligned block only the low
# four hex digits of the offset change, and those are the same for every block.
_BLOCK_INPUT = 1 << 16
_BLOCK_LINES = _BLOCK_INPUT // BYTES_PER_LINE
_ZERO_BODY = b"0000 0000 0000 0000 0000 0000 0000 0000  ................\n"


def _offset_width(offset: int) -> int:
    """Digits xxd prints for an offset: at least 8, more once the value needs them."""
    return max(8, (offset.bit_length() + 3) // 4)


def line_length(offset: int) -> int:
    """Length in bytes of one full dump line whose offset is ``offset``."""
    return _offset_width(offset & _OFFSET_MASK) + 2 + _HEX_WIDTH + 2 + BYTES_PER_LINE + 1


def format_lines(data: bytes, offset: int = 0) -> bytes:
    """Return the xxd dump of ``data`` as if its first byte sat at ``offset``.

    ``offset`` is what ``xxd -o OFFSET`` shows for the first byte; line ``i`` shows
    ``offset + 16 * i``, wrapping at 2**64 as xxd's unsigned long does.  Empty input
    gives empty output, as xxd prints nothing for an empty file.
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    view = memoryview(data).cast("B")
    out: list[bytes] = []
    for start in range(0, len(view), BYTES_PER_LINE):
        piece = bytes(view[start : start + BYTES_PER_LINE])
        off = (offset + start) & _OFFSET_MASK
        # bytes.hex(' ', -2) groups from the left, which is xxd's grouping; ljust pads a
        # short last line so its ASCII column starts where a full line's would.
        hexpart = piece.hex(" ", -2).ljust(_HEX_WIDTH)
        out.append(b"%08x: %s  %s\n" % (off, hexpart.encode("ascii"), piece.translate(_ASCII_TABLE)))
    return b"".join(out)


class _Template:
    """One 2**16-byte block of the zero dump for a given offset width.

    The low four offset digits are filled in once; the digits above them are stamped in
    per block with strided slice assignment, which runs in C over the whole block.
    """

    __slots__ = ("width", "line", "buf", "_fill")

    def __init__(self, width: int) -> None:
        self.width = width
        self.line = width + 2 + len(_ZERO_BODY)
        lines = [b"%0*x: %s" % (width, low, _ZERO_BODY) for low in range(0, _BLOCK_INPUT, BYTES_PER_LINE)]
        self.buf = bytearray(b"".join(lines))
        # One column of identical digits, reused for every stamped position.
        self._fill: dict[int, bytes] = {}

    def stamp(self, high: int) -> bytes:
        """The block whose offsets are ``high * 2**16 + 16 * i``."""
        digits = self.width - 4
        prefix = b"%0*x" % (digits, high)
        buf = self.buf
        line = self.line
        for pos in range(digits):
            ch = prefix[pos]
            col = self._fill.get(ch)
            if col is None:
                col = self._fill[ch] = bytes((ch,)) * _BLOCK_LINES
            buf[pos::line] = col
        return bytes(buf)


_templates: dict[int, _Template] = {}


def _zero_block(block_start: int) -> bytes:
    """The dump of 2**16 zero bytes whose first offset is ``block_start`` (aligned)."""
    high = block_start >> 16
    width = 8 if high == 0 else _offset_width(block_start)
    tpl = _templates.get(width)
    if tpl is None:
        tpl = _templates[width] = _Template(width)
    return tpl.stamp(high)


def zero_chunk(start_offset: int, nbytes: int) -> bytes:
    """Return the xxd dump of ``nbytes`` zero bytes starting at ``start_offset``.

    Equal to ``format_lines(bytes(nbytes), start_offset)``, but whole aligned 2**16-byte
    blocks are stamped from a template, so large chunks cost little more than a copy.
    """
    if start_offset < 0 or nbytes < 0:
        raise ValueError("start_offset and nbytes must be >= 0")
    parts: list[bytes] = []
    pos = start_offset
    end = start_offset + nbytes
    # A start that is not a multiple of 16 never lines up with the templates (every line
    # offset keeps the same low digit), so it takes the general path throughout.
    if pos % BYTES_PER_LINE:
        return format_lines(bytes(nbytes), start_offset)
    # Head: whole lines up to the next block boundary, formatted directly.
    head_end = min(end, -(-pos // _BLOCK_INPUT) * _BLOCK_INPUT)
    if head_end > pos:
        parts.append(format_lines(bytes(head_end - pos), pos))
        pos = head_end
    # Blocks that sit entirely below the 2**64 wrap (beyond it xxd's offsets wrap, which
    # the general path handles).
    while end - pos >= _BLOCK_INPUT and pos + _BLOCK_INPUT <= _OFFSET_MASK + 1:
        parts.append(_zero_block(pos))
        pos += _BLOCK_INPUT
    if end > pos:
        parts.append(format_lines(bytes(end - pos), pos))
    return b"".join(parts)


class ZeroStream:
    """An endless xxd dump of zero bytes, handed out in large chunks.

    Iterating yields successive chunks, each the dump of ``chunk_input`` zero bytes (a
    multiple of 16, so every chunk ends at a line boundary).  ``input_offset`` is the
    offset of the next chunk's first byte; ``output_bytes`` counts text produced so far.
    """

    def __init__(self, start_offset: int = 0, chunk_input: int = 4 * _BLOCK_INPUT) -> None:
        if start_offset < 0:
            raise ValueError(f"start_offset must be >= 0, not {start_offset}")
        if chunk_input <= 0 or chunk_input % BYTES_PER_LINE:
            raise ValueError(f"chunk_input must be a positive multiple of 16, not {chunk_input}")
        self.input_offset = start_offset
        self.output_bytes = 0
        self.chunk_input = chunk_input

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        chunk = zero_chunk(self.input_offset, self.chunk_input)
        self.input_offset += self.chunk_input
        self.output_bytes += len(chunk)
        return chunk
