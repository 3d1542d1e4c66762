# SPDX-License-Identifier: Apache-2.0
"""nbhd.distributed on gloo: 2 and 4 processes on this machine (spawned once per group
size, every case of that size run in the one group), each rank's forward and backward
against the single-process call on the whole grid: out, lse, dq, dk, dv of its shard and
the summed gradients of rpb and the additional tokens. Float64 (tight) except one
float32 case under the repo's tolerance rule. On the CPU spatial mode computes only each
rank's queries (a query sub-box); a few cases force the recompute path of the GPU
backends (nbhd.distributed._USE_QUERY_BOX = False), and every spatial case checks which
path ran. Also: the halo segments against the dense reference's windows (no processes),
the plan, refusals raised on every rank, and a missing peer that gives an error naming
the rank and the step instead of a hang."""

import datetime
import functools
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple, Tuple
from unittest import mock

import numpy as np
import pytest

from dense_reference import Case, axis_entries, random_case

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
import nbhd  # noqa: E402
import nbhd.distributed  # noqa: E402
from nbhd.distributed import _layout  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
F64 = dict(rtol=1e-10, atol=1e-12)
STEP_TIMEOUT = datetime.timedelta(seconds=60)


class Split(NamedTuple):
    """How a case's grid is cut: shard sizes per split axis, by mesh coordinate."""

    axes: Tuple[int, ...]
    sizes: Tuple[Tuple[int, ...], ...]
    mode: str = "spatial"

    @property
    def mesh(self):
        return tuple(len(s) for s in self.sizes)

    def box(self, rank, extent):
        """The rank's slices of the grid: coordinates row-major over the mesh."""
        coords = np.unravel_index(rank, self.mesh)
        box = [slice(0, n) for n in extent]
        for axis, sizes, c in zip(self.axes, self.sizes, coords):
            box[axis] = slice(sum(sizes[:c]), sum(sizes[:c + 1]))
        return tuple(box)


class DistCase(NamedTuple):
    label: str
    problem: Case
    split: Split
    dtype: str = "float64"
    recompute: bool = False  # spatial mode without the query sub-box


def _case(label, extent, kernel, split, dilation=None, stride=None, causal=None, periodic=(), dtype="float64", **kw):
    r = len(extent)
    problem = Case(tuple(extent), tuple(kernel), tuple(dilation or (1,) * r), tuple(stride or (1,) * r),
                   tuple(causal or (False,) * r), tuple(periodic), **kw)
    return DistCase(label, problem, split, dtype)


def _random_cases(world, seeds):
    """Seeded random problems (dense_reference.random_case) cut along a random axis
    long enough, in random uneven shards, in a random mode that can run them."""
    cases = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        for attempt in range(100):
            problem = random_case(seed * 100 + attempt, periodic=bool(rng.random() < 0.3))
            axes = [a for a, n in enumerate(problem.extent) if n >= world]
            if axes:
                break
        axis = int(rng.choice(axes))
        cuts = np.sort(rng.choice(np.arange(1, problem.extent[axis]), world - 1, replace=False))
        sizes = tuple(int(n) for n in np.diff([0, *cuts, problem.extent[axis]]))
        heads_ok = problem.heads % world == 0 and problem.kv_heads % world == 0
        mode = "heads" if heads_ok and rng.random() < 0.5 else "spatial"
        cases.append(DistCase(f"random seed {seed}", problem, Split((axis,), (sizes,), mode)))
    return cases


