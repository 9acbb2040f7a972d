"""Types of the compiled mesh transform (render/_mesh.c); render/draw.py's mesh_transform calls it."""

import numpy as np

def mesh_bicubic(src: np.ndarray, height: int, width: int, bands: int, boxes: np.ndarray, coefficients: np.ndarray,
                 out: np.ndarray, out_height: int, out_width: int) -> None: ...
