// SPDX-License-Identifier: Apache-2.0
// TMA on the device (sm_90): a tensor map encoded from a TmaView (tensor_map.hpp)
// and one copy of a tile (tma.cuh, tma_probe.cu) put into shared memory exactly the
// tile's tokens of one dilation group, batch and head, zero past the grid, in the
// 128-byte-swizzled layout the wgmma kernels read: row r's 16-byte chunk c at chunk
// c ^ (r % 8) of the row. Runs on the CPU emulator too, which copies by the same
// rules, so that the GPU run checks the emulator as well as the kernel.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/common/tensor_map.hpp"
#include "cuda/fused/host.hpp"
#include "cuda_testing.hpp"
#include "tma_probe.hpp"

namespace nbhd::cuda {
namespace {

TEST(FusedTmaSmoke, ACopyPutsTheTileSwizzledIntoSharedMemory) {
  NBHD_REQUIRE_GPU();
  if (!fused::hopper_device()) GTEST_SKIP() << "TMA needs an sm_90 device and a build with sm_90a";
  std::mt19937_64 rng(73);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int copies = 0;
  for (int trial = 0; trial < 40; ++trial) {
    // A [B, X0, X1, X2, H, D] float16 tensor, heads packed or padded, tokens padded.
    const int rank = uniform(1, 3);
    int x[kMaxRank] = {1, 1, 1}, tile[kMaxRank] = {1, 1, 1};
    Neighborhood nb;
    for (int a = kMaxRank - rank; a < kMaxRank; ++a) {
      nb.axis[a].dilation = uniform(1, 3);
      x[a] = nb.axis[a].length = uniform(nb.axis[a].dilation, 20);
      tile[a] = 1 << uniform(0, 2);
    }
    const int64_t batch = uniform(1, 2), heads = uniform(1, 3), dim = uniform(0, 1) ? 64 : 128;
    const bool pad_heads = uniform(0, 2) == 0 && !(rank == 3 && batch > 1);
    detail::TokenLayout l;
    l.inner = 1;
    l.head = dim + (pad_heads ? 8 : 0);
    l.axis[2] = heads * l.head + 8 * uniform(0, 1);
    l.axis[1] = x[2] * l.axis[2];
    l.axis[0] = x[1] * l.axis[1];
    l.batch = x[0] * l.axis[0];
    std::vector<uint16_t> host(size_t(batch * l.batch));
    for (uint16_t& h : host) h = uint16_t(0x3c00 + uniform(1, 0x3ff));  // nonzero halves in [1, 2)
    TmaView v;
    ASSERT_EQ(plan_tma_view(l, nb, batch, heads, dim, 2, tile, 64, &v), "");
    void* device = nullptr;
    ASSERT_EQ(cudaMalloc(&device, host.size() * 2), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(device, host.data(), host.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
    TmaProbeParams p{};
    const Status encoded = encode_tensor_map(v, device, DType::kFloat16, &p.map);
    ASSERT_TRUE(encoded.ok()) << encoded.message();
    // Elements per dim of a box, and its bytes (rows of 64 halves: 128 bytes).
    int counts[kTmaMaxDims];
    uint32_t rows = 1;
    for (int i = 0; i < v.dims; ++i) {
      counts[i] = int((v.box[i] + v.element_stride[i] - 1) / v.element_stride[i]);
      if (i > 0) rows *= uint32_t(counts[i]);
    }
    p.dims = v.dims;
    p.bytes = rows * 128;
    unsigned char* out = nullptr;
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&out), p.bytes), cudaSuccess);
    p.out = out;
    for (int tries = 0; tries < 3; ++tries) {
      TmaTile t;
      t.batch = uniform(0, int(batch) - 1);
      t.head = uniform(0, int(heads) - 1);
      t.slab = uniform(0, int(dim / 64) - 1);
      for (int a = 0; a < kMaxRank; ++a) {
        t.group[a] = uniform(0, nb.axis[a].dilation - 1);
        t.origin[a] = uniform(0, nb.axis[a].group_length(t.group[a]) - 1);
      }
      tma_coordinates(v, nb, t, p.coordinates);
      ASSERT_EQ(launch_tma_probe(p, nullptr), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<unsigned char> got(p.bytes);
      ASSERT_EQ(cudaMemcpy(got.data(), out, p.bytes, cudaMemcpyDeviceToHost), cudaSuccess);
      // Row r of the box: the tile offsets k of its axes (row-major, axis 2 fastest).
      for (uint32_t r = 0; r < rows; ++r) {
        int k[kMaxRank] = {0, 0, 0};
        uint32_t rest = r;
        for (int i = 1; i < v.dims; ++i) {
          const int index = int(rest % uint32_t(counts[i]));
          rest /= uint32_t(counts[i]);
          const int a = int(v.what[i]) - int(TmaView::Dim::kAxis0);
          if (a >= 0 && a < kMaxRank) k[a] = index;
        }
        int token[kMaxRank];
        bool inside = true;
        for (int a = 0; a < kMaxRank; ++a) {
          token[a] = t.group[a] + nb.axis[a].dilation * (t.origin[a] + k[a]);
          inside &= token[a] < x[a];
        }
        for (int c = 0; c < 64; ++c) {
          const uint16_t want = inside ? host[size_t(l.offset(t.batch, token, t.head) + t.slab * 64 + c)] : 0;
          const size_t at = size_t(r) * 128 + size_t((c / 8) ^ (r % 8)) * 16 + size_t(c % 8) * 2;
          uint16_t have;
          std::memcpy(&have, got.data() + at, 2);
          ASSERT_EQ(have, want) << "trial " << trial << " row " << r << " column " << c;
        }
      }
      ++copies;
    }
    cudaFree(out);
    cudaFree(device);
  }
  EXPECT_EQ(copies, 120);
}

}  // namespace
}  // namespace nbhd::cuda
