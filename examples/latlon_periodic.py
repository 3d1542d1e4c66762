# SPDX-License-Identifier: Apache-2.0
"""Attention over a latitude-longitude grid whose longitude wraps around, the way
global weather models need it: `periodic=(False, True)` against padding the grid by
hand with copies of the opposite border.

    python examples/latlon_periodic.py [--grid 91x180] [--kernel 7x13] [--device cpu|cuda]

Padding longitude by the half-windows and cropping gives the periodic answer only
when the padding keeps every dilation group and stride phase where it was: a
dilated longitude whose length is not a multiple of the dilation (181 points at
d = 2: groups of 91 and 90) wraps from one group into the other at the seam, and the
padded run attends to the wrong keys there. The periodic axis needs no copy (the
padded tensors are (L + k - 1) / L larger, and their extra queries are computed and
thrown away).

Prints one line per case: the largest difference between the two answers over the
whole grid and at the seam (the first and last longitudes), the time of each, and
the extra bytes the padding copies.
"""

import argparse
import time

import torch

import nbhd


def pad_longitude(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """[B, lat, lon, H, D] with `left` columns of the eastern border copied west of the
    grid and `right` of the western border copied east of it."""
    return torch.cat([x[:, :, x.shape[2] - left:], x, x[:, :, :right]], dim=2)


def by_padding(q, k, v, kernel, dilation):
    """The hand-written version: pad longitude, attend without wrapping, crop."""
    left = dilation[1] * (kernel[1] // 2)
    right = dilation[1] * (kernel[1] - 1 - kernel[1] // 2)
    padded = [pad_longitude(t, left, right) for t in (q, k, v)]
    out = nbhd.na2d(*padded, kernel, dilation=dilation)
    return out[:, :, left:left + q.shape[2]], sum(t.numel() - s.numel() for t, s in zip(padded, (q, k, v)))


def timed(f, repeats=3):
    f()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        result = f()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, (time.perf_counter() - start) / repeats


def compare(grid, kernel, dilation, heads=4, dim=32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, *grid, heads, dim, generator=g, dtype=torch.float64).to(device) for _ in range(3))
    periodic, t_periodic = timed(lambda: nbhd.na2d(q, k, v, kernel, dilation=dilation, periodic=(False, True)))
    (padded, extra), t_padded = timed(lambda: by_padding(q, k, v, kernel, dilation))
    diff = (periodic - padded).abs()
    seam = torch.cat([diff[:, :, :kernel[1] * dilation[1]], diff[:, :, -kernel[1] * dilation[1]:]], dim=2)
    return {"grid": "x".join(map(str, grid)), "kernel": "x".join(map(str, kernel)),
            "dilation": "x".join(map(str, dilation)), "max_diff": float(diff.max()), "seam_diff": float(seam.max()),
            "periodic_s": t_periodic, "padded_s": t_padded, "padding_bytes": extra * q.element_size()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="91x180", help="latitude x longitude points (91x180: 2 degrees)")
    ap.add_argument("--kernel", default="7x13")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    grid = tuple(int(x) for x in args.grid.split("x"))
    kernel = tuple(int(x) for x in args.kernel.split("x"))
    cases = [(grid, kernel, (1, 1)),            # padding is exact here
             ((grid[0], grid[1] + 1), kernel, (1, 2))]  # odd longitude, dilated: groups of unequal length
    for case_grid, case_kernel, dilation in cases:
        r = compare(case_grid, case_kernel, dilation, device=args.device)
        print(f"grid {r['grid']} kernel {r['kernel']} dilation {r['dilation']}: max |periodic - padded| "
              f"{r['max_diff']:.2e} (seam {r['seam_diff']:.2e}); periodic {r['periodic_s'] * 1e3:.1f} ms, "
              f"padded {r['padded_s'] * 1e3:.1f} ms and {r['padding_bytes'] / 2 ** 20:.1f} MiB of copies")


if __name__ == "__main__":
    main()
