"""Build of earlyexit_kernels.

The pure-Python package (PyTorch reference, Hugging Face drop-in, Triton kernels)
installs everywhere. Install with ``pip install --no-build-isolation .`` so that any
compiled part is built against the torch already installed.
"""

from setuptools import setup

setup()