CASES = {
    2: [
        _case("1d k5, even shards", (12,), (5,), Split((0,), ((6, 6),))),
        _case("1d dilation 2, stride 2, uneven", (13,), (3,), Split((0,), ((9, 4),)), dilation=(2,), stride=(2,)),
        _case("1d causal, kernel 4, stride 3, uneven", (14,), (4,), Split((0,), ((5, 9),)), stride=(3,),
              causal=(True,), rpb=True),
        _case("1d periodic, wraps to the other rank", (12,), (5,), Split((0,), ((6, 6),)), dilation=(2,),
              stride=(2,), periodic=(True,), rpb=True),
        _case("1d periodic, length not a multiple of stride*dilation: whole axis", (13,), (3,),
              Split((0,), ((7, 6),)), dilation=(2,), stride=(2,), periodic=(True,), rpb=True),
        _case("1d shard thinner than the window's reach", (11,), (9,), Split((0,), ((2, 9),)), heads=2),
        _case("2d split rows: rpb, GQA, Dv != D, additional tokens, causal rows", (7, 9), (3, 5),
              Split((0,), ((3, 4),)), dilation=(2, 1), stride=(1, 3), causal=(True, False), heads=4, kv_heads=2,
              dim=5, dim_v=3, rpb=True, additional=3),
        _case("2d split the periodic axis, rpb", (6, 12), (3, 5), Split((1,), ((5, 7),)), dilation=(1, 2),
              periodic=(False, True), heads=2, rpb=True),
        _case("3d split axis 0: per-axis kernel, dilation, stride, causal", (6, 5, 6), (3, 2, 3),
              Split((0,), ((4, 2),)), dilation=(1, 2, 2), stride=(2, 1, 3), causal=(False, True, False), heads=2,
              rpb=True, additional=2, batch=2),
        _case("2d head parallel: GQA, rpb, additional tokens, periodic", (6, 7), (3, 3),
              Split((1,), ((3, 4),), "heads"), periodic=(True, False), heads=4, kv_heads=2, rpb=True, additional=2),
        _case("3d head parallel, causal axis", (4, 5, 6), (3, 3, 3), Split((2,), ((2, 4),), "heads"),
              causal=(True, False, False), heads=2, kv_heads=2, dim_v=3),
        _case("2d auto mode", (8, 8), (3, 3), Split((0,), ((4, 4),), "auto"), heads=2, kv_heads=2, rpb=True),
        _case("2d float32 (the repo's tolerance rule)", (8, 9), (5, 3), Split((0,), ((3, 5),)), dilation=(1, 2),
              heads=2, rpb=True, additional=2, dtype="float32"),
    ] + _random_cases(2, range(6)),
    4: [
        _case("1d thin shards: windows reach over several ranks", (10,), (7,), Split((0,), ((1, 2, 5, 2),)),
              rpb=True),
        _case("1d periodic, wraps to the opposite end", (16,), (7,), Split((0,), ((4, 4, 4, 4),)),
              periodic=(True,), rpb=True, additional=1),
        _case("2d 2x2 mesh, uneven: causal rows, periodic columns, rpb", (7, 8), (3, 3),
              Split((0, 1), ((3, 4), (5, 3))), causal=(True, False), periodic=(False, True), stride=(1, 2),
              heads=2, rpb=True),
        _case("3d 2x2 mesh over axes 0 and 2: GQA, additional tokens, dilation", (5, 4, 7), (3, 3, 3),
              Split((0, 2), ((2, 3), (4, 3))), dilation=(1, 1, 2), heads=4, kv_heads=2, additional=2, rpb=True),
        _case("2d dilation 3 split in 4 along columns", (5, 13), (3, 3), Split((1,), ((3, 4, 3, 3),)),
              dilation=(1, 3), stride=(1, 2), rpb=True),
        _case("2d head parallel on a 2x2 mesh", (6, 6), (3, 5), Split((0, 1), ((3, 3), (2, 4)), "heads"), heads=4,
              kv_heads=4, rpb=True, additional=1),
    ] + _random_cases(4, range(10, 14)),
}


def _recomputed(world, *labels):
    """The cases of `labels` again, on the recompute path."""
    return [c._replace(label=f"{c.label} (recompute)", recompute=True) for c in CASES[world]
            if c.label.startswith(labels)]


CASES[2] += _recomputed(2, "1d causal", "1d periodic, length not a multiple", "2d split rows", "3d split axis 0",
                        "2d float32")
CASES[4] += _recomputed(4, "1d thin shards", "2d 2x2 mesh")


# ----------------------------------------------------------------- worker side

def _tensors(case: DistCase):
    dtype = getattr(torch, case.dtype)
    return [None if a is None else torch.from_numpy(a).to(dtype) for a in case.problem.arrays()]


def _attend(fn, case, q, k, v, rpb, ak, av, **extra):
    return fn(q, k, v, scale=case.problem.scale, rpb=rpb, additional_keys=ak, additional_values=av,
              return_lse=True, **case.problem.window_kwargs(), **extra)


