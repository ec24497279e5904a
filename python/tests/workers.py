"""Worker processes for the tests (importable by multiprocessing's spawn)."""

import os

import numpy as np


def logical(shape, dtype, seed):
    """The logical (global) tensor both sides agree on."""
    n = int(np.prod(shape)) if shape else 1
    return ((np.arange(n, dtype=np.int64) * 7 + seed) % 97).astype(dtype).reshape(shape)


def chunk(n, parts, i):
    """torch's chunk rule: piece i of parts."""
    size = -(-n // parts)
    start = min(i * size, n)
    return start, min(start + size, n)


def local_slice(shape, mesh_shape, coords, placements):
    """The local box of a rank (DTensor semantics, nested shards in mesh-dim order)."""
    box = [(0, s) for s in shape]
    for mdim, p in enumerate(placements):
        if p[0] == "S":
            d = int(p[2:-1])
            lo, hi = box[d]
            a, b = chunk(hi - lo, mesh_shape[mdim], coords[mdim])
            box[d] = (lo + a, lo + b)
    return tuple(slice(a, b) for a, b in box)


def coords_of(rank, mesh_shape):
    c = []
    for s in reversed(mesh_shape):
        c.append(rank % s)
        rank //= s
    return tuple(reversed(c))


def run_worker(env, side, rank, mesh_shape, placements, world, shapes, dtype, repeat, result_q, use_torch=False, device="cpu"):
    """One worker: bootstrap, pair, register, transfer `repeat` times, verify (receiver).

    ``device="cuda"``: torch tensors on the GPU (``use_torch`` implied)."""
    use_torch = use_torch or device != "cpu"
    os.environ.update(env)
    try:
        import tensorbus

        client, info = tensorbus.bootstrap_client(connection_timeout=20)
        local, remote = ("trainer", "inference") if side == "src" else ("inference", "trainer")
        pl = [tensorbus.Shard(int(p[2:-1])) if p[0] == "S" else tensorbus.Replicate() if p == "R" else tensorbus.Partial() for p in placements]
        client.init_pair("weights", local, remote, world, device_mesh=tensorbus.DeviceMesh(mesh_shape, rank), placements=pl, timeout=20)
        coords = coords_of(rank, mesh_shape)
        arrays = []
        for i, shape in enumerate(shapes):
            full = logical(shape, dtype, i)
            sl = local_slice(shape, mesh_shape, coords, placements)
            if side == "src":
                a = np.ascontiguousarray(full[sl])
                # Partial sources: partial index k < P-1 holds k+1, the last holds the rest, so
                # the sum over the P partial ranks is the logical value (and every one counts).
                k, p_count = 0, 1
                for mdim, p in enumerate(placements):
                    if p.startswith("P"):
                        k = k * mesh_shape[mdim] + coords[mdim]
                        p_count *= mesh_shape[mdim]
                if p_count > 1:
                    a = (np.full_like(a, k + 1) if k < p_count - 1 else a - (p_count - 1) * p_count // 2).astype(dtype)
            else:
                a = np.zeros(full[sl].shape, dtype=dtype)
            if use_torch:
                import torch

                a = torch.from_numpy(a).to(device)
            arrays.append(a)
        batch = client.register_tensors("step", [(a, "weights") for a in arrays], timeout=20)
        for _ in range(repeat):
            batch.transfer("send" if side == "src" else "recv", blocking=True, timeout=20)
        ok = True
        if side == "dst":
            for i, shape in enumerate(shapes):
                got = arrays[i].cpu().numpy() if use_torch else arrays[i]
                want = logical(shape, dtype, i)[local_slice(shape, mesh_shape, coords, placements)]
                ok &= bool(np.array_equal(got, want))
        batch.close()
        result_q.put((side, rank, ok, info.method))
    except BaseException as e:  # report everything to the parent
        result_q.put((side, rank, False, f"{type(e).__name__}: {e}"))
