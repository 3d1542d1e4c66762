#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Weak and strong scaling of nbhd.distributed on the GPUs of one machine (NCCL, one
process per GPU, spawned here), or on the CPU with gloo (--device cpu: a smoke run).

    python bench/distributed.py                                   # HunyuanVideo 30x48x80, k 18x24x24, 1/2/4 GPUs
    python bench/distributed.py --scaling strong --world-sizes 2,4 --pass fwd+bwd
    python bench/distributed.py --device cpu --world-sizes 2 --grid 6x8 --kernel 3x3 --heads 2 --dim 8

For each world size P and scaling (weak: each rank keeps --grid, the split axis grows P
times; strong: the global grid is --grid) and each mode (spatial, heads), every rank
times --iterations steps after --warmup; a step's time is the slowest rank's, and the
median step is reported with:
  plain_ms     the single-device call on one rank's share of the work (weak: --grid;
               strong: --grid at P = 1), measured on rank 0 alone;
  compute_ms   the slowest rank's single-device call on the problem it actually runs
               (spatial: its extended segment, for its own queries where the backend
               runs a query sub-box (plan.own_queries_only), else for all; heads: the whole
               grid, H/P heads);
  exchange_ms  ms - compute_ms: communication, assembly and whatever did not overlap;
  bytes_in/out the busiest rank's bytes per forward (nbhd.distributed.plan; the backward
               moves as many again);
  efficiency   weak: plain_ms / ms; strong: plain_ms(P = 1) / (P * ms).
Rows go to stdout as a table and with --json to a file."""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import socket
import statistics
import sys
import tempfile
import time


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--world-sizes", default="1,2,4", help="comma-separated process counts")
    p.add_argument("--scaling", choices=("weak", "strong", "both"), default="weak")
    p.add_argument("--modes", default="spatial,heads")
    p.add_argument("--grid", default="30x48x80", help="per-rank grid (weak) or global grid (strong)")
    p.add_argument("--kernel", default="18x24x24")
    p.add_argument("--dilation", default="1")
    p.add_argument("--stride", default="1")
    p.add_argument("--causal", default="0")
    p.add_argument("--shard-axis", type=int, default=-1, help="grid axis split over the ranks")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--pass", dest="pass_", choices=("fwd", "fwd+bwd"), default="fwd")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    args.grid = tuple(int(x) for x in args.grid.split("x"))
    rank = len(args.grid)
    args.shard_axis %= rank

    def per_axis(text, kind=int):
        values = [kind(int(x)) for x in text.split("x")]
        return tuple(values * rank if len(values) == 1 else values)

    args.kernel, args.dilation, args.stride = per_axis(args.kernel), per_axis(args.dilation), per_axis(args.stride)
    args.causal = per_axis(args.causal, bool)
    args.world_sizes = [int(x) for x in args.world_sizes.split(",")]
    args.modes = args.modes.split(",")
    if args.device == "cpu" and args.dtype == "float16":
        args.dtype = "float32"  # the CPU backends' fast path
    return args


def global_grid(args, scaling, world):
    grid = list(args.grid)
    if scaling == "weak":
        grid[args.shard_axis] *= world
    return tuple(grid)


def window(args):
    return dict(kernel_size=args.kernel, dilation=args.dilation, stride=args.stride, is_causal=args.causal)


def median_step(fn, args, sync, group_max):
    """Median over iterations of the slowest rank's time of fn (ms)."""
    for _ in range(args.warmup):
        fn()
    sync()
    times = []
    for _ in range(args.iterations):
        group_max(None)  # a barrier: every rank starts the step together
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(group_max((time.perf_counter() - t0) * 1e3))
    return statistics.median(times)


