"""im2col: a 2-D Conv's input as rows of patches, so a conv is a matrix product."""

from __future__ import annotations

import numpy as np


def conv_patches(x: np.ndarray, kernel, geometry: dict[str, list[int]]) -> np.ndarray:
    """im2col of a 2-D Conv's input: (N, k·kh·kw, H_out, W_out), features ordered as the
    weight's (k, kh, kw) so that the weight reshaped to (n, k·kh·kw) multiplies it."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, geometry["strides"], geometry["dilations"]
    top, left, bottom, right = geometry["pads"]
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    taps = [
        padded[
            :,
            :,
            i * dh : i * dh + sh * (out_h - 1) + 1 : sh,
            j * dw : j * dw + sw * (out_w - 1) + 1 : sw,
        ]
        for i in range(kh)
        for j in range(kw)
    ]
    stacked = np.stack(taps, axis=2)  # N, k, kh·kw, H_out, W_out
    return stacked.reshape(x.shape[0], -1, out_h, out_w)
