// SPDX-License-Identifier: Apache-2.0
// The halo forward kernel's shared memory, for the kernel and its planner. Host and
// device, no CUDA headers.
#pragma once

#include "nbhd/core/window.hpp"

namespace nbhd::cuda::fused {

// The halo kernel's shared memory (forward_halo_kernel.cuh), 16-bit elements: the
// query tile's rows, then K and V of `halo_rows` key rows each plus kHaloSlackRows
// zero rows (a warp's last 8-key block may read up to 7 rows past its keys). A plan
// asks for at most kHaloMaxSharedBytes: two CTAs per SM on an H100 (228 KB) and on
// an A100 (164 KB).
inline constexpr int kHaloSlackRows = 8;
inline constexpr int kHaloMaxSharedBytes = 80 << 10;
NBHD_HOST_DEVICE constexpr int halo_shared_bytes(int queries, int head_dim, int halo_rows) {
  return (queries + 2 * (halo_rows + kHaloSlackRows)) * head_dim * 2;
}

// The halo key pass's (backward_halo_kernel.cuh): K and V of its `keys` rows, Q and dO
// of `halo_rows` query rows plus the slack, lse and delta (8 bytes) per halo row, and
// with an rpb or d rpb the head's bias table and d rpb bins (`bins` floats each).
// kHaloMaxBiasBins caps the bins (2-D 7x7 windows: 169; 3-D 9x9x9: 4913).
inline constexpr int kHaloMaxBiasBins = 4096;
NBHD_HOST_DEVICE constexpr int halo_key_pass_shared_bytes(int keys, int head_dim, int halo_rows, int bins) {
  return 2 * (keys + halo_rows + kHaloSlackRows) * head_dim * 2 + (halo_rows + kHaloSlackRows) * 8 + 2 * bins * 4;
}

}  // namespace nbhd::cuda::fused
