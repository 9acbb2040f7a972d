"""Types of the compiled kernels (render/_separable.c); render/separable.py is their caller."""

from typing_extensions import Buffer

def resample_u8(src: Buffer, height: int, width: int, channels: int, row_idx: Buffer, row_w: Buffer,
                row_taps: int, col_idx: Buffer, col_w: Buffer, col_taps: int, out: Buffer) -> None: ...
def resample_f32(src: Buffer, height: int, planes: int, width: int, row_idx: Buffer, row_w: Buffer,
                 row_taps: int, col_idx: Buffer, col_w: Buffer, col_taps: int, out: Buffer,
                 precise: bool) -> None: ...
def finish_u8(planes: Buffer, height: int, count: int, width: int, channels: int, has_mask: bool,
              inside: Buffer, threshold: float, fill: Buffer, out: Buffer, valid: Buffer) -> None: ...
