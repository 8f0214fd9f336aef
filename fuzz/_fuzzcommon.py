"""Shared plumbing of the fuzz harnesses: instrumentation, the libFuzzer entry, input slicing.

Every harness is a plain module with ``one_input(data: bytes) -> None``; the tests import
it and replay the seed corpus through that function, and ``python fuzz/<target>.py``
hands the same function to atheris (coverage-guided, libFuzzer flags).  Only sigpoll's own
modules are instrumented: coverage of asyncio or struct would only dilute the signal.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["CORPUS_ROOT", "ByteReader", "instrumentation", "fuzz_main"]

CORPUS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def instrumentation(module_name: str) -> contextlib.AbstractContextManager[Any]:
    """Wrap the harness's ``sigpoll`` imports: instrumented when run as a fuzzer.

    Imported by the tests (``module_name != "__main__"``) nothing is instrumented, so
    replaying seeds costs what the plain code costs.
    """
    if module_name != "__main__":
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=["sigpoll"])


def fuzz_main(one_input: Callable[[bytes], None], target: str) -> None:
    """Run ``one_input`` under atheris with libFuzzer's command line (``sys.argv``).

    With no corpus directory on the command line, the committed seeds are used read-only
    (libFuzzer writes new inputs into the *first* directory, so the repo's seeds are never
    that one unless asked for).
    """
    import logging

    import atheris

    # A broken ring or a dropped frontend is logged once per input: at thousands of
    # inputs a second that is only noise.  Errors (bugs caught and logged) still show.
    logging.getLogger("sigpoll").setLevel(logging.ERROR)
    argv = list(sys.argv)
    if not any(os.path.isdir(a) for a in argv[1:] if not a.startswith("-")):
        argv.append(os.path.join(CORPUS_ROOT, target))
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


class ByteReader:
    """Consumes a fuzz input as a stream of small integers and byte strings.

    Running out of input is not an error: every read then returns zeros/empties, so any
    prefix of an input is itself a valid (shorter) program -- which keeps libFuzzer's
    mutations meaningful.
    """

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def __len__(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b"\0"), "little")

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + max(n, 0)]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        return self.take(len(self))

    def pick(self, choices: list[Any] | tuple[Any, ...]) -> Any:
        return choices[self.u8() % len(choices)]


def chunks(data: bytes, sizes: Iterator[int]) -> Iterator[bytes]:
    """Cut ``data`` at the (positive) sizes given, the last piece taking the rest."""
    pos = 0
    for n in sizes:
        if pos >= len(data):
            return
        yield data[pos:pos + max(n, 1)]
        pos += max(n, 1)
    if pos < len(data):
        yield data[pos:]
