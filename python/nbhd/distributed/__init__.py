# SPDX-License-Identifier: Apache-2.0
"""Neighborhood attention over a token grid split across the ranks of a torch.distributed
process group (docs/distributed.md): each rank passes its shard of query, key and value
and gets back its shard of the output, equal to the single-device result on the whole
grid, forward and backward.

    nbhd.distributed.na1d / na2d / na3d / neighborhood_attention   the single-device arguments
                                                                   plus group, shard_axes, mesh_shape, mode
    nbhd.distributed.plan                                          spatial or head-parallel, and why

Two modes: "spatial" (each rank receives the key/value rows its queries' windows reach
from the ranks that own them, a halo, and runs the ordinary call on its extended
segment, for its own queries only where the backend runs a query sub-box) and "heads"
(an all-to-all gives each rank the whole grid for a share of the heads). "auto" lets
plan() choose from the problem and the group."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch.nn import functional as F

from .. import _core, _nbhd
from .. import functional as _functional
from ._exchange import Group, Route, SummedGradient, start_transfer, transfer
from ._layout import (Partition, Plan, Problem, even_sizes, extended_box, halo_blocks, head_blocks, heads_refusal,
                      interior_box, make_plan, mesh_coords, own_queries)

__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention", "plan", "Plan"]

MODES = ("auto", "spatial", "heads")

# Spatial mode computes only each rank's own queries where the backend runs a query
# sub-box; False makes every rank recompute its halo's queries (the path of the GPU
# backends until they run a sub-box), so that tests keep both paths tested.
_USE_QUERY_BOX = True


def neighborhood_attention(query, key, value, kernel_size, *, stride=1, dilation=1, is_causal=False, scale=None,
                           rpb=None, additional_keys=None, additional_values=None, return_lse=False, backend=None,
                           periodic=False, group=None, shard_axes=0, mesh_shape=None, mode="auto",
                           sum_replicated_grads=True):
    """Neighborhood attention over the grid that the group's shards tile (rank taken
    from query.ndim - 3). query, key, value: this rank's shard [B, X1..Xr, H, D] (key,
    value with Hkv heads); returns this rank's shard of out (and of lse with
    return_lse=True). The window arguments, scale, rpb, the additional tokens and
    backend mean what they mean for nbhd.neighborhood_attention, on the global grid;
    rpb and the additional tokens are replicated (every rank passes the same).

    group: the torch.distributed process group (None: the default group).
    shard_axes: the grid axis split over the group (0 is X1), or a tuple of axes.
    mesh_shape: ranks per split axis (default: the whole group on the one axis); rank
        r's coordinates are r unravelled row-major over mesh_shape, and coordinate c
        along an axis holds the c-th run of it. Shards may be uneven; each needs at
        least one token per axis, and shards at the same coordinate the same length.
    mode: "spatial" (halo exchange), "heads" (all-to-all; heads and kv heads multiples
        of the group size) or "auto" (what plan() chooses).
    sum_replicated_grads: the gradients of rpb and the additional tokens are summed
        over the group in backward, so every rank holds the gradient of the sum of all
        ranks' losses; False leaves this rank's share (for a caller that reduces every
        parameter's gradient itself, as the nbhd.nn layers' users do)."""
    return _attention(None, "neighborhood_attention", query, key, value, kernel_size, stride, dilation, is_causal,
                      scale, rpb, additional_keys, additional_values, return_lse, backend, periodic, group,
                      shard_axes, mesh_shape, mode, sum_replicated_grads)


def _ranked(rank: int, name: str):
    def na(query, key, value, kernel_size, *, stride=1, dilation=1, is_causal=False, scale=None, rpb=None,
           additional_keys=None, additional_values=None, return_lse=False, backend=None, periodic=False, group=None,
           shard_axes=0, mesh_shape=None, mode="auto", sum_replicated_grads=True):
        return _attention(rank, name, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                          additional_keys, additional_values, return_lse, backend, periodic, group, shard_axes,
                          mesh_shape, mode, sum_replicated_grads)

    na.__name__ = na.__qualname__ = name
    na.__doc__ = (f"{rank}-D distributed neighborhood attention: this rank's shard {_core.token_layout(rank)}. "
                  f"Same arguments and results as nbhd.distributed.neighborhood_attention.")
    return na


na1d = _ranked(1, "na1d")
na2d = _ranked(2, "na2d")
na3d = _ranked(3, "na3d")


def plan(grid: Sequence[int], kernel_size, *, stride=1, dilation=1, is_causal=False, periodic=False, heads: int,
         kv_heads: Optional[int] = None, dim: int, dim_v: Optional[int] = None, batch: int = 1,
         dtype=torch.float16, world_size: int, shard_axes=0, mesh_shape=None, shard_sizes=None,
         link_gbps: float = 450.0, tflops: float = 400.0, device: str = "cuda", backend: Optional[str] = None,
         backward: bool = True) -> Plan:
    """How a problem on the global grid `grid` would run over world_size ranks, and why.

    Returns a Plan: mode ("spatial" or "heads", the one mode="auto" takes), and per mode
    the busiest rank's bytes received and sent per forward, the query tokens it computes
    against the ones it owns and an estimated forward time at link_gbps (GB/s per
    direction per rank; 450 is an H100 SXM's NVLink) and tflops (attention compute
    rate). str(plan) explains the choice. shard_sizes: per split axis the shard lengths
    by mesh coordinate (default: even). device ("cuda" or "cpu") and backend: where the
    local calls run; spatial mode computes only a rank's own queries where that backend
    runs a query sub-box (the CPU backends, naive and fused; fused's backward not on a
    periodic axis the box splits), else it recomputes the halo's queries too.
    backward: plan for training (the sub-box must run backward too); False for
    inference."""
    rank = len(grid)
    window = _core.make_window(rank, kernel_size, stride, dilation, is_causal, periodic)
    axes = _normalise_axes(shard_axes, rank)
    mesh = _normalise_mesh(mesh_shape, axes, world_size)
    if math.prod(mesh) != world_size:
        raise ValueError(f"mesh_shape {mesh} holds {math.prod(mesh)} ranks but world_size is {world_size}")
    if shard_sizes is None:
        sizes = tuple(even_sizes(grid[a], m) for a, m in zip(axes, mesh))
    else:
        sizes = tuple(tuple(int(n) for n in s) for s in shard_sizes)
        for a, m, s in zip(axes, mesh, sizes):
            if len(s) != m or sum(s) != grid[a] or min(s) < 1:
                raise ValueError(f"shard_sizes {list(s)} along axis {a} must be {m} positive lengths summing to "
                                 f"the axis's {grid[a]} tokens")
    partition = Partition(tuple(int(n) for n in grid), axes, mesh, sizes)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    element_size = torch.empty((), dtype=torch_dtype).element_size()
    problem = Problem(batch, heads, kv_heads or heads, dim, dim_v or dim, element_size,
                      str(torch_dtype).replace("torch.", ""))
    _core.attention_problem(window, [batch, *grid, heads, dim], [batch, *grid, problem.kv_heads, dim],
                            [batch, *grid, problem.kv_heads, problem.dim_v])
    return make_plan(partition, window, problem,
                     _own_queries_only(partition, window, problem, device, backend, backward), link_gbps, tflops)


# ----------------------------------------------------------------- one call

def _attention(rank, name, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, ak, av,
               return_lse, backend, periodic, group, shard_axes, mesh_shape, mode, sum_replicated_grads):
    group = Group(group)
    # Arguments this rank refuses are refused on every rank: all ranks exchange what
    # they were given (or the reason they refuse it) before anyone raises.
    try:
        window, description = _local_arguments(
            rank, name, group.size, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, ak, av,
            return_lse, backend, periodic, shard_axes, mesh_shape, mode, sum_replicated_grads)
        refusal = None
    except (TypeError, ValueError) as error:
        refusal = type(error)(f"rank {group.rank} refused its arguments ({error}); every rank stops")
        refusal.__cause__ = error
        description = {"error": str(refusal)}
    descriptions = group.all_gather_object(description, "exchange of shard shapes")
    if refusal is not None:
        raise refusal
    partition = _check_agreement(descriptions, group.size)
    problem = Problem(query.shape[0], query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1],
                      query.element_size(), str(query.dtype).replace("torch.", ""))
    global_shape = [query.shape[0], *partition.grid]
    _core.attention_problem(window, global_shape + list(query.shape[-2:]), global_shape + list(key.shape[-2:]),
                            global_shape + list(value.shape[-2:]), scale, None if ak is None else ak.shape,
                            None if av is None else av.shape, rpb is not None)
    heads_unsplit = heads_refusal(problem.heads, problem.kv_heads, group.size)
    if mode == "heads" and heads_unsplit:
        raise ValueError(f"mode='heads' cannot run: {heads_unsplit}")
    backward = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                               for x in (query, key, value, rpb, ak, av))
    own_only = [] if mode == "heads" else _own_queries_only(partition, window, problem, query.device.type, backend,
                                                            backward)
    if mode == "auto":
        mode = make_plan(partition, window, problem, own_only).mode
    if sum_replicated_grads:
        rpb, ak, av = (x if x is None or not x.requires_grad else
                       SummedGradient.apply(group, f"sum of the {what} gradient over the group", x)
                       for x, what in ((rpb, "rpb"), (ak, "additional_keys"), (av, "additional_values")))
    if mode == "heads":
        out, lse = _heads(group, partition, window, query, key, value, rpb, ak, av, scale, backend, return_lse)
    else:
        out, lse = _spatial(group, partition, window, query, key, value, rpb, ak, av, scale, backend,
                            own_only[group.rank])
    return (out, lse) if return_lse else out


def _local_arguments(rank, name, world_size, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                     ak, av, return_lse, backend, periodic, shard_axes, mesh_shape, mode, sum_replicated_grads):
    """This rank's arguments checked on their own: (window, the description every rank
    compares)."""
    named = {"query": query, "key": key, "value": value, "rpb": rpb, "additional_keys": ak, "additional_values": av}
    for what, x in named.items():
        optional = what not in ("query", "key", "value")
        if not isinstance(x, torch.Tensor) and not (optional and x is None):
            raise TypeError(f"nbhd.distributed.{name}: {what} must be a torch.Tensor, got {type(x).__name__}")
    if rank is None:
        rank = query.dim() - 3
        if not 1 <= rank <= _core.MAX_RANK:
            raise ValueError(f"query has {query.dim()} dimensions (shape {list(query.shape)}); neighborhood attention "
                             f"takes [batch, X1..Xr, heads, dim] with r = 1, 2 or 3 spatial axes")
    elif query.dim() != rank + 3:
        raise ValueError(f"{name} takes query {_core.token_layout(rank)} ({rank + 3} dimensions), got shape "
                         f"{list(query.shape)}")
    for what, x in (("key", key), ("value", value)):
        if x.dim() != query.dim() or x.shape[:rank + 1] != query.shape[:rank + 1]:
            raise ValueError(f"{what} has shape {list(x.shape)} but its batch and grid must be query's "
                             f"{list(query.shape[:rank + 1])}")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"query, key and value must have one dtype; got {query.dtype}, {key.dtype}, {value.dtype}")
    window = _core.make_window(rank, kernel_size, stride, dilation, is_causal, periodic)
    scale = _core.check_scale(scale)
    _core.check_pair(ak, av)
    if mode not in MODES:
        raise ValueError(f"mode = {mode!r} must be one of {', '.join(map(repr, MODES))}")
    axes = _normalise_axes(shard_axes, rank)
    mesh = _normalise_mesh(mesh_shape, axes, world_size)
    description = {
        "error": None,
        "grid": tuple(query.shape[1:rank + 1]),
        "batch": query.shape[0],
        "query heads, dim": tuple(query.shape[rank + 1:]),
        "key heads, dim": tuple(key.shape[rank + 1:]),
        "value heads, dim": tuple(value.shape[rank + 1:]),
        "dtype": str(query.dtype).replace("torch.", ""),
        "device type": query.device.type,
        "rpb shape": None if rpb is None else tuple(rpb.shape),
        "additional_keys shape": None if ak is None else tuple(ak.shape),
        "additional_values shape": None if av is None else tuple(av.shape),
        "window": tuple(window),
        "scale": scale,
        "backend": backend,
        "return_lse": bool(return_lse),
        "mode": mode,
        "sum_replicated_grads": bool(sum_replicated_grads),
        "shard_axes": axes,
        "mesh_shape": mesh,
    }
    return window, description


def _normalise_axes(shard_axes, rank: int) -> tuple:
    axes = shard_axes if isinstance(shard_axes, (tuple, list)) else (shard_axes,)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int) or not -rank <= a < rank:
            raise ValueError(f"shard_axes = {shard_axes!r}: each entry must be a grid axis in [{-rank}, {rank}) "
                             f"(0 is X1)")
        out.append(a % rank)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"shard_axes = {shard_axes!r} must name at least one grid axis, each once")
    return tuple(out)


def _normalise_mesh(mesh_shape, axes: tuple, world_size: int) -> tuple:
    if mesh_shape is None:
        if len(axes) > 1:
            raise ValueError(f"shard_axes = {axes} splits {len(axes)} axes: pass mesh_shape, the number of ranks "
                             f"along each (rank r's coordinates are r unravelled row-major over it)")
        return (world_size,)
    mesh = tuple(mesh_shape) if isinstance(mesh_shape, (tuple, list)) else (mesh_shape,)
    if len(mesh) != len(axes) or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mesh):
        raise ValueError(f"mesh_shape = {mesh_shape!r} must hold one positive int per split axis ({len(axes)})")
    return mesh


def _check_agreement(descriptions: list, world_size: int) -> Partition:
    """The partition the ranks' shards make, or ValueError (the same on every rank)
    naming the first rank whose arguments do not fit."""
    for r, d in enumerate(descriptions):
        if d["error"] is not None:
            raise ValueError(d["error"])
    first = descriptions[0]
    for r, d in enumerate(descriptions[1:], start=1):
        for field, value in d.items():
            if field != "grid" and value != first[field]:
                raise ValueError(f"rank {r} passed {field} = {value} but rank 0 passed {first[field]}; every rank of "
                                 f"the group must pass the same")
    axes, mesh = first["shard_axes"], first["mesh_shape"]
    if math.prod(mesh) != world_size:
        raise ValueError(f"mesh_shape {mesh} holds {math.prod(mesh)} ranks but the process group has {world_size}")
    grids = [d["grid"] for d in descriptions]
    extents = list(grids[0])
    sizes = []
    for i, axis in enumerate(axes):
        along = {}
        for r, grid in enumerate(grids):
            c = mesh_coords(r, mesh)[i]
            if grid[axis] < 1:
                raise ValueError(f"rank {r} has no token along axis {axis}; every shard needs at least one")
            r0 = along.setdefault(c, r)
            if grid[axis] != grids[r0][axis]:
                raise ValueError(f"the shards do not tile the global grid: along axis {axis} (mesh dimension {i}), "
                                 f"rank {r} has {grid[axis]} tokens but rank {r0}, at the same coordinate {c}, has "
                                 f"{grids[r0][axis]}")
        sizes.append(tuple(grids[along[c]][axis] for c in range(mesh[i])))
        extents[axis] = sum(sizes[-1])
    for axis in range(len(extents)):
        if axis in axes:
            continue
        for r, grid in enumerate(grids):
            if grid[axis] != grids[0][axis]:
                raise ValueError(f"the shards do not tile the global grid: axis {axis} is not split (shard_axes = "
                                 f"{axes}) but rank {r} has {grid[axis]} tokens on it and rank 0 has "
                                 f"{grids[0][axis]}")
    return Partition(tuple(extents), axes, mesh, tuple(sizes))


# ----------------------------------------------------------------- the two modes

def _whole(box) -> tuple:
    """Index of a grid box in a [B, X..., H, D] tensor."""
    return (slice(None), *box, Ellipsis)


def _local(query, key, value, window, rpb, ak, av, scale, backend, query_box=None):
    return _functional.neighborhood_attention(
        query, key, value, window.kernel_size, stride=window.stride, dilation=window.dilation,
        is_causal=window.is_causal, periodic=window.periodic, scale=scale, rpb=rpb, additional_keys=ak,
        additional_values=av, return_lse=True, backend=backend, query_box=query_box)


def _segment_window(window, segment) -> "_core.Window":
    """The window of a rank's local problem on its extended segment: an axis stays
    periodic only where the segment is the whole axis (see extended_segment)."""
    return window._replace(periodic=tuple(w and s.whole for w, s in zip(window.periodic, segment)))


def _own_queries_only(partition, window, problem, device: str, backend, backward: bool) -> list:
    """Per rank, whether its local call computes only its own queries: the backend runs
    the query sub-box of its segment on `device`, forward and, when gradients flow,
    backward (nbhd._nbhd.can_run; every rank asks the same of the same gathered shapes,
    so all agree; an empty batch is refused there and takes the recompute path)."""
    if not _USE_QUERY_BOX or problem.dtype not in _core.SUPPORTED_DTYPES:  # the local call names a bad dtype
        return [False] * partition.world_size
    runs = []
    for r in range(partition.world_size):
        segment, own = extended_box(partition, window, r), partition.box(r)
        grid = [problem.batch, *(s.size for s in segment)]
        shapes = (grid + [problem.kv_heads, problem.dim], grid + [problem.kv_heads, problem.dim_v])
        boxed = _core.attention_problem(_segment_window(window, segment),
                                        [problem.batch, *(hi - lo for lo, hi in own), problem.heads, problem.dim],
                                        *shapes, query_box=own_queries(segment, own))
        whole = _core.attention_problem(_segment_window(window, segment), grid + [problem.heads, problem.dim],
                                        *shapes)
        boxed.dtype = whole.dtype = problem.dtype
        runs.append(all(_box_runs_on_the_same_backend(backend, boxed, whole, device, p)
                        for p in ((False, True) if backward else (False,))))
    return runs


def _box_runs_on_the_same_backend(backend, boxed, whole, device: str, backward: bool) -> bool:
    """Whether the backend that would run the whole segment's forward (with backward,
    its backward; the named backend, or auto's choice) runs its query sub-box too: auto
    would otherwise pass the box to a slower backend (naive, where fused refuses a
    box: its backward on a periodic axis the box splits), costing more than the halo
    queries it saves, and a named backend would refuse it."""
    if backend is not None:
        return not _nbhd.can_run(_core.backend_name(backend), boxed, device, backward)
    for b in _nbhd.built_backends():
        if b["device"] == device and b["fused_ops"] and not _nbhd.can_run(b["name"], whole, device, backward):
            return not _nbhd.can_run(b["name"], boxed, device, backward)
    return False


def _spatial(group, partition, window, query, key, value, rpb, ak, av, scale, backend, own_queries_only):
    """Halo exchange, then the ordinary call on this rank's extended segment (its own
    tokens and the key/value rows its queries' windows reach). With own_queries_only,
    for this rank's own queries only (a query sub-box of the segment); else for the
    whole segment, keeping its own queries: the segment's other query rows are zeros,
    their outputs are dropped and, with no gradient flowing into them, they add nothing
    to any gradient."""
    me = group.rank
    boxes = [extended_box(partition, window, r) for r in range(partition.world_size)]
    box, own = boxes[me], partition.box(me)
    routes = [Route(b.source, b.target, (_whole(b.source_box),) * 2, (_whole(b.target_box),) * 2)
              for b in halo_blocks(partition, boxes) if me in (b.source, b.target)]
    extended = [query.shape[0], *(s.size for s in box)]
    local, mine = _segment_window(window, box), own_queries(box, own)
    shapes = [extended + list(key.shape[-2:]), extended + list(value.shape[-2:])]
    step = "halo exchange of key and value rows"
    inner = interior_box(partition, window, me) if own_queries_only else None
    # With no border (a causal axis's first shard reaches no halo), the transfer's
    # outputs would feed no call: its backward, which returns the peers' dK, dV halo,
    # would never run on this rank while the peers wait for it. One call then.
    if inner is not None and inner != tuple(own):
        return _overlapped(group, routes, shapes, step, box, own, inner, local, query, key, value, rpb, ak, av,
                           scale, backend)
    key, value = transfer(group, routes, shapes, step, key, value)
    if own_queries_only:
        return _local(query, key, value, local, rpb, ak, av, scale, backend, query_box=mine)
    query = F.pad(query, _segment_pads(box, own))
    out, lse = _local(query, key, value, local, rpb, ak, av, scale, backend)
    index = _core.box_index(mine)
    return out[index].contiguous(), lse[index].contiguous()


def _segment_pads(box, own) -> list:
    """F.pad's list that places a [B, own..., heads, dim] tensor in its segment: (before,
    after) from the last dimension back (dim, heads, then the grid axes)."""
    pads = [0, 0, 0, 0]
    for s, (lo, hi) in reversed(list(zip(box, own))):
        pads += [lo - s.start, s.stop - hi]
    return pads


def _overlapped(group, routes, shapes, step, box, own, inner, local, query, key, value, rpb, ak, av, scale, backend):
    """The spatial path with the halo exchange under the interior's computation: the
    messages are posted, the interior queries (whose windows hold only own tokens) run
    on the own rows zero-padded to the segment, then, once the halo is in, the border
    queries run as the boxes own minus interior (two slabs per axis, outermost axis
    first), and the pieces are concatenated back into the own box. The same local
    problem every time, so the windows are those of the single call."""
    posted = start_transfer(group, routes, shapes, step, key, value)
    pads = _segment_pads(box, own)
    interior = _piece(query, F.pad(key, pads), F.pad(value, pads), inner, box, own, local, rpb, ak, av, scale,
                      backend)
    key, value = transfer(group, routes, shapes, step, key, value, posted=posted)

    def assemble(axis, current):
        if axis == len(own):
            return interior
        (lo, hi), (ilo, ihi) = current[axis], inner[axis]
        parts = []
        if lo < ilo:
            parts.append(_piece(query, key, value, current[:axis] + ((lo, ilo),) + current[axis + 1:], box, own,
                                local, rpb, ak, av, scale, backend))
        parts.append(assemble(axis + 1, current[:axis] + ((ilo, ihi),) + current[axis + 1:]))
        if ihi < hi:
            parts.append(_piece(query, key, value, current[:axis] + ((ihi, hi),) + current[axis + 1:], box, own,
                                local, rpb, ak, av, scale, backend))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts], dim=1 + axis), torch.cat([p[1] for p in parts], dim=1 + axis)

    return assemble(0, tuple(own))


def _piece(query, key, value, piece, box, own, local, rpb, ak, av, scale, backend):
    """(out, lse) of the own queries in `piece` ((lo, hi) per axis, global) on the
    segment's keys."""
    rows = (slice(None), *(slice(lo - o_lo, hi - o_lo) for (lo, hi), (o_lo, _) in zip(piece, own)))
    return _local(query[rows], key, value, local, rpb, ak, av, scale, backend, query_box=own_queries(box, piece))