def worker(rank, world, port, args, out_path):
    import torch
    import torch.distributed as dist

    import nbhd
    import nbhd.distributed
    from nbhd.distributed import _layout

    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        torch.set_num_threads(1)
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5), device_id=device if backend == "nccl" else None)
    dtype = getattr(torch, args.dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def this_rank(value):
        return 0.0 if value is None else value

    def group_max(value):
        t = torch.tensor([0.0 if value is None else value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def step(fn, *tensors):
        if args.pass_ == "fwd":
            def forward():
                with torch.no_grad():
                    fn(*tensors)
            return forward
        leaves = [t.detach().requires_grad_() for t in tensors]
        return lambda: fn(*leaves).float().sum().backward()

    def inputs(grid, heads):
        return [torch.randn(args.batch, *grid, heads, args.dim, dtype=dtype, device=device) for _ in range(3)]

    def plain(q, k, v, query_box=None):
        return nbhd.neighborhood_attention(q, k, v, query_box=query_box, **window(args))

    rows = []
    for scaling in (("weak", "strong") if args.scaling == "both" else (args.scaling,)):
        grid = global_grid(args, scaling, world)
        plan = nbhd.distributed.plan(grid, args.kernel, stride=args.stride, dilation=args.dilation,
                                     is_causal=args.causal, heads=args.heads, dim=args.dim, batch=args.batch,
                                     dtype=dtype, world_size=world, shard_axes=args.shard_axis, device=args.device)
        # The baseline: one rank's share of the work (weak) or the whole problem (strong) on one device.
        base = args.grid if scaling == "weak" else grid
        plain_ms = None
        if rank == 0:
            plain_ms = median_step(step(plain, *inputs(base, args.heads)), args, sync, this_rank)
        dist.barrier()
        box = plan.partition.box(rank)
        shard = inputs(tuple(hi - lo for lo, hi in box), args.heads)
        for mode in args.modes:
            if mode == "heads" and plan.heads is None:
                continue
            cost = plan.heads if mode == "heads" else plan.spatial
            query_box = None
            if mode == "heads":
                local = inputs(grid, args.heads // world)
            else:
                segment = _layout.extended_box(plan.partition, plan.window, rank)
                local = inputs(tuple(s.size for s in segment), args.heads)
                if plan.own_queries_only[rank]:
                    query_box = _layout.own_queries(segment, box)
                    local[0] = local[0][(slice(None), *(slice(b, e) for b, e in query_box))].contiguous()
            compute_ms = group_max(median_step(step(functools.partial(plain, query_box=query_box), *local), args,
                                               sync, this_rank))

            def distributed(q, k, v, mode=mode):
                return nbhd.distributed.neighborhood_attention(q, k, v, shard_axes=args.shard_axis, mode=mode,
                                                               **window(args))

            ms = median_step(step(distributed, *shard), args, sync, group_max)
            rows.append({"scaling": scaling, "world_size": world, "mode": mode, "pass": args.pass_,
                         "grid": list(grid), "ms": ms, "compute_ms": compute_ms, "exchange_ms": ms - compute_ms,
                         "plain_ms": plain_ms, "bytes_in": cost.bytes_in, "bytes_out": cost.bytes_out,
                         "computed_tokens": cost.computed_tokens, "owned_tokens": cost.owned_tokens,
                         "chosen_by_plan": plan.mode == mode})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without running C++ static destructors: rank 0 hosts the group's TCPStore,
    # whose thread, destroyed at exit while a peer still held a connection, aborted
    # the process now and then ("terminate called without an active exception").
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    args = parse(argv)
    import torch
    import torch.multiprocessing as mp

    if args.device == "cuda":
        available = torch.cuda.device_count()
        if max(args.world_sizes) > available:
            print(f"needs {max(args.world_sizes)} GPUs, this machine has {available}", file=sys.stderr)
            return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.world_sizes:
            out = os.path.join(tmp, f"rows{world}.json")
            mp.spawn(worker, args=(world, _free_port(), args, out), nprocs=world)
            with open(out) as f:
                rows += json.load(f)
    # plain_ms is one rank's share on one device (weak) or the whole problem on one device (strong).
    for r in rows:
        r["efficiency"] = r["plain_ms"] / (r["ms"] * (r["world_size"] if r["scaling"] == "strong" else 1))
    print(f"{'scaling':8} {'P':>2} {'mode':8} {'pass':8} {'grid':>12} {'ms':>9} {'compute':>9} {'exchange':>9} "
          f"{'plain':>9} {'MB in':>8} {'MB out':>8} {'eff':>6}")
    for r in rows:
        print(f"{r['scaling']:8} {r['world_size']:>2} {r['mode']:8} {r['pass']:8} {'x'.join(map(str, r['grid'])):>12} "
              f"{r['ms']:9.3f} {r['compute_ms']:9.3f} {r['exchange_ms']:9.3f} {r['plain_ms']:9.3f} "
              f"{r['bytes_in'] / 1e6:8.2f} {r['bytes_out'] / 1e6:8.2f} {r['efficiency']:6.1%}")
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump({"config": config, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
