"""Build hook: all metadata lives in pyproject.toml; this only names the cffi builder."""

from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder"])
