# SPDX-License-Identifier: Apache-2.0
"""The partition of a token grid over ranks and what each rank needs from the others:
pure arithmetic on shapes (numpy, no torch.distributed), so that every rank computes
the same answer from the same gathered shapes and tests can check it without processes.

Rank layout: a rank's mesh coordinates are its rank in the group unravelled row-major
over mesh_shape (the last split axis varies fastest); coordinate c along split axis
shard_axes[i] owns the c-th run of that axis's shard sizes."""

from __future__ import annotations

import itertools
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .._core import Window
from .._window import axis_windows


class Segment(NamedTuple):
    """A run of tokens on one axis that a rank's local problem covers, [start, stop) in
    unwrapped token indices (start < 0 or stop > length only on a periodic axis: token
    t stands for t mod length). whole: the segment is the whole axis, and the local
    problem keeps the axis periodic if it is."""

    start: int
    stop: int
    whole: bool

    @property
    def size(self) -> int:
        return self.stop - self.start


def extended_segment(length: int, kernel: int, stride: int, dilation: int, causal: bool, periodic: bool,
                     lo: int, hi: int) -> Segment:
    """The run of tokens on which the ordinary single-device problem gives the queries
    [lo, hi) exactly their global windows: the union of their windows and leaders, its
    start aligned down to a multiple of stride * dilation (so that dilation groups and
    stride groups of the run are the global ones, shifted), at least kernel * dilation
    long (the local problem must be valid). A window shifted inward at a global border
    stays shifted: it touches the border, so the run ends there too. A periodic axis
    whose length is not a multiple of stride * dilation would change groups where the
    run wraps: there, and where the run would reach all the way round, the segment is
    the whole axis."""
    if lo == 0 and hi == length:
        return Segment(0, length, True)
    leader, first, last = axis_windows(length, kernel, stride, dilation, causal, periodic, np.arange(lo, hi))
    step = stride * dilation
    if periodic and length % step:
        return Segment(0, length, True)
    start = min(lo, int(first.min())) // step * step
    stop = max(hi, int(last.max()) + 1, int(leader.max()) + 1)
    reach = kernel * dilation
    if periodic:
        stop = max(stop, start + reach)
        if stop - start >= length:
            return Segment(0, length, True)
        return Segment(start, stop, False)
    stop = min(stop, length)
    if stop - start < reach:
        stop = min(length, start + reach)
        start = min(start, (stop - reach) // step * step)
    return Segment(start, stop, start == 0 and stop == length)


def own_queries(segment: Sequence[Segment], own: Sequence[Tuple[int, int]]) -> Tuple[Tuple[int, int], ...]:
    """A rank's own tokens `own` ((lo, hi) per axis) as a query box of its segment:
    (begin, end) per axis."""
    return tuple((lo - s.start, hi - s.start) for s, (lo, hi) in zip(segment, own))


def mesh_coords(rank: int, mesh_shape: Sequence[int]) -> Tuple[int, ...]:
    """The rank's coordinates on the mesh: its rank unravelled row-major."""
    return tuple(int(c) for c in np.unravel_index(rank, tuple(mesh_shape)))


class Partition(NamedTuple):
    """The global grid and how its split axes are cut: sizes[i] lists the shard sizes
    along grid axis shard_axes[i], by mesh coordinate."""

    grid: Tuple[int, ...]
    shard_axes: Tuple[int, ...]
    mesh_shape: Tuple[int, ...]
    sizes: Tuple[Tuple[int, ...], ...]

    @property
    def world_size(self) -> int:
        return math.prod(self.mesh_shape)

    def box(self, rank: int) -> Tuple[Tuple[int, int], ...]:
        """The rank's own tokens: (lo, hi) per grid axis."""
        bounds = [(0, n) for n in self.grid]
        for i, (axis, c) in enumerate(zip(self.shard_axes, mesh_coords(rank, self.mesh_shape))):
            lo = sum(self.sizes[i][:c])
            bounds[axis] = (lo, lo + self.sizes[i][c])
        return tuple(bounds)

    def tokens(self, rank: int) -> int:
        return math.prod(hi - lo for lo, hi in self.box(rank))


def even_sizes(length: int, parts: int) -> Tuple[int, ...]:
    """length cut into `parts` runs as even as can be, the longer ones first."""
    return tuple(length // parts + (c < length % parts) for c in range(parts))


def extended_box(partition: Partition, window: Window, rank: int) -> Tuple[Segment, ...]:
    """Per grid axis, the segment of the rank's local problem (see extended_segment)."""
    return tuple(extended_segment(n, *params, lo, hi) for n, params, (lo, hi) in
                 zip(partition.grid, zip(window.kernel_size, window.stride, window.dilation, window.is_causal,
                                         window.periodic), partition.box(rank)))


def interior_box(partition: Partition, window: Window, rank: int) -> Optional[Tuple[Tuple[int, int], ...]]:
    """The rank's interior: a box of its own queries whose windows hold only its own
    tokens, so that they can be computed before the halo arrives ((lo, hi) per grid
    axis, global), or None where some axis has none. Per axis, the longest run of own
    queries whose first and last keys are own (with dilation, the queries of one run
    may belong to different groups; any query left out goes with the border)."""
    box = []
    for n, params, (lo, hi), segment in zip(partition.grid, zip(window.kernel_size, window.stride, window.dilation,
                                                                  window.is_causal, window.periodic),
                                            partition.box(rank), extended_box(partition, window, rank)):
        if segment.whole and (lo, hi) == (0, n):
            box.append((lo, hi))
            continue
        _, first, last = axis_windows(n, *params, np.arange(lo, hi))
        inside = (first >= lo) & (last < hi)
        best, run_start = (0, 0), None
        for i, ok in enumerate(list(inside) + [False]):
            if ok and run_start is None:
                run_start = i
            elif not ok and run_start is not None:
                if i - run_start > best[1] - best[0]:
                    best = (run_start, i)
                run_start = None
        if best[1] == best[0]:
            return None
        box.append((lo + best[0], lo + best[1]))
    return tuple(box)


class Block(NamedTuple):
    """Tokens that move from `source` to `target`: a box given as slices per grid axis,
    in the source's own shard and in the target's buffer."""

    source: int
    target: int
    source_box: Tuple[slice, ...]
    target_box: Tuple[slice, ...]


def _axis_pieces(segment: Segment, lo: int, hi: int, length: int) -> List[Tuple[slice, slice]]:
    """Where the owner of tokens [lo, hi) fills the segment: (slice in the segment,
    slice in the owner's shard) per contiguous piece. An unwrapped segment is shorter
    than the axis and begins less than one length early, so one period either side
    covers it."""
    pieces = []
    for shift in (-length, 0, length):
        a, b = max(segment.start, lo + shift), min(segment.stop, hi + shift)
        if a < b:
            pieces.append((slice(a - segment.start, b - segment.start), slice(a - shift - lo, b - shift - lo)))
    return pieces


def halo_blocks(partition: Partition, boxes: Sequence[Tuple[Segment, ...]]) -> List[Block]:
    """Every block of the halo exchange (and each rank's own tokens, source == target):
    target rank t's buffer over boxes[t] filled from the ranks that own its tokens."""
    blocks = []
    for target, box in enumerate(boxes):
        for source in range(partition.world_size):
            per_axis = [_axis_pieces(seg, lo, hi, n)
                        for seg, (lo, hi), n in zip(box, partition.box(source), partition.grid)]
            for pieces in itertools.product(*per_axis):
                blocks.append(Block(source, target, tuple(p[1] for p in pieces), tuple(p[0] for p in pieces)))
    return blocks


def head_blocks(partition: Partition) -> List[Block]:
    """Every block of the all-to-all of head-parallel mode, tokens to heads: each rank's
    whole shard goes to every rank, into the shard's place on the global grid (the
    heads each target takes are chosen by the caller)."""
    blocks = []
    for source in range(partition.world_size):
        own = tuple(slice(lo, hi) for lo, hi in partition.box(source))
        whole = tuple(slice(0, hi - lo) for lo, hi in partition.box(source))
        blocks += [Block(source, target, whole, own) for target in range(partition.world_size)]
    return blocks


def volume(box: Sequence[slice]) -> int:
    return math.prod(s.stop - s.start for s in box)


# ----------------------------------------------------------------- choosing a mode

class Problem(NamedTuple):
    """What the cost of a mode depends on besides the partition and the window."""

    batch: int
    heads: int
    kv_heads: int
    dim: int
    dim_v: int
    element_size: int  # bytes per element of q, k, v
    dtype: str         # their dtype's name ("float16", ...)


class Cost(NamedTuple):
    """One mode's forward on the busiest rank: bytes it receives and sends, the query
    tokens it computes against the ones it owns (of them, the interior computed while
    the halo travels), and an estimated time."""

    bytes_in: int
    bytes_out: int
    computed_tokens: int
    owned_tokens: int
    seconds: float
    note: str
    overlapped_tokens: int = 0


def _pair_flops(problem: Problem, window: Window) -> int:
    # Per query token, all heads: a score (2 D flops) and a weighted value (2 Dv) per
    # window key; the spec's count for D == Dv is 4 D per pair.
    return problem.batch * problem.heads * window.window_size * 2 * (problem.dim + problem.dim_v)


def spatial_cost(partition: Partition, window: Window, problem: Problem, link_bytes_per_s: float,
                 flop_per_s: float, own_queries_only: Sequence[bool]) -> Cost:
    """own_queries_only[r]: rank r computes only its own queries (a query sub-box of its
    segment); else it computes the whole segment's and drops the halo's."""
    boxes = [extended_box(partition, window, r) for r in range(partition.world_size)]
    per_token = problem.batch * problem.kv_heads * (problem.dim + problem.dim_v) * problem.element_size
    ranks = range(partition.world_size)
    bytes_in, bytes_out = [0] * len(ranks), [0] * len(ranks)
    for block in halo_blocks(partition, boxes):
        if block.source != block.target:
            bytes_in[block.target] += volume(block.target_box) * per_token
            bytes_out[block.source] += volume(block.source_box) * per_token
    computed = [partition.tokens(r) if own_queries_only[r] else math.prod(s.size for s in box)
                for r, box in enumerate(boxes)]
    overlapped = [_overlapped_tokens(partition, window, r) if own_queries_only[r] else 0 for r in ranks]
    per_query = _pair_flops(problem, window) / flop_per_s
    # The interior's compute hides the exchange (or the other way round); the border
    # waits for both.
    seconds = [max(max(bytes_in[r], bytes_out[r]) / link_bytes_per_s, overlapped[r] * per_query)
               + (computed[r] - overlapped[r]) * per_query for r in ranks]
    busiest = max(ranks, key=lambda r: seconds[r])
    whole = [a for a in range(len(partition.grid)) if a in partition.shard_axes
             and any(box[a].whole for box in boxes) and partition.world_size > 1]
    note = "the K, V halo; backward returns dK, dV: as many bytes"
    note += ("; own queries only, by a query sub-box" if own_queries_only[busiest] else
             "; recomputes the halo's queries, as the backend runs no query sub-box")
    if whole:
        note += f"; axis {', '.join(map(str, whole))} gathered whole by some rank"
    return Cost(max(bytes_in), max(bytes_out), computed[busiest], partition.tokens(busiest), seconds[busiest], note,
                overlapped[busiest])


def _overlapped_tokens(partition: Partition, window: Window, rank: int) -> int:
    """The own queries nbhd.distributed computes while the halo travels: the interior,
    where the rank has a border too (else it makes one call after the exchange)."""
    inner = interior_box(partition, window, rank)
    if inner is None or inner == partition.box(rank):
        return 0
    return math.prod(hi - lo for lo, hi in inner)


def heads_cost(partition: Partition, window: Window, problem: Problem, link_bytes_per_s: float,
               flop_per_s: float) -> Cost:
    p = partition.world_size
    total = math.prod(partition.grid)
    b, e = problem.batch, problem.element_size
    qkv = b * (problem.heads * problem.dim + problem.kv_heads * (problem.dim + problem.dim_v)) * e
    out = b * problem.heads * problem.dim_v * e
    ranks = range(p)
    own = [partition.tokens(r) for r in ranks]
    # To heads: a rank keeps 1/p of its shard's heads and sends the rest; it receives
    # its heads of every other shard. Back: the reverse, for out.
    bytes_out = [own[r] * qkv * (p - 1) // p + (total - own[r]) * out // p for r in ranks]
    bytes_in = [(total - own[r]) * qkv // p + own[r] * out * (p - 1) // p for r in ranks]
    compute = total * _pair_flops(problem, window) / p / flop_per_s
    seconds = [max(bytes_in[r], bytes_out[r]) / link_bytes_per_s + compute for r in ranks]
    busiest = max(ranks, key=lambda r: seconds[r])
    return Cost(max(bytes_in), max(bytes_out), total // p, own[busiest], seconds[busiest],
                "q, k, v to heads, out back; backward: as many bytes")


class Plan:
    """How nbhd.distributed runs a problem over a group, and why: the cost of each mode
    on the busiest rank (bytes moved, query tokens computed, an estimated forward time
    at the given link bandwidth and compute rate) and the mode chosen (the faster
    estimate; spatial on a tie or when heads cannot split evenly). own_queries_only[r]:
    in spatial mode rank r computes only its own queries (else its whole segment's).
    str() explains it."""

    def __init__(self, partition: Partition, window: Window, problem: Problem, own_queries_only: Sequence[bool],
                 spatial: Cost, heads: Optional[Cost], heads_refusal: str, link_gbps: float, tflops: float):
        self.partition, self.window, self.problem = partition, window, problem
        self.own_queries_only = tuple(own_queries_only)
        self.spatial, self.heads, self.heads_refusal = spatial, heads, heads_refusal
        self.link_gbps, self.tflops = link_gbps, tflops
        self.mode = "heads" if heads is not None and heads.seconds < spatial.seconds else "spatial"

    def __repr__(self) -> str:
        return f"<nbhd.distributed.Plan mode={self.mode!r} world_size={self.partition.world_size}>"

    def __str__(self) -> str:
        part = self.partition
        grid = "x".join(map(str, part.grid))
        cuts = "; ".join(f"axis {a} into {'/'.join(map(str, s))}" for a, s in zip(part.shard_axes, part.sizes))
        lines = [f"nbhd.distributed plan: {part.world_size} ranks (mesh {'x'.join(map(str, part.mesh_shape))}), "
                 f"grid {grid} split along {cuts}",
                 _describe("spatial", self.spatial)]
        lines.append(_describe("heads", self.heads) if self.heads is not None else
                     f"  heads:   not possible: {self.heads_refusal}")
        if self.heads is None:
            lines.append("  chooses spatial")
        else:
            chosen, other = (self.heads, self.spatial) if self.mode == "heads" else (self.spatial, self.heads)
            lines.append(f"  chooses {self.mode}: est. {_ms(chosen.seconds)} against {_ms(other.seconds)} "
                         f"(at {self.link_gbps:g} GB/s per direction and {self.tflops:g} TFLOP/s)")
        return "\n".join(lines)


def _describe(name: str, cost: Cost) -> str:
    overlap = f", {cost.overlapped_tokens} of them while the halo travels" if cost.overlapped_tokens else ""
    return (f"  {name + ':':8} busiest rank receives {_bytes(cost.bytes_in)}, sends {_bytes(cost.bytes_out)} per forward "
            f"({cost.note}); computes {cost.computed_tokens} query tokens for its {cost.owned_tokens} "
            f"({cost.computed_tokens / cost.owned_tokens:.2f}x{overlap}); est. {_ms(cost.seconds)}")


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"


def make_plan(partition: Partition, window: Window, problem: Problem, own_queries_only: Sequence[bool],
              link_gbps: float = 450.0, tflops: float = 400.0) -> Plan:
    """own_queries_only: per rank, whether its local call computes only its own queries
    (see spatial_cost)."""
    link, rate = link_gbps * 1e9, tflops * 1e12
    spatial = spatial_cost(partition, window, problem, link, rate, own_queries_only)
    p = partition.world_size
    refusal = heads_refusal(problem.heads, problem.kv_heads, p)
    heads = None if refusal else heads_cost(partition, window, problem, link, rate)
    return Plan(partition, window, problem, own_queries_only, spatial, heads, refusal, link_gbps, tflops)


def heads_refusal(heads: int, kv_heads: int, world_size: int) -> str:
    """Why head-parallel mode cannot run, or '' when it can."""
    if heads % world_size or kv_heads % world_size:
        return (f"heads ({heads}) and kv_heads ({kv_heads}) must both be multiples of the group's "
                f"{world_size} ranks")
    return ""