def _results(case, tensors, fn, box=None, **extra):
    """(out, lse, gradients of every input) of loss = <out, g_out> + <lse, g_lse>,
    with the seeded g over the whole grid (box: this rank's part of it)."""
    leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    out, lse = _attend(fn, case, *leaves, **extra)
    rng = torch.Generator().manual_seed(case.problem.seed + 7)
    g_out = torch.randn(case.problem.batch, *case.problem.extent, case.problem.heads, case.problem.dim_v,
                        generator=rng, dtype=torch.float64)
    g_lse = torch.randn(g_out.shape[:-1], generator=rng, dtype=torch.float64)
    if box is not None:
        g_out, g_lse = g_out[(slice(None), *box)], g_lse[(slice(None), *box)]
    ((out * g_out.to(out.dtype)).sum() + (lse * g_lse.to(lse.dtype)).sum()).backward()
    return [out.detach(), lse.detach()] + [None if t is None else t.grad for t in leaves]


NAMES = ["out", "lse", "d query", "d key", "d value", "d rpb", "d additional_keys", "d additional_values"]


def run_case(case: DistCase, rank: int, world: int, group=None):
    """rank: this process's rank in `group` (None: the default group)."""
    tensors = _tensors(case)
    box = case.split.box(rank, case.problem.extent)
    whole = _results(case, tensors, nbhd.neighborhood_attention)
    shard = [t[(slice(None), *box)] if i < 3 else t for i, t in enumerate(tensors)]
    sub_box = []  # per local call of spatial mode: whether it computed only this rank's queries
    local = nbhd.distributed._local

    def spy(*args, query_box=None):
        sub_box.append(query_box is not None)
        return local(*args, query_box=query_box)

    with mock.patch.object(nbhd.distributed, "_USE_QUERY_BOX", not case.recompute), \
            mock.patch.object(nbhd.distributed, "_local", spy):
        got = _results(case, shard, nbhd.distributed.neighborhood_attention, box, shard_axes=case.split.axes,
                       mesh_shape=case.split.mesh, mode=case.split.mode, group=group)
    if case.split.mode == "spatial":
        # One call on the segment, or, overlapped with the halo exchange, one for the
        # interior and one per border slab: all on sub-boxes, or one recomputing call.
        assert sub_box == [False] if case.recompute else (sub_box and all(sub_box)), sub_box
    # Per-token results compare on this rank's box; the replicated inputs' gradients whole.
    expected = [x if x is None or i >= 5 else x[(slice(None), *box)] for i, x in enumerate(whole)]
    if case.dtype == "float64":
        for name, e, g in zip(NAMES, expected, got):
            if e is not None:
                torch.testing.assert_close(g, e, **F64, msg=lambda m, name=name: f"{name}: {m}")
        return
    exact = [x if x is None or i >= 5 else x[(slice(None), *box)]
             for i, x in enumerate(_results(case, [None if t is None else t.double() for t in tensors],
                                            nbhd.neighborhood_attention))]
    for name, e, g, x in zip(NAMES, expected, got, exact):
        if e is not None:
            _assert_within_rule(name, g, e, x)


def _assert_within_rule(name, got, plain, exact):
    """The repo's rule (flash-attention's): error <= 2 * the error of the plain
    single-device call in the same precision + 2 * the rounding noise of the result."""
    exact = exact.double()
    noise = ((exact.to(got.dtype) + 0.3 - 0.3).double() - exact).abs().max().item()
    bound = 2 * (plain.double() - exact).abs().max().item() + 2 * noise
    err = (got.double() - exact).abs().max().item()
    assert err <= bound, f"{name}: max err {err:.3g} > bound {bound:.3g}"


