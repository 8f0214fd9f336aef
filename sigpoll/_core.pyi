# The cffi-compiled extension (csrc/build_core.py) has no Python source for mypy to read.
from typing import Any

ffi: Any
lib: Any
