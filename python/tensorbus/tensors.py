"""Describing numpy arrays and torch tensors without copying them."""

from __future__ import annotations

from typing import Any, Tuple

_NUMPY_NAMES = {
    "bool": "bool",
    "uint8": "uint8",
    "int8": "int8",
    "int16": "int16",
    "uint16": "uint16",
    "int32": "int32",
    "uint32": "uint32",
    "int64": "int64",
    "uint64": "uint64",
    "float16": "float16",
    "float32": "float32",
    "float64": "float64",
    "complex64": "complex64",
    "complex128": "complex128",
    "bfloat16": "bfloat16",
}


def describe(t: Any) -> Tuple[str, tuple, tuple, int, int, Any]:
    """``(dtype, local_shape, strides_in_elements, address, nbytes, owner)`` of a local shard.

    Accepts numpy arrays (and anything with ``__array_interface__``), torch CPU tensors and torch
    DTensors (their local shard). ``owner`` is the object whose lifetime keeps the memory valid.
    Raises ValueError for anything that would need a copy (non-contiguous) or is not CPU memory.
    """
    if hasattr(t, "to_local") and hasattr(t, "placements"):  # torch DTensor
        t = t.to_local()
    if hasattr(t, "data_ptr") and hasattr(t, "element_size"):  # torch.Tensor
        if t.device.type != "cpu":
            raise ValueError(f"tensor on {t.device}: only CPU tensors are supported by this build")
        if not t.is_contiguous():
            raise ValueError(
                f"tensor of shape {tuple(t.shape)} with strides {tuple(t.stride())} is not contiguous; "
                "tensorbus never copies: register a contiguous tensor"
            )
        dtype = str(t.dtype).replace("torch.", "")
        return dtype, tuple(t.shape), tuple(t.stride()), int(t.data_ptr()), t.numel() * t.element_size(), t
    ai = getattr(t, "__array_interface__", None)
    if ai is None:
        raise ValueError(f"cannot register {type(t).__name__}: pass a numpy array or a torch tensor")
    import numpy as np

    a = np.asarray(t)
    if not a.flags["C_CONTIGUOUS"]:
        raise ValueError(
            f"array of shape {a.shape} with strides {a.strides} is not C-contiguous; "
            "tensorbus never copies: register a contiguous array"
        )
    name = _NUMPY_NAMES.get(a.dtype.name)
    if name is None:
        raise ValueError(f"unsupported numpy dtype {a.dtype}")
    strides = tuple(s // a.itemsize for s in a.strides)
    return name, tuple(a.shape), strides, int(a.__array_interface__["data"][0]), int(a.nbytes), t
