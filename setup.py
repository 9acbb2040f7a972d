"""The compiled parts, both optional: without a C compiler the build goes on and the same work runs
in numpy/BLAS (render/separable.py falls back to render/banded.py, encode to numpy) or Pillow (draw.mesh_transform).

- render/_separable.c: separable resampling and warp's last step for uint8 (see its header).
- render/_mesh.c: Pillow's bicubic mesh transform, byte for byte, so without FMA contraction.
- render/_pixels.c: pixel-wise uint8 kernels of the encoders (alpha over a background).
- render/_buffers.h: what they share (the AVX2 clones, releasing borrowed buffers).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tileserver.render._separable",
            ["tileserver/render/_separable.c"],
            extra_compile_args=["-O3", "-fno-math-errno"],
            depends=["tileserver/render/_buffers.h"],
            optional=True,
        ),
        Extension(
            "tileserver.render._pixels",
            ["tileserver/render/_pixels.c"],
            extra_compile_args=["-O3"],
            depends=["tileserver/render/_buffers.h"],
            optional=True,
        ),
        Extension(
            "tileserver.render._mesh",
            ["tileserver/render/_mesh.c"],
            extra_compile_args=["-O3", "-ffp-contract=off"],
            depends=["tileserver/render/_buffers.h"],
            optional=True,
        ),
    ]
)
