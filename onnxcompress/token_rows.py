"""Which rows of a token activation are real tokens: calibration fits (layer refit, activation
second moments, the lrs data solver) turn [batch, sequence, features] activations into one row
per token, and rows at padding positions hold meaningless values that would bias those fits.
The mask comes from the batch's `attention_mask` input (the Hugging Face convention)."""

from __future__ import annotations

import numpy as np

# The exact input name read: Hugging Face's convention for 1 = real token, 0 = padding.
MASK_INPUT = "attention_mask"


def token_row_mask(batch: dict[str, np.ndarray], activation: np.ndarray) -> np.ndarray | None:
    """A boolean mask over the rows of a features-last token activation, or None.

    The caller passes an activation whose last axis holds the features, so that its rows are
    `activation.reshape(-1, features)` in batch × sequence order. The mask is the batch's input
    named exactly `attention_mask` (Hugging Face convention: 1 real token, 0 padding), flattened,
    when all of these hold: that input exists, holds integer or bool 0/1 values, is 2-D, and
    its shape equals the activation's first two dims; and the activation is 3-D. Otherwise
    None: every row counts (conv activations, 2-D Gemm inputs, attention-head tensors, models
    without such an input, or a float additive mask).
    """
    mask = batch.get(MASK_INPUT)
    if mask is None or np.ndim(activation) != 3:
        return None
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape != tuple(activation.shape[:2]):
        return None
    if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)):
        return None
    if not np.isin(mask, (0, 1)).all():
        return None
    return mask.reshape(-1).astype(bool)


def token_rows(batch: dict[str, np.ndarray], activation: np.ndarray) -> np.ndarray:
    """The features-last activation as rows (batch × sequence, features), without the padding
    rows when `token_row_mask` finds a mask."""
    rows = activation.reshape(-1, activation.shape[-1])
    mask = token_row_mask(batch, activation)
    return rows if mask is None else rows[mask]
