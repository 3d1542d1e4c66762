#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""A NAT / DiNAT image classifier built from nbhd.nn layers, timed for inference and for
a training step with each nbhd backend, as the model-level tables of "Faster
Neighborhood Attention" (Tables 5 and 8) do.

    python examples/nat.py                                     # nat-tiny, 224x224, batch 128, fp16, every CUDA backend
    python examples/nat.py --model dinat-small --backends fused,naive --dtype bfloat16
    python examples/nat.py --model dinat-ci --device cpu --batch 2 --steps 1 --warmup 0   # the CI run
    python examples/nat.py --model dinat-tiny --backends fused --compile both           # eager, then torch.compile
    python examples/nat.py --model dinat-tiny-512 --batch 16 --backends fused           # 128x128 tokens at stage 1

The model: a convolutional tokenizer (two 3x3 stride-2 convolutions, 4x down), four
stages of blocks x + attn(norm(x)), x + mlp(norm(x)) with NeighborhoodAttention2D (7x7
windows, relative positional bias), a 3x3 stride-2 convolution between stages that
doubles the channels, then a pooled linear head. DiNAT alternates dilation 1 with the
largest dilation the stage's resolution allows (resolution // kernel: 8, 4, 2, 1 at 224).
Sizes (depths, heads, channels, MLP ratio) are those of the NAT and DiNAT papers.

Inference runs the model in the dtype under torch.no_grad(); training runs fp32 weights
under autocast with a loss scaler for float16, cross entropy on random labels and an
AdamW step. Both report images per second (CUDA events around all timed iterations);
training also the estimated hours for 300 ImageNet-1k epochs on this one device. The
backend of every attention layer is chosen with `use_backend` (which also reaches layers
a model builds later; a single layer takes `backend=`); a backend that cannot run a pass
is reported with nbhd's reason."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

import nbhd
import nbhd.nn as nbhd_nn


@dataclass(frozen=True)
class Config:
    depths: Tuple[int, ...]
    heads: Tuple[int, ...]
    dim: int             # channels of the first stage; doubled by each downsampler
    mlp_ratio: float
    kernel: int = 7
    dilated: bool = False  # DiNAT: every other block dilated
    image: int = 224
    classes: int = 1000


CONFIGS = {
    "nat-mini": Config((3, 4, 6, 5), (2, 4, 8, 16), 64, 3.0),
    "nat-tiny": Config((3, 4, 18, 5), (2, 4, 8, 16), 64, 3.0),
    "nat-small": Config((3, 4, 18, 5), (3, 6, 12, 24), 96, 2.0),
    "nat-base": Config((3, 4, 18, 5), (4, 8, 16, 32), 128, 2.0),
    # two stages on 32x32 images: a CPU run in seconds (CI)
    "nat-ci": Config((2, 1), (1, 2), 16, 2.0, kernel=3, image=32, classes=10),
}
# Segmentation and detection resolution: the Tiny backbone on 512x512 images, 128x128
# tokens at stage 1 (DiNAT's dilations 18, 9, 4, 2), as the NAT/DiNAT dense-prediction
# heads run it.
CONFIGS["nat-tiny-512"] = Config(**{**CONFIGS["nat-tiny"].__dict__, "image": 512})
CONFIGS.update({"di" + name: Config(**{**c.__dict__, "dilated": True}) for name, c in list(CONFIGS.items())})