def run_in_subgroups(rank: int, world: int):
    """Two groups of two ranks ({0, 1} and {2, 3}), each running its own problem: group
    ranks are not global ranks in the point-to-point messages."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    label = "2d split rows" if rank < 2 else "2d head parallel"
    case = next(c for c in CASES[2] if c.label.startswith(label))
    run_case(case, rank % 2, 2, group=groups[rank // 2])


def run_layer(rank: int, world: int):
    """The 2-D layer on its rank's rows equals the layer on the whole input; gradients of
    its parameters summed over the group equal the whole input's."""
    torch.manual_seed(3)
    whole_layer = nbhd.nn.NeighborhoodAttention2D(8, 2, kernel_size=(3, 5), dilation=(2, 1), rel_pos_bias=True)
    layer = nbhd.nn.NeighborhoodAttention2D(8, 2, kernel_size=(3, 5), dilation=(2, 1), rel_pos_bias=True,
                                            shard_axes=0)
    layer.load_state_dict(whole_layer.state_dict())
    x = torch.randn(2, 9, 7, 8, dtype=torch.float32, generator=torch.Generator().manual_seed(4))
    rows = slice(0, 5) if rank == 0 else slice(5, 9)
    y = whole_layer(x)
    y.square().sum().backward()
    y_shard = layer(x[:, rows])
    y_shard.square().sum().backward()
    torch.testing.assert_close(y_shard, y[:, rows], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(layer.named_parameters(), whole_layer.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


REFUSALS = [
    # (label, per-rank call given rank, words every rank's error must hold)
    ("bad tiling on an axis that is not split",
     lambda r: dict(shape=(1, 6, 5 if r == 0 else 4, 2, 3), shard_axes=0),
     ["do not tile", "axis 1", "rank 1", "4", "5"]),
    ("uneven shards at the same mesh coordinate",
     lambda r: dict(shape=(1, 3 + r, 4, 1, 3), shard_axes=(0, 1), mesh_shape=(1, 2)),
     ["do not tile", "axis 0", "rank 1", "3", "4"]),
    ("mismatched heads", lambda r: dict(shape=(1, 6, 2 + r, 3)), ["rank 1", "query heads", "3", "2"]),
    ("mismatched dtypes", lambda r: dict(shape=(1, 6, 2, 3), dtype=torch.float32 if r else torch.float64),
     ["rank 1", "dtype", "float32", "float64"]),
    ("mismatched kernel", lambda r: dict(shape=(1, 6, 2, 3), kernel_size=3 + 2 * r), ["rank 1", "window", "5", "3"]),
    ("mesh larger than the group", lambda r: dict(shape=(1, 6, 2, 3), mesh_shape=(3,)), ["mesh_shape", "3", "2"]),
    ("a refusal on one rank stops all", lambda r: dict(shape=(1, 6, 2, 3), kernel_size="3" if r else 3),
     ["rank 1", "kernel_size"]),
    ("global window longer than the grid", lambda r: dict(shape=(1, 3, 2, 3), kernel_size=7),
     ["kernel_size", "7", "6"]),
    ("head parallel with heads not divisible", lambda r: dict(shape=(1, 4, 3, 2), mode="heads"),
     ["mode='heads'", "heads (3)", "2 ranks"]),
]


def run_refusal(rank, make, words):
    args = make(rank)
    shape = args.pop("shape")
    x = torch.zeros(shape, dtype=args.pop("dtype", torch.float64))
    kernel = args.pop("kernel_size", 3)
    with pytest.raises((ValueError, TypeError)) as info:
        nbhd.distributed.neighborhood_attention(x, x, x, kernel, **args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=STEP_TIMEOUT)
    jobs = [(c.label, functools.partial(run_case, c)) for c in CASES[world]]
    described = {c.label: f"{c.problem}, split {c.split}, {c.dtype}" for c in CASES[world]}
    if world == 4:
        jobs.append(("subgroups", run_in_subgroups))
    if world == 2:
        jobs.append(("layer", run_layer))
        jobs += [(label, lambda r, w, make=make, words=words: run_refusal(r, make, words))
                 for label, make, words in REFUSALS]
    results = {}
    for label, job in jobs:
        try:
            job(rank, world)
            results[label] = None
        except Exception:
            results[label] = f"{described.get(label, label)}\n{traceback.format_exc()}"
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    # Every rank done before any tears its connections down, and no C++ static
    # destructors at exit: rank 0 hosts the group's TCPStore, whose thread, destroyed
    # at exit while a peer still held a connection, aborted the process now and then
    # (SIGABRT, "terminate called without an active exception"; 3 of ~25 runs).
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """world size -> every rank's {case label: None or its failure}; one group each."""
    done = {}

    def of(world):
        if world not in done:
            out_dir = tmp_path_factory.mktemp(f"ranks{world}")
            torch.multiprocessing.spawn(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world)
            done[world] = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
        return done[world]

    return of


def _check(results, world, label):
    failures = [f"rank {r}:\n{per_rank[label]}" for r, per_rank in enumerate(results(world)) if per_rank[label]]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("label", [c.label for c in CASES[2]])
def test_two_ranks_equal_one_process(results, label):
    _check(results, 2, label)


@pytest.mark.parametrize("label", [c.label for c in CASES[4]])
def test_four_ranks_equal_one_process(results, label):
    _check(results, 4, label)


def test_two_groups_of_two_ranks_side_by_side(results):
    _check(results, 4, "subgroups")


def test_layer_on_shards_equals_the_whole_layer(results):
    _check(results, 2, "layer")


@pytest.mark.parametrize("label", [r[0] for r in REFUSALS])
def test_refusals_are_raised_on_every_rank(results, label):
    _check(results, 2, label)


# ----------------------------------------------------------------- a missing peer

PEER_TIMEOUT_S = 3


def _absent_peer_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=STEP_TIMEOUT)
    # A short timeout for the call only: the processes may start seconds apart.
    group = dist.new_group(timeout=datetime.timedelta(seconds=PEER_TIMEOUT_S))
    if rank == 1:
        time.sleep(2 * PEER_TIMEOUT_S)  # never calls: rank 0 must give up on its own
        os._exit(0)
    x = torch.zeros(1, 4, 1, 2)
    start = time.monotonic()
    try:
        nbhd.distributed.na1d(x, x, x, 3, group=group)
        message = "no error"
    except RuntimeError as error:
        message = str(error)
    Path(out_dir, "absent.json").write_text(json.dumps({"message": message, "seconds": time.monotonic() - start}))
    os._exit(0)  # as _worker: no static destructors (the TCPStore's thread)


def test_a_missing_peer_gives_an_error_naming_rank_and_step(tmp_path):
    torch.multiprocessing.spawn(_absent_peer_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    result = json.loads((tmp_path / "absent.json").read_text())
    assert "rank 0 of 2" in result["message"] and "exchange of shard shapes" in result["message"], result
    assert result["seconds"] < 4 * PEER_TIMEOUT_S, result


# ----------------------------------------------------------------- no processes

@functools.lru_cache(maxsize=None)
def _entries(length, kernel, dilation, stride, causal, periodic):
    return axis_entries(length, kernel, dilation, stride, causal, periodic)


def test_extended_segments_reproduce_every_global_window():
    """Every axis up to length 9, every window the spec allows, every run of owned
    queries: on the segment, each owned query's neighbors (and their bias offsets) under
    the local problem are its global ones, by the dense reference's own windows."""
    checked = 0
    for length in range(1, 10):
        for kernel in range(1, length + 1):
            for dilation in range(1, length // kernel + 1):
                for stride in range(1, kernel + 1):
                    for causal, periodic in ((False, False), (True, False), (False, True)):
                        whole = _entries(length, kernel, dilation, stride, causal, periodic)
                        for lo in range(length):
                            for hi in range(lo + 1, length + 1):
                                seg = _layout.extended_segment(length, kernel, stride, dilation, causal, periodic,
                                                               lo, hi)
                                assert seg.size >= kernel * dilation and seg.start <= lo and hi <= seg.stop
                                local = _entries(seg.size, kernel, dilation, stride, causal, periodic and seg.whole)
                                token = np.arange(seg.start, seg.stop) % length
                                for i in range(lo, hi):
                                    e = i - seg.start
                                    want = {(u, whole[i, u] - i // dilation) for u in np.nonzero(whole[i] >= -length)[0]}
                                    got = {(token[x], local[e, x] - e // dilation)
                                           for x in np.nonzero(local[e] >= -seg.size)[0]}
                                    assert got == want, (length, kernel, dilation, stride, causal, periodic, lo, hi, i)
                                checked += 1
    assert checked > 10000


def test_halo_blocks_tile_each_segment_once():
    partition = _layout.Partition((10, 7), (0, 1), (2, 2), ((4, 6), (3, 4)))
    window = nbhd._core.make_window(2, (5, 3), 1, (1, 2), False, (False, True))
    boxes = [_layout.extended_box(partition, window, r) for r in range(4)]
    for target, box in enumerate(boxes):
        filled = np.zeros([s.size for s in box], dtype=int)
        for block in _layout.halo_blocks(partition, boxes):
            if block.target == target:
                filled[block.target_box] += 1
        assert (filled == 1).all(), target


def test_interior_is_what_needs_no_halo():
    # 24 tokens in two shards of 12, window 5: rank 0's queries 0..9 and rank 1's
    # 14..23 read only their own keys (query 10's window is 8..12).
    partition = _layout.Partition((24,), (0,), (2,), ((12, 12),))
    window = nbhd._core.make_window(1, 5)
    assert _layout.interior_box(partition, window, 0) == ((0, 10),)
    assert _layout.interior_box(partition, window, 1) == ((14, 24),)
    # Causal: rank 0 reaches no halo at all (its interior is its own box); dilation 2
    # interleaves the groups, and the interior is the longest run of queries that fit.
    causal = nbhd._core.make_window(1, 5, is_causal=True)
    assert _layout.interior_box(partition, causal, 0) == ((0, 12),)
    assert _layout.interior_box(partition, causal, 1) == ((16, 24),)
    dilated = nbhd._core.make_window(1, 3, dilation=2)
    for rank in range(2):
        (lo, hi), = _layout.interior_box(partition, dilated, rank)
        _, first, last = nbhd._window.axis_windows(24, 3, 1, 2, False, False, np.arange(lo, hi))
        own = partition.box(rank)[0]
        assert (first >= own[0]).all() and (last < own[1]).all() and hi > lo
    # A shard thinner than the window: no interior.
    thin = _layout.Partition((24,), (0,), (3,), ((2, 20, 2),))
    assert _layout.interior_box(thin, window, 0) is None


def test_plan_explains_hunyuan_video():
    plan = nbhd.distributed.plan((30, 48, 80), (18, 24, 24), heads=24, dim=128, world_size=4, shard_axes=2)
    text = str(plan)
    assert plan.mode in ("spatial", "heads") and f"chooses {plan.mode}" in text
    # The middle ranks own 20 columns and need 12 + 11 more: 23 x 30 x 48 tokens of K and V (24 heads, 2 x 128, fp16).
    assert plan.spatial.bytes_in == 23 * 30 * 48 * 24 * 256 * 2
    # With fused built, the box runs there (own queries only); else the segment's 43 columns are computed.
    fused = any(b["name"] == "fused" for b in nbhd._nbhd.built_backends())
    assert plan.spatial.computed_tokens == (20 if fused else 43) * 30 * 48
    assert plan.spatial.owned_tokens == 20 * 30 * 48
    assert "MB" in text and "spatial" in text and "heads" in text
    assert ("own queries only, by a query sub-box" if fused else "recomputes the halo's queries") in text
    odd = nbhd.distributed.plan((30, 48, 80), (18, 24, 24), heads=6, kv_heads=3, dim=128, world_size=4,
                                shard_axes=2)
    assert odd.mode == "spatial" and odd.heads is None and "multiples" in str(odd)


def test_plan_counts_only_own_queries_where_the_backend_runs_a_query_box():
    plan = nbhd.distributed.plan((30, 48, 80), (18, 24, 24), heads=24, dim=128, dtype=torch.float32, world_size=4,
                                 shard_axes=2, device="cpu")
    assert plan.spatial.computed_tokens == plan.spatial.owned_tokens == 20 * 30 * 48
    assert "own queries only, by a query sub-box" in str(plan) and "(1.00x)" in str(plan)
    with mock.patch.object(nbhd.distributed, "_USE_QUERY_BOX", False):
        recompute = nbhd.distributed.plan((30, 48, 80), (18, 24, 24), heads=24, dim=128, dtype=torch.float32,
                                          world_size=4, shard_axes=2, device="cpu")
    assert recompute.spatial.computed_tokens == 43 * 30 * 48
    assert recompute.spatial.seconds > plan.spatial.seconds


def test_a_query_box_is_used_only_on_the_backend_that_runs_the_whole_segment():
    # A backend (here fused, auto's choice) that runs a box's forward but not its
    # backward (as fused did, and gemm does): auto must not trade fused's whole segment
    # for naive's box, and a box used for training must run backward on the same
    # backend too.
    backends = [{"name": "fused", "device": "cuda", "fused_ops": True},
                {"name": "naive", "device": "cuda", "fused_ops": True},
                {"name": "cpu", "device": "cpu", "fused_ops": True}]
    box, whole = object(), object()

    def can_run(name, problem, device, backward=False):
        runs = {("fused", whole), ("naive", whole), ("naive", box), ("cpu", whole), ("cpu", box)}
        return "" if (name, problem) in runs or (name, problem, backward) == ("fused", box, False) else "no"

    same = nbhd.distributed._box_runs_on_the_same_backend
    with mock.patch.object(nbhd._nbhd, "built_backends", lambda: backends), \
            mock.patch.object(nbhd._nbhd, "can_run", can_run):
        assert same(None, box, whole, "cuda", False) and not same(None, box, whole, "cuda", True)
        assert same("fused", box, whole, "cuda", False) and not same("fused", box, whole, "cuda", True)
        assert same("naive", box, whole, "cuda", True)
        assert same(None, box, whole, "cpu", True)


def test_the_plan_for_inference_and_for_training_ask_different_passes():
    # The same problem on a backend that runs the box's forward only: inference
    # computes own queries only, training recomputes the halo's queries.
    calls = []

    def can_run(name, problem, device, backward=False):
        calls.append(backward)
        return "no" if backward and problem.has_query_box() else ""

    with mock.patch.object(nbhd._nbhd, "can_run", can_run):
        kwargs = dict(heads=4, dim=32, dtype=torch.float32, world_size=2, shard_axes=0, device="cpu", backend="cpu")
        inference = nbhd.distributed.plan((64,), 7, backward=False, **kwargs)
        training = nbhd.distributed.plan((64,), 7, **kwargs)
    assert inference.spatial.computed_tokens == inference.spatial.owned_tokens == 32
    assert training.spatial.computed_tokens > training.spatial.owned_tokens
    assert True in calls


def test_plan_counts_the_interior_computed_under_the_exchange():
    # 80 columns per rank, a 24-column window: a middle rank's columns 12..68 (57 of
    # 80) read no halo and run while it travels; the estimate hides the exchange.
    plan = nbhd.distributed.plan((30, 48, 320), (18, 24, 24), heads=24, dim=128, dtype=torch.float32, world_size=4,
                                 shard_axes=2, device="cpu")
    assert plan.spatial.overlapped_tokens in (30 * 48 * 57, 30 * 48 * 69)  # a middle or a border rank (0..68)
    assert "of them while the halo travels" in str(plan)
    # 20 columns per rank: no query's window fits in its shard, nothing overlaps.
    thin = nbhd.distributed.plan((30, 48, 80), (18, 24, 24), heads=24, dim=128, dtype=torch.float32, world_size=4,
                                 shard_axes=2, device="cpu")
    assert thin.spatial.overlapped_tokens == 0 and "while the halo travels" not in str(thin)


def test_plan_refuses_a_bad_partition():
    with pytest.raises(ValueError, match="shard_sizes"):
        nbhd.distributed.plan((10,), 3, heads=2, dim=4, world_size=2, shard_sizes=[(4, 5)])
    with pytest.raises(ValueError, match="mesh_shape"):
        nbhd.distributed.plan((10, 10), 3, heads=2, dim=4, world_size=2, shard_axes=(0, 1))


def test_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    x = torch.zeros(1, 4, 1, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        nbhd.distributed.na1d(x, x, x, 3)


def test_bench_smoke_runs_on_the_cpu(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "distributed.py"), "--device", "cpu",
                             "--world-sizes", "2", "--grid", "6x8", "--kernel", "3x3", "--heads", "2", "--dim", "8",
                             "--iterations", "2", "--json", str(tmp_path / "bench.json")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["mode"] for r in rows} >= {"spatial", "heads"}
    assert all(r["ms"] > 0 and r["bytes_in"] >= 0 for r in rows)
