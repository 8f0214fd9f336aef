"""cffi build script (API mode, out of line) for the compiled module ``sigpoll._core``.

The C declarations handed to cffi are read from csrc/sigpoll.h itself, so the header stays
the single description of the core's interface.
"""

import pathlib
import re

from cffi import FFI

__all__ = ["ffibuilder"]

HERE = pathlib.Path(__file__).resolve().parent


def _cdefs() -> str:
    """The header without preprocessor lines, which cffi's cdef parser does not take."""
    text = (HERE / "sigpoll.h").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    keep = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#define SP_"):
            # Integer constants: cffi wants "#define NAME ..." for the values it reads back.
            name = stripped.split()[1]
            keep.append(f"#define {name} ...")
        elif not stripped.startswith("#"):
            keep.append(line)
    return "\n".join(keep)


ffibuilder = FFI()
ffibuilder.cdef(_cdefs())
ffibuilder.set_source(
    "sigpoll._core",
    '#include "sigpoll.h"',
    # Relative paths: setuptools refuses absolute ones, and builds run from the project root.
    sources=["csrc/poller.c", "csrc/guestmem.c"],
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
