"""Describing numpy arrays and torch tensors without copying them."""

from __future__ import annotations

from typing import Any, Optional, Tuple

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


_TYPESTR = {
    "|b1": "bool",
    "|u1": "uint8",
    "|i1": "int8",
    "<i2": "int16",
    "<u2": "uint16",
    "<i4": "int32",
    "<u4": "uint32",
    "<i8": "int64",
    "<u8": "uint64",
    "<f2": "float16",
    "<f4": "float32",
    "<f8": "float64",
    "<c8": "complex64",
    "<c16": "complex128",
}


def shared_fd(t: Any) -> Optional[Tuple[int, int, int]]:
    """``(fd, size, offset)`` of a torch CPU tensor whose storage is in shared memory
    (``share_memory_()``, torch's default ``file_descriptor`` strategy), else ``None``. The agent
    takes the descriptor and maps it: one copy per byte, memory to memory."""
    if not hasattr(t, "is_shared") or t.device.type != "cpu" or not t.is_shared():
        return None
    try:
        st = t.untyped_storage()
        fd, size = st._share_fd_cpu_()
    except (AttributeError, RuntimeError):
        return None  # another sharing strategy: by address instead
    return int(fd), int(size), int(t.data_ptr()) - int(st.data_ptr())


def describe(t: Any) -> Tuple[str, tuple, tuple, int, int, str, Any]:
    """``(dtype, local_shape, strides_in_elements, address, nbytes, device, owner)`` of a local shard.

    Accepts numpy arrays (and anything with ``__array_interface__``), torch tensors on the CPU or a
    CUDA device, torch DTensors (their local shard), and GPU arrays with ``__cuda_array_interface__``
    (CuPy, Numba). ``device`` is ``"cpu"`` or ``"cuda:N"``; ``owner`` is the object whose lifetime
    keeps the memory valid. Raises ValueError for anything that would need a copy (non-contiguous).
    """
    if hasattr(t, "to_local") and hasattr(t, "placements"):  # torch DTensor
        t = t.to_local()
    if hasattr(t, "data_ptr") and hasattr(t, "element_size"):  # torch.Tensor
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"tensor on {t.device}: tensorbus takes CPU and CUDA tensors")
        if not t.is_contiguous():
            raise ValueError(
                f"tensor of shape {tuple(t.shape)} with strides {tuple(t.stride())} is not contiguous; "
                "tensorbus never copies: register a contiguous tensor"
            )
        dtype = str(t.dtype).replace("torch.", "")
        device = "cpu" if t.device.type == "cpu" else f"cuda:{t.device.index or 0}"
        nbytes = t.numel() * t.element_size()
        return dtype, tuple(t.shape), tuple(t.stride()), int(t.data_ptr()), nbytes, device, t
    cai = getattr(t, "__cuda_array_interface__", None)
    if cai is not None:
        shape = tuple(cai["shape"])
        name = _TYPESTR.get(cai["typestr"])
        if name is None:
            raise ValueError(f"unsupported GPU array type {cai['typestr']!r}")
        itemsize = int(cai["typestr"][2:])
        contiguous = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            contiguous[d] = contiguous[d + 1] * shape[d + 1]
        strides = cai.get("strides")
        if strides is not None and tuple(s // itemsize for s in strides) != tuple(contiguous):
            raise ValueError(
                f"GPU array of shape {shape} with strides {strides} is not contiguous; "
                "tensorbus never copies: register a contiguous array"
            )
        n = 1
        for d in shape:
            n *= d
        # The device is read from the pointer by the native layer.
        return name, shape, tuple(contiguous), int(cai["data"][0]), n * itemsize, "cuda", t
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
    return name, tuple(a.shape), strides, int(a.__array_interface__["data"][0]), int(a.nbytes), "cpu", t
