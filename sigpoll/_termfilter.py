"""What a guest may send to the user's terminal: a streaming filter for control sequences.

A guest's console output goes to the host user's terminal, and a terminal obeys control
sequences: some of them write the host's clipboard (OSC 52), change its fonts and colours,
move or resize its window, or make the terminal type a report back (CSI 21 t echoes the
window title as input).  The console bridge passes guest output through
:class:`TerminalFilter`, which keeps what full-screen programs need (text, colours, cursor
movement, erasing, scroll regions, the alternate screen, modes) and drops the rest, and
:meth:`TerminalFilter.reset_sequence` undoes, when the user detaches, the modes the guest
actually changed (and nothing else: resetting a scroll region or leaving an alternate screen
the guest never entered would move the user's cursor).

The filter is pure (bytes in, bytes out), keeps no more than :data:`MAX_PENDING` bytes of an
unfinished sequence between calls, and gives the same output however the input is split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["ALLOWED_OSC", "MAX_PENDING", "RESET_SEQUENCE", "FilterCounts", "ModeTracker", "TerminalFilter"]

#: OSC commands passed through: 0, 1 and 2 set the icon/window title and nothing else.
ALLOWED_OSC = frozenset({b"0", b"1", b"2"})

#: Longest unfinished sequence kept between calls. An OSC/DCS string longer than this is
#: dropped as it arrives rather than buffered, so a hostile guest cannot grow memory.
MAX_PENDING = 4096

#: Every reset :meth:`ModeTracker.reset_sequence` may send, in one string (leave the
#: alternate screen, show the cursor, stop mouse and focus reporting and bracketed paste,
#: normal cursor keys and keypad, ASCII character set, no scroll region, default colours).
#: Not sent as a whole any more: it moves the cursor of a terminal that was never changed.
RESET_SEQUENCE = (
    b"\x1b[?1049l\x1b[?25h"
    b"\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1004l\x1b[?1005l\x1b[?1006l\x1b[?1015l"
    b"\x1b[?2004l\x1b[?1l\x1b>\x1b(B\x0f\x1b[r\x1b[0m"
)

# CSI final bytes that are dropped: t (window manipulation, which includes reporting the
# title back as input and resizing or moving the window), and with an intermediate byte the
# finals that request terminal state or edit rectangles ("CSI ... $ p" and the like).  Cursor
# style ("CSI n SP q") stays.
_CSI_DROP_FINALS = frozenset(b"t")
_CSI_DROP_WITH_INTERMEDIATE = frozenset(b"pu{|}~w")

# The scanner stops only at bytes that can start a sequence; valid UTF-8 is skipped whole so
# its continuation bytes (0x80-0xBF) are never mistaken for 8-bit C1 controls.
_SCAN = re.compile(
    rb"(?:[\x00-\x1a\x1c-\x7f]+"  # ASCII but ESC
    rb"|\xc2[\xa0-\xbf]|[\xc3-\xdf][\x80-\xbf]"  # two-byte UTF-8, not a C1 code point
    rb"|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}"
    rb"|\x1b\[[\x30-\x3f]{0,256}[\x40-\x73\x75-\x7e])+"  # CSI with no intermediates, final not t
)
# Parameters and intermediates are bounded: a longer "sequence" is malformed, its introducer
# is dropped and the rest shown as text, so no unfinished sequence outgrows MAX_PENDING.
_CSI = re.compile(rb"\x1b\[([\x30-\x3f]{0,256})([\x20-\x2f]{0,16})([\x40-\x7e])")
_CSI_PREFIX = re.compile(rb"\x1b\[[\x30-\x3f]{0,256}[\x20-\x2f]{0,16}\Z")
_ESC = re.compile(rb"\x1b([\x20-\x2f]{0,16})([\x30-\x7e])")
_ESC_PREFIX = re.compile(rb"\x1b[\x20-\x2f]{0,16}\Z")
_STRING_END = re.compile(rb"\x07|\x1b\\|\xc2\x9c")
# Lead bytes that can still become valid UTF-8 when more bytes arrive.
_UTF8_PREFIX = re.compile(rb"(?:[\xc2-\xdf]|[\xe0-\xef][\x80-\xbf]?|[\xf0-\xf4][\x80-\xbf]{0,2})\Z")


# Private (DEC) modes a guest may change that the user's shell expects back, with their
# usual value (True: set).  Origin mode (6) is left alone: resetting it homes the cursor,
# and with the scroll region reset it has no visible effect.
_PRIVATE_DEFAULTS = {
    1: False,  # application cursor keys
    5: False,  # reverse video
    7: True,  # autowrap
    25: True,  # cursor visible
    66: False,  # application keypad (DECNKM)
    1000: False, 1001: False, 1002: False, 1003: False,  # mouse reporting
    1004: False,  # focus reporting
    1005: False, 1006: False, 1015: False, 1016: False,  # mouse encodings
    2004: False,  # bracketed paste
}
_ALT_SCREENS = (1049, 1047, 47)

_TRACK = re.compile(
    rb"\x1b\[([\x30-\x3f]*)([\x20-\x2f]*)([hlmqr])"  # modes, SGR, cursor style, scroll region
    rb"|\x1b([=>c])"  # keypad modes, full reset
    rb"|\x1b([()])([\x30-\x7e])"  # G0/G1 character sets
    rb"|([\x0e\x0f])"  # shift out / shift in
)


class ModeTracker:
    """Follows the terminal state a stream of output changes, to undo just that.

    :meth:`track` takes complete sequences (the filter's output); :meth:`reset_sequence`
    returns the bytes that put back what was changed, or ``b""`` if nothing was: a guest
    that only printed text leaves the user's terminal (and cursor) exactly as it was.
    """

    def __init__(self) -> None:
        self.private: dict[int, bool] = {}  #: DEC private modes the stream set or reset
        self.alt_screen = 0  #: the alternate-screen mode it entered (1049, 1047, 47) or 0
        self.insert = False  #: insert mode (IRM) on
        self.region = False  #: a scroll region set
        self.sgr = False  #: colours or attributes other than the default
        self.cursor_style = False
        self.keypad = False  #: application keypad (DECKPAM)
        self.charset = False  #: G0 is not ASCII
        self.shifted = False  #: shifted out to G1

    def track(self, data: bytes) -> None:
        """Note the mode changes in ``data`` (complete sequences only)."""
        if b"\x1b" not in data and b"\x0e" not in data and b"\x0f" not in data:
            return
        for m in _TRACK.finditer(data):
            params, inter, final, esc, gset, gname, shift = m.groups()
            if final is not None:
                self._csi(params, inter, final)
            elif esc is not None:
                if esc == b"=":
                    self.keypad = True
                elif esc == b">":
                    self.keypad = False
                else:  # RIS: the terminal is back to its defaults
                    self.__init__()  # type: ignore[misc]
            elif gset is not None:
                if gset == b"(":
                    self.charset = gname != b"B"
            elif shift is not None:
                self.shifted = shift == b"\x0e"

    def _csi(self, params: bytes, inter: bytes, final: bytes) -> None:
        if final == b"q":
            if inter == b" ":
                self.cursor_style = params not in (b"", b"0")
            return
        if inter:
            return
        if final == b"m":
            self.sgr = any(p.lstrip(b"0") for p in params.replace(b":", b";").split(b";"))
        elif final == b"r":
            self.region = bool(params.strip(b";")) and not params.startswith(b"?")
        elif params.startswith(b"?"):
            on = final == b"h"
            for p in params[1:].split(b";"):
                if not p.isdigit():
                    continue
                mode = int(p)
                if mode in _ALT_SCREENS:
                    self.alt_screen = mode if on else 0
                elif mode in _PRIVATE_DEFAULTS:
                    self.private[mode] = on
        elif final in b"hl":
            for p in params.split(b";"):
                if p == b"4":
                    self.insert = final == b"h"

    def reset_sequence(self) -> bytes:
        """What puts back every mode the stream changed (``b""`` when it changed none)."""
        out = []
        if self.region:
            # Resetting the region homes the cursor: save and restore around it.
            out.append(b"\x1b7\x1b[r\x1b8")
        for mode, on in sorted(self.private.items()):
            if mode != 25 and on != _PRIVATE_DEFAULTS[mode]:
                out.append(b"\x1b[?%d%s" % (mode, b"h" if _PRIVATE_DEFAULTS[mode] else b"l"))
        for changed, undo in ((self.insert, b"\x1b[4l"), (self.keypad, b"\x1b>"), (self.charset, b"\x1b(B"),
                              (self.shifted, b"\x0f"), (self.sgr, b"\x1b[0m"), (self.cursor_style, b"\x1b[0 q")):
            if changed:
                out.append(undo)
        if self.alt_screen:
            out.append(b"\x1b[?%dl" % self.alt_screen)  # 1049 also restores the cursor
        if self.private.get(25) is False:
            out.append(b"\x1b[?25h")
        return b"".join(out)


@dataclass
class FilterCounts:
    """What the filter has dropped so far, by kind."""

    osc: int = 0  #: operating system commands other than titles (clipboard, colours, fonts...)
    strings: int = 0  #: DCS, SOS, PM and APC strings
    csi: int = 0  #: CSI sequences that manipulate the window or request state
    c1: int = 0  #: 8-bit C1 controls, raw or UTF-8 encoded, and malformed sequences
    kinds: list[str] = field(default_factory=list)  #: the first few dropped, for a log line

    def note(self, kind: str, sample: bytes) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.kinds) < 8:
            self.kinds.append(f"{kind}:{sample[:16]!r}")


class TerminalFilter:
    """Feed guest output in, get what may reach the user's terminal out.

    ``feed`` may be called with any split of the stream; an incomplete sequence at the end of
    a chunk is held (at most :data:`MAX_PENDING` bytes) until the rest arrives.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._dropping_string = False  # inside an over-long OSC/DCS: drop until its end
        self.counts = FilterCounts()
        self.modes = ModeTracker()  #: what the kept output changed, for :meth:`reset_sequence`

    def reset_sequence(self) -> bytes:
        """The bytes that undo the modes the output so far changed (``b""`` if none)."""
        return self.modes.reset_sequence()

    def summary(self) -> str:
        """One line on what was blocked (``""`` if nothing was)."""
        c = self.counts
        names = (("osc", "OSC (clipboard, colours, fonts)"), ("strings", "DCS/APC/PM/SOS string"),
                 ("csi", "CSI (window, reports)"), ("c1", "C1 or malformed"))
        parts = [f"{n} {label}" for kind, label in names if (n := getattr(c, kind))]
        if not parts:
            return ""
        total = c.osc + c.strings + c.csi + c.c1
        return (f"blocked {total} control sequence{'s' if total != 1 else ''} the console sent to your "
                f"terminal: {', '.join(parts)} (--raw lets them through)")

    def feed(self, data: bytes) -> bytes:
        """Filter the next piece of the stream."""
        buf = self._pending + bytes(data) if self._pending else bytes(data)
        self._pending = b""
        out: list[bytes] = []
        i, n = 0, len(buf)
        if self._dropping_string:
            i = self._skip_string(buf, 0)
            if i < 0:
                return b""
        while i < n:
            m = _SCAN.match(buf, i)
            if m is not None:
                out.append(m.group())
                i = m.end()
                continue
            nxt = self._special(buf, i, out)
            if nxt < 0:  # incomplete: keep the tail for the next call
                tail = buf[i:]
                if len(tail) > MAX_PENDING:
                    self.counts.note("c1", tail)
                    tail = b""
                self._pending = tail
                break
            i = nxt
        kept = b"".join(out)
        self.modes.track(kept)
        return kept

    def _special(self, buf: bytes, i: int, out: list[bytes]) -> int:
        """Handle the sequence at ``buf[i]``; return where the text resumes, or -1 if the
        sequence is not complete yet (or, for strings, is being dropped to the end)."""
        b = buf[i]
        if b != 0x1B:
            if _UTF8_PREFIX.match(buf, i):
                return -1  # a UTF-8 character cut in two by the chunking
            if b == 0xC2 and 0x80 <= buf[i + 1] <= 0x9F:  # U+0080..U+009F: C1, encoded
                self.counts.note("c1", buf[i : i + 2])
                return i + 2
            if 0x80 <= b <= 0x9F:  # a raw 8-bit C1 control (in UTF-8, a stray continuation)
                self.counts.note("c1", buf[i : i + 1])
                return i + 1
            out.append(buf[i : i + 1])  # malformed UTF-8 but no control in any encoding
            return i + 1
        if i + 1 >= len(buf):
            return -1
        kind = buf[i + 1]
        if kind == 0x5B:  # '[': CSI
            m = _CSI.match(buf, i)
            if m is None:
                if _CSI_PREFIX.match(buf, i):
                    return -1
                self.counts.note("c1", buf[i : i + 2])  # broken CSI: drop its introducer
                return i + 2
            params, inter, final = m.groups()
            if final[0] in _CSI_DROP_FINALS or (inter and final[0] in _CSI_DROP_WITH_INTERMEDIATE):
                self.counts.note("csi", m.group())
            else:
                out.append(m.group())
            return m.end()
        if kind in b"]P X^_":  # OSC, DCS, SOS, PM, APC: strings up to BEL/ST
            end = _STRING_END.search(buf, i + 2)
            if end is None:
                if len(buf) - i > MAX_PENDING:
                    self.counts.note("osc" if kind == 0x5D else "strings", buf[i : i + 16])
                    self._dropping_string = True
                    self._skip_string(buf, len(buf))  # keeps a split terminator's first byte
                    return len(buf)
                return -1
            body = buf[i + 2 : end.start()]
            if kind == 0x5D and body.split(b";", 1)[0] in ALLOWED_OSC and b";" in body:
                out.append(buf[i : end.end()])
            else:
                self.counts.note("osc" if kind == 0x5D else "strings", buf[i : end.end()])
            return end.end()
        m = _ESC.match(buf, i)
        if m is None:
            if _ESC_PREFIX.match(buf, i):
                return -1
            self.counts.note("c1", buf[i : i + 1])  # ESC followed by a control: drop the ESC
            return i + 1
        out.append(m.group())
        return m.end()

    def _skip_string(self, buf: bytes, start: int) -> int:
        end = _STRING_END.search(buf, start)
        if end is None:
            # Keep a trailing ESC or 0xC2: it may be the first half of the terminator.
            if buf[-1:] in (b"\x1b", b"\xc2"):
                self._pending = buf[-1:]
            return -1
        self._dropping_string = False
        return end.end()
