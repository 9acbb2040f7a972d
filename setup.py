"""The one compiled part: render/_separable.c (see its header). Optional: without a C compiler the
build goes on and render.compiled falls back to the BLAS resampler (render/banded.py)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tileserver.render._separable",
            ["tileserver/render/_separable.c"],
            extra_compile_args=["-O3", "-fno-math-errno"],
            optional=True,
        )
    ]
)
