"""Builds lmkiln's optional native BPE encoder; everything else is configured in pyproject.toml.

`optional=True`: without a C compiler (or Python headers) the install still succeeds and lmkiln
encodes with tiktoken (the `fast` extra) or `tokenizers` instead. For a checkout used without
installing: `python setup.py build_ext --inplace`.
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
        )
    ]
)
