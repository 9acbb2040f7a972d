"""Types of the compiled pixel kernels (render/_pixels.c); render/encode.py calls them."""

import numpy as np

def over_background(colour: np.ndarray, colour_step: int, alpha: np.ndarray, alpha_step: int, bg: bytes,
                    out: np.ndarray, pixels: int) -> None: ...
