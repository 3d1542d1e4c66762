# SPDX-License-Identifier: Apache-2.0
"""The communication of nbhd.distributed, on torch.distributed: a block transfer
(point-to-point, one message per pair of ranks) that autograd runs backwards, the sum
of replicated inputs' gradients, and the exchange of each rank's arguments. Every call
names its step, so a missing or failed peer gives an error that says where."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


class Group:
    """A process group and this process's place in it. Peers are named by their rank in
    the group; torch.distributed's point-to-point calls take global ranks."""

    def __init__(self, group):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("nbhd.distributed needs torch.distributed initialised: call "
                               "torch.distributed.init_process_group first")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)

    def global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)

    @contextlib.contextmanager
    def step(self, name: str):
        """Name the step in any communication error (a timeout, a closed connection)."""
        try:
            yield
        except RuntimeError as error:  # torch.distributed.DistError and its kinds are RuntimeErrors
            raise RuntimeError(f"nbhd.distributed: rank {self.rank} of {self.size} failed in step '{name}' (a peer "
                               f"is missing, failed, or was slower than the process group's timeout): {error}"
                               ) from error

    def all_gather_object(self, item, step: str) -> list:
        items = [None] * self.size
        with self.step(step):
            dist.all_gather_object(items, item, group=self.group)
        return items

    def sum(self, tensor: torch.Tensor, step: str) -> torch.Tensor:
        total = tensor.contiguous().clone()
        with self.step(step):
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total


class Route(NamedTuple):
    """Part of a transfer: source's tensor t at source_index[t] goes to target's
    buffer t at target_index[t] (index tuples; group ranks)."""

    source: int
    target: int
    source_index: Tuple[tuple, ...]
    target_index: Tuple[tuple, ...]


class _Exchange:
    """One posted exchange (_start): the messages in flight, this rank's own blocks
    already copied; finish() waits for the messages and places them."""

    def __init__(self, group: Group, ops: list, receives: dict, places: dict, step: str, accumulate: bool):
        self.group, self.ops, self.receives, self.places = group, ops, receives, places
        self.step, self.accumulate = step, accumulate

    def finish(self) -> None:
        with self.group.step(self.step):
            for work in self.ops:
                work.wait()
        for peer, buffer in self.receives.items():
            offset = 0
            for y, i in self.places[peer]:
                n = y[i].numel()
                _place(y, i, buffer[offset:offset + n].view(y[i].shape), self.accumulate)
                offset += n


def _start(group: Group, routes: Sequence[Route], inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
           step: str, accumulate: bool) -> _Exchange:
    """Start moving inputs[t][source_index] of this rank's routes as source into
    outputs[t][target_index] of their targets (added there when accumulate): one
    message per peer, packed in route order, which both sides know. The rank's routes
    to itself are copied while the messages travel."""
    me = group.rank
    pieces, places = defaultdict(list), defaultdict(list)
    for route in routes:
        if route.source == me:
            pieces[route.target] += [x[i] for x, i in zip(inputs, route.source_index)]
        if route.target == me:
            places[route.source] += [(y, i) for y, i in zip(outputs, route.target_index)]
    sends = {peer: torch.cat([p.reshape(-1) for p in parts]) for peer, parts in pieces.items() if peer != me}
    receives = {peer: outputs[0].new_empty(sum(y[i].numel() for y, i in where))
                for peer, where in places.items() if peer != me}
    sends = {peer: buffer for peer, buffer in sends.items() if buffer.numel()}
    receives = {peer: buffer for peer, buffer in receives.items() if buffer.numel()}
    # Post everything, then copy this rank's own blocks: on NCCL the copies run while
    # the messages move; on gloo the exchange is done by the time the wait returns.
    ops = _post(group, sends, receives, step)
    for (y, i), x in zip(places.get(me, []), pieces.get(me, [])):
        _place(y, i, x, accumulate)
    return _Exchange(group, ops, receives, places, step, accumulate)


def _send_and_receive(group: Group, routes: Sequence[Route], inputs: Sequence[torch.Tensor],
                      outputs: Sequence[torch.Tensor], step: str, accumulate: bool) -> None:
    _start(group, routes, inputs, outputs, step, accumulate).finish()


def _post(group: Group, sends: dict, receives: dict, step: str) -> list:
    ops = [dist.P2POp(dist.isend, buffer, group.global_rank(peer), group.group) for peer, buffer in sends.items()]
    ops += [dist.P2POp(dist.irecv, buffer, group.global_rank(peer), group.group)
            for peer, buffer in receives.items()]
    if not ops:
        return []
    with group.step(step):
        return dist.batch_isend_irecv(ops)


def _place(y: torch.Tensor, index: tuple, x: torch.Tensor, accumulate: bool) -> None:
    if accumulate:
        y[index] += x
    else:
        y[index] = x


class Transfer(torch.autograd.Function):
    """Tensors moved between ranks along routes into new buffers of out_shapes; the
    backward moves the buffers' gradients back along the same routes, summed where a
    token went to several ranks. All tensors of one transfer share a dtype. `posted`:
    the same transfer already started (start_transfer), to be finished here."""

    @staticmethod
    def forward(ctx, group: Group, routes: List[Route], out_shapes: List[tuple], step: str, posted, *inputs):
        ctx.group, ctx.routes, ctx.step = group, routes, step
        ctx.in_shapes = [x.shape for x in inputs]
        if posted is None:
            posted = start_transfer(group, routes, out_shapes, step, *inputs)
        posted.exchange.finish()
        return tuple(posted.outputs)

    @staticmethod
    def backward(ctx, *grads):
        reverse = [Route(r.target, r.source, r.target_index, r.source_index) for r in ctx.routes]
        grads = [g.contiguous() for g in grads]
        inputs = [grads[0].new_zeros(shape) for shape in ctx.in_shapes]
        _send_and_receive(ctx.group, reverse, grads, inputs, f"{ctx.step} (backward)", accumulate=True)
        return (None, None, None, None, None, *inputs)


class PostedTransfer(NamedTuple):
    outputs: List[torch.Tensor]
    exchange: _Exchange


def start_transfer(group: Group, routes: List[Route], out_shapes: List[tuple], step: str, *inputs) -> PostedTransfer:
    """The forward messages of transfer(...) posted now, to overlap them with work that
    does not need them; transfer(..., posted=) finishes them (and is what autograd sees)."""
    inputs = [x.detach() for x in inputs]
    outputs = [inputs[0].new_empty(shape) for shape in out_shapes]
    return PostedTransfer(outputs, _start(group, routes, inputs, outputs, f"{step} (forward)", accumulate=False))


def transfer(group: Group, routes: List[Route], out_shapes: List[tuple], step: str, *inputs,
             posted: Optional[PostedTransfer] = None) -> tuple:
    return Transfer.apply(group, routes, out_shapes, step, posted, *inputs)


class SummedGradient(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group, so a replicated
    input (rpb, additional tokens) gets the gradient of the sum of every rank's loss."""

    @staticmethod
    def forward(ctx, group: Group, step: str, x):
        ctx.group, ctx.step = group, step
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return None, None, ctx.group.sum(grad, f"{ctx.step} (backward)")