class ConvTokenizer(nn.Module):
    """Image [B, 3, H, W] -> tokens [B, H/4, W/4, dim]."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(3, dim // 2, 3, 2, 1), nn.Conv2d(dim // 2, dim, 3, 2, 1))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """[B, H, W, C] -> [B, H/2, W/2, 2C]."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x):
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kernel: int, dilation: int, mlp_ratio: float, rpb: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nbhd_nn.NeighborhoodAttention2D(dim, heads, kernel, dilation=dilation, rel_pos_bias=rpb)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class NAT(nn.Module):
    def __init__(self, c: Config, rpb: bool = True):
        super().__init__()
        self.tokenizer = ConvTokenizer(c.dim)
        stages, dim, side = [], c.dim, c.image // 4
        self.dilations = []
        for i, (depth, heads) in enumerate(zip(c.depths, c.heads)):
            widest = max(1, side // c.kernel) if c.dilated else 1
            dilations = [widest if c.dilated and j % 2 else 1 for j in range(depth)]
            self.dilations.append(dilations)
            blocks = [Block(dim, heads, c.kernel, d, c.mlp_ratio, rpb) for d in dilations]
            if i + 1 < len(c.depths):
                blocks.append(Downsample(dim))
                dim, side = 2 * dim, (side + 1) // 2
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, c.classes)

    def forward(self, images):
        x = self.stages(self.tokenizer(images))
        return self.head(self.norm(x).mean(dim=(1, 2)))


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Runs every nbhd.nn layer on backend `name` (None: nbhd's own choice), forward and
    backward: the layers call nbhd.nn.neighborhood_attention, which this replaces."""
    original = nbhd_nn.neighborhood_attention

    def forced(*args, backend=None, **kwargs):  # the layers pass their own backend (None)
        return original(*args, backend=name, **kwargs)

    if name is not None:
        nbhd_nn.neighborhood_attention = forced
    try:
        yield
    finally:
        nbhd_nn.neighborhood_attention = original


def short(e: BaseException, n: int = 200) -> str:
    text = " ".join(str(e).split())
    return text[:n] + ("..." if len(text) > n else "")


class Clock:
    """Seconds of GPU (CUDA events) or wall time between start() and stop()."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.begin = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            return self.begin.elapsed_time(self.end) * 1e-3
        return time.perf_counter() - self.t0


def time_inference(model, images, steps: int, warmup: int, device: str) -> float:
    """Images per second of the forward in eval mode."""
    model.eval()
    clock = Clock(device)
    with torch.no_grad():
        for _ in range(warmup):
            model(images)
        clock.start()
        for _ in range(steps):
            model(images)
        seconds = clock.stop()
    return images.shape[0] * steps / seconds


def time_training(model, images, labels, dtype: torch.dtype, steps: int, warmup: int, device: str) -> Tuple[float, float]:
    """(images per second, last loss) of forward + backward + AdamW step, fp32 weights,
    autocast to `dtype` where it is lower precision."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    low = dtype in (torch.float16, torch.bfloat16)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    clock = Clock(device)
    loss = torch.zeros(())

    def step():
        nonlocal loss
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=low):
            loss = F.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(warmup):
        step()
    clock.start()
    for _ in range(steps):
        step()
    seconds = clock.stop()
    return images.shape[0] * steps / seconds, float(loss.detach())


IMAGENET_IMAGES = 1_281_167


def run(model_name: str, backends: Sequence[Optional[str]], device: str, dtype_name: str, batch: int, steps: int,
        warmup: int, rpb: bool, train: bool = True, infer: bool = True, seed: int = 0,
        compile_modes: Sequence[bool] = (False,)) -> list:
    """One result dict per backend and compile mode: inference and training images/s,
    or why not. A compiled model is torch.compile(model, fullgraph=True): its first
    (warm-up) calls compile, which is not timed; at least one warm-up call runs."""
    c = CONFIGS[model_name]
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(seed)
    images = torch.randn(batch, 3, c.image, c.image, device=device)
    labels = torch.randint(0, c.classes, (batch,), device=device)
    results = []
    for backend, compiled in [(b, m) for b in backends for m in compile_modes]:
        r = {"model": model_name, "backend": backend or "auto", "device": device, "dtype": dtype_name, "batch": batch,
             "image": c.image, "rpb": rpb, "compiled": compiled}
        runs = max(warmup, 1) if compiled else warmup

        def prepared(model):
            return torch.compile(model, fullgraph=True) if compiled else model

        with use_backend(backend):
            if infer:
                torch.manual_seed(seed)
                model = NAT(c, rpb).to(device)
                # Inference in the dtype itself (weights included); the CPU has no fast half matmuls.
                model = model.to(dtype) if device == "cuda" else model
                x = images.to(next(model.parameters()).dtype)
                try:
                    r["inference_images_per_s"] = time_inference(prepared(model), x, steps, runs, device)
                except (ValueError, RuntimeError, MemoryError) as e:
                    r["inference_error"] = short(e)
                del model
            if train:
                torch.manual_seed(seed)
                model = NAT(c, rpb).to(device)
                try:
                    ips, loss = time_training(prepared(model), images, labels,
                                              dtype if device == "cuda" else torch.float32, steps, runs, device)
                    r["train_images_per_s"], r["train_loss"] = ips, loss
                    r["train_hours_300_epochs"] = 300 * IMAGENET_IMAGES / ips / 3600
                except (ValueError, RuntimeError, MemoryError) as e:
                    r["train_error"] = short(e)
                del model
        if device == "cuda":
            torch.cuda.empty_cache()
        results.append(r)
    return results


def table(results: list) -> str:
    lines = ["| model | backend | compiled | dtype | batch | inference images/s | training images/s | "
             "300 epochs (h, 1 device) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        inf = f"{r['inference_images_per_s']:.4g}" if "inference_images_per_s" in r else r.get("inference_error", "—")
        tr = f"{r['train_images_per_s']:.4g}" if "train_images_per_s" in r else r.get("train_error", "—")
        hours = f"{r['train_hours_300_epochs']:.1f}" if "train_hours_300_epochs" in r else "—"
        compiled = "yes" if r.get("compiled") else "no"
        lines.append(f"| {r['model']} | {r['backend']} | {compiled} | {r['dtype']} | {r['batch']} | {inf} | {tr} | "
                     f"{hours} |")
    return "\n".join(lines)


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="nat-tiny", choices=sorted(CONFIGS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--backends", default="",
                    help="comma-separated nbhd backends, 'auto' for nbhd's choice (default: every built one for the device)")
    ap.add_argument("--dtype", default="", help="float16 (GPU default), bfloat16, float32 (CPU default)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed iterations (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed iterations first (default 5)")
    ap.add_argument("--no-rpb", action="store_true", help="no relative positional bias (the paper's Table 8)")
    ap.add_argument("--no-train", action="store_true", help="time inference only")
    ap.add_argument("--no-inference", action="store_true", help="time training only")
    ap.add_argument("--compile", choices=("no", "yes", "both"), default="no",
                    help="time the model under torch.compile(fullgraph=True): yes, no (default), or both in turn")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    built = [b["name"] for b in nbhd.backends() if b["device"] == a.device and b["fused_ops"]]
    names = [x for x in a.backends.split(",") if x] or built
    backends = [None if x == "auto" else x for x in names]
    dtype = a.dtype or ("float16" if a.device == "cuda" else "float32")
    results = run(a.model, backends, a.device, dtype, a.batch, a.steps, a.warmup, rpb=not a.no_rpb,
                  train=not a.no_train, infer=not a.no_inference,
                  compile_modes={"no": (False,), "yes": (True,), "both": (False, True)}[a.compile])
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
