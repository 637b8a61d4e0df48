"""Builds lmkiln's optional C extensions; everything else is configured in pyproject.toml.

- `lmkiln.data._bpe`, the native BPE encoder;
- `lmkiln.model._decode`, the kernels for generating tokens on CPUs: a GEMV and a one-token
  attention step (POSIX threads, so not on Windows).

`optional=True`: without a C compiler (or Python headers) the install still succeeds; lmkiln then
encodes with tiktoken (the `fast` extra) or `tokenizers`, and generates with torch's kernels. For a
checkout used without installing: `python setup.py build_ext --inplace`.
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lmkiln.data._bpe",
            sources=["src/lmkiln/data/_bpe.c"],
            depends=["src/lmkiln/data/_bpe_classes.h", "src/lmkiln/data/_bpe_maps.h"],
            extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
            optional=True,
        ),
    ]
    + (
        []
        if sys.platform == "win32"
        else [
            Extension(
                "lmkiln.model._decode",
                sources=["src/lmkiln/model/_decode.c"],
                extra_compile_args=["-O3"],
                extra_link_args=["-pthread", "-lm"],
                optional=True,
            )
        ]
    )
)
