// SPDX-License-Identifier: Apache-2.0
#include "run.hpp"

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
    NBHD_RETURN_IF_ERROR(verify(p, args.pass, host, args.seed, &v));
    out->verification = std::move(v);
  }
  return Status::Ok();
}

}  // namespace nbhd::bench
