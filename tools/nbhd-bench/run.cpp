// SPDX-License-Identifier: Apache-2.0
#include "run.hpp"

#include <algorithm>

#include "device.hpp"
#include "workload.hpp"

namespace nbhd::bench {

Status run_benchmark(const Args& args, const Choice& choice, Outcome* out) {
  const Problem& p = args.problem;
  const bool backward = args.pass != Pass::kForward;
  Stream stream;
  NBHD_RETURN_IF_ERROR(stream.create(choice.device));
  Workload w;
  NBHD_RETURN_IF_ERROR(Workload::create(p, choice.device, backward, args.seed, &w));

  Options options;
  options.backend = choice.requested;
  options.stream = stream.get();
  options.deterministic = args.deterministic;
  options.num_threads = args.threads;
  const ForwardTensors fwd = w.forward_tensors();
  const BackwardTensors bwd = w.backward_tensors();
  auto step = [&]() -> Status {
    if (args.pass != Pass::kBackward) NBHD_RETURN_IF_ERROR(forward(p, fwd, options));
    if (backward) NBHD_RETURN_IF_ERROR(nbhd::backward(p, bwd, options));
    return Status::Ok();
  };
  // The backward alone still needs out and lse: one untimed forward first.
  if (args.pass == Pass::kBackward) NBHD_RETURN_IF_ERROR(forward(p, fwd, options));

  out->warmup = args.warmup >= 0 ? args.warmup : default_warmup(choice.device);
  out->iters = args.iters >= 1 ? args.iters : default_iters(choice.device);
  NBHD_RETURN_IF_ERROR(time_steps(choice.device, stream.get(), out->warmup, out->iters, step, &out->timings));
  NBHD_RETURN_IF_ERROR(stream.synchronize());

  if (args.verify) {
    Workload host;
    NBHD_RETURN_IF_ERROR(w.to_host(&host));
    Verification v;
    NBHD_RETURN_IF_ERROR(verify(p, args.pass, host, args.seed, tf32x3_products(p, choice.backend), &v));
    out->verification = std::move(v);
  }
  return Status::Ok();
}

Status measure_copy_gbps(Device device, double* gbps) {
  const size_t bytes = device == Device::kCUDA ? std::max<size_t>(4 * l2_cache_bytes(device), size_t(1) << 30)
                                               : size_t(256) << 20;
  Stream stream;
  NBHD_RETURN_IF_ERROR(stream.create(device));
  Buffer from, to;
  NBHD_RETURN_IF_ERROR(Buffer::allocate(device, bytes, &from));
  NBHD_RETURN_IF_ERROR(Buffer::allocate(device, bytes, &to));
  NBHD_RETURN_IF_ERROR(from.fill_bytes(0x5a, stream.get()));
  Timings t;
  NBHD_RETURN_IF_ERROR(time_steps(device, stream.get(), /*warmup=*/2, /*iters=*/10,
                                  [&] { return to.copy_from(from, stream.get()); }, &t));
  NBHD_RETURN_IF_ERROR(stream.synchronize());
  if (!(t.median_ms > 0)) return Status(StatusCode::kInternal, "the copy took no measurable time");
  *gbps = 2.0 * double(bytes) / (t.median_ms * 1e-3) * 1e-9;
  return Status::Ok();
}

}  // namespace nbhd::bench
