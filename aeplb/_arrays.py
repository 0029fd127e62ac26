from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._exceptions import InvalidTransferError


def int_array(value: Any, name: str) -> np.ndarray[Any, np.dtype[Any]]:
    """A placement given as a tensor or array-like, as a numpy array of integer expert ids."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise InvalidTransferError(
                f"{name}: expected an integer tensor or array of expert ids, "
                f"got dtype {value.dtype}"
            )
        return value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise InvalidTransferError(
            f"{name}: expected an integer tensor or array of expert ids, got dtype {arr.dtype}"
        )
    return arr