def _heads(group, partition, window, query, key, value, rpb, ak, av, scale, backend, return_lse):
    """Head parallel: an all-to-all gives each rank the whole grid for its share of the
    heads (rank c takes query heads c*H/P.. and the kv heads they read), the ordinary
    call runs there, and a second all-to-all brings each rank its tokens' outputs."""
    me, p = group.rank, group.size
    heads, kv_heads = query.shape[-2] // p, key.shape[-2] // p

    def share(n, r):
        return slice(r * n, (r + 1) * n)

    blocks = [b for b in head_blocks(partition) if me in (b.source, b.target)]
    to_heads = [Route(b.source, b.target,
                      tuple((slice(None), *b.source_box, share(n, b.target), slice(None)) for n in (heads, kv_heads,
                                                                                                     kv_heads)),
                      (_whole(b.target_box),) * 3) for b in blocks]
    grid = [query.shape[0], *partition.grid]
    query, key, value = transfer(group, to_heads, [grid + [heads, query.shape[-1]], grid + [kv_heads, key.shape[-1]],
                                                   grid + [kv_heads, value.shape[-1]]],
                                 "all-to-all of query, key and value to heads", query, key, value)
    rpb = None if rpb is None else rpb[share(heads, me)]
    ak = None if ak is None else ak[:, :, share(kv_heads, me)]
    av = None if av is None else av[:, :, share(kv_heads, me)]
    out, lse = _local(query, key, value, window, rpb, ak, av, scale, backend)
    own = [query.shape[0], *(hi - lo for lo, hi in partition.box(me)), heads * p]

    def back(trailing):
        # Rank t holds heads share t of every token: the tokens of rank s go back to s.
        return [Route(b.target, b.source, ((slice(None), *b.target_box, *trailing(None)),),
                      ((slice(None), *b.source_box, *trailing(b.target)),)) for b in blocks]

    out = transfer(group, back(lambda t: (slice(None) if t is None else share(heads, t), slice(None))),
                   [own + [out.shape[-1]]], "all-to-all of the output back to tokens", out)[0]
    if not return_lse:
        return out, None
    lse = transfer(group, back(lambda t: (slice(None) if t is None else share(heads, t),)), [own],
                   "all-to-all of lse back to tokens", lse)[0]
    return out, lse
