"""Types of the compiled kernels (render/_separable.c); render/separable.py is their caller."""

import numpy as np

def resample_u8(src: np.ndarray, height: int, width: int, channels: int, row_idx: np.ndarray, row_w: np.ndarray,
                row_taps: int, col_idx: np.ndarray, col_w: np.ndarray, col_taps: int, out: np.ndarray) -> None: ...
def resample_f32(src: np.ndarray, height: int, planes: int, width: int, row_idx: np.ndarray, row_w: np.ndarray,
                 row_taps: int, col_idx: np.ndarray, col_w: np.ndarray, col_taps: int, out: np.ndarray,
                 precise: bool) -> None: ...
def finish_u8(planes: np.ndarray, height: int, count: int, width: int, channels: int, has_mask: bool,
              inside: np.ndarray, threshold: float, fill: np.ndarray, out: np.ndarray, valid: np.ndarray) -> None: ...
def planes_u8(base: np.ndarray, offset: int, row_stride: int, step: int, height: int, width: int, channels: int,
              valid: np.ndarray | bytes, out: np.ndarray) -> None: ...
def warp_u8(base: np.ndarray, offset: int, row_stride: int, step: int, height: int, width: int, channels: int,
            valid: np.ndarray | bytes, row_idx: np.ndarray, row_w: np.ndarray, row_taps: int, col_idx: np.ndarray,
            col_w: np.ndarray, col_taps: int, inside: np.ndarray, threshold: float, fill: np.ndarray,
            out: np.ndarray, out_valid: np.ndarray) -> None: ...
