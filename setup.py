"""Builds the cffi extension; everything else is declared in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["csrc/build_core.py:ffibuilder"])
