"""Meshes and placements for users without torch (torch's own are accepted too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple


@dataclass(frozen=True)
class Shard:
    """Tensor dimension ``dim`` is split across this mesh dimension (torch's chunking rule)."""

    dim: int

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Replicate:
    """Every rank along this mesh dimension holds the same values."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    """Every rank along this mesh dimension holds a partial value, reduced by ``op`` (``"sum"``,
    ``"avg"``, ``"max"``, ``"min"``) before sending. Only valid on the sending side."""

    op: str = "sum"

    def __str__(self) -> str:
        return f"P({self.op})"


@dataclass(frozen=True)
class DeviceMesh:
    """An n-dimensional grid of one side's ranks, and this worker's row-major ``rank`` in it."""

    shape: Tuple[int, ...]
    rank: int

    def __init__(self, shape: Sequence[int], rank: int):
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "rank", int(rank))
        size = 1
        for s in self.shape:
            size *= s
        if not self.shape or size == 0:
            raise ValueError(f"mesh shape {self.shape} has no ranks")
        if not 0 <= self.rank < size:
            raise ValueError(f"rank {self.rank} is outside a mesh of {size} ranks")


def placement_str(p) -> str:
    """``"S(d)"``, ``"R"`` or ``"P(op)"`` for a tensorbus or torch placement."""
    if isinstance(p, (Shard, Replicate, Partial)):
        return str(p)
    name = type(p).__name__
    if name in ("Shard", "_StridedShard") and hasattr(p, "dim"):
        if name == "_StridedShard":
            raise ValueError("torch _StridedShard placements are not supported; use plain Shard")
        return f"S({p.dim})"
    if name == "Replicate":
        return "R"
    if name in ("Partial", "_Partial"):
        return f"P({getattr(p, 'reduce_op', 'sum')})"
    raise ValueError(f"unsupported placement {p!r}: use Shard(d), Replicate() or Partial()")


def mesh_shape_and_rank(mesh) -> Tuple[Tuple[int, ...], int]:
    """Shape and this worker's row-major rank, for a tensorbus or torch DeviceMesh."""
    if isinstance(mesh, DeviceMesh):
        return mesh.shape, mesh.rank
    # torch.distributed.device_mesh.DeviceMesh
    shape = tuple(int(s) for s in mesh.shape)
    coord = mesh.get_coordinate()
    if coord is None:
        raise ValueError("this process is not part of the given torch DeviceMesh")
    rank = 0
    for c, s in zip(coord, shape):
        rank = rank * s + int(c)
    return shape, rank
