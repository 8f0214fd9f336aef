"""Builds the cffi extension (one abi3 wheel); everything else is declared in pyproject.toml."""

from setuptools import setup

setup(
    cffi_modules=["csrc/build_core.py:ffibuilder"],
    # The core is built against the limited API (csrc/build_core.py), so one wheel serves
    # every CPython from the oldest supported one on: tag it cp311-abi3.
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
