// SPDX-License-Identifier: Apache-2.0
// The public entry points: validate the problem and the tensors, pick a backend,
// run it, and turn any exception into a Status.
#include <new>
#include <stdexcept>

#include "core/tensor_checks.hpp"
#include "core/unfold.hpp"
#include "dispatch/backend.hpp"
#include "nbhd/api.hpp"

namespace nbhd {
namespace {

using detail::BackendImpl;
using detail::Pass;
using detail::TensorRule;

const char* pass_name(Pass pass) {
  switch (pass) {
    case Pass::kForward: return "forward";
    case Pass::kBackward: return "backward";
    case Pass::kUnfused: return "unfused operations";
  }
  return "?";
}

bool implements(const BackendImpl& b, Pass pass) {
  switch (pass) {
    case Pass::kForward: return b.forward != nullptr;
    case Pass::kBackward: return b.backward != nullptr;
    case Pass::kUnfused: return b.unfused != nullptr;
  }
  return false;
}

// The backend to run: the one asked for, or the first that fits the problem and,
// where given, the tensors. The error of a failed choice lists every candidate with
// the reason it was passed over.
Status choose(const Problem& p, Pass pass, Device device, Backend wanted, const BackendImpl** out,
              const std::vector<TensorRule>* tensors = nullptr) {
  std::string reasons;
  for (const BackendImpl* b : detail::registry()) {
    if (wanted != Backend::kAuto && b->id != wanted) continue;
    Status why;
    if (!implements(*b, pass))
      why = unsupported(std::string("it does not implement ") + pass_name(pass));
    else if (b->device != device)
      why = unsupported(std::string("it runs on ") + name(b->device) + " but the tensors are on " + name(device));
    else if (!b->runs_periodic && p.any_periodic())
      why = unsupported("periodic axes are not implemented in this backend yet");
    else
      why = b->supports(p, pass);
    if (why.ok() && tensors && b->supports_tensors) why = b->supports_tensors(p, pass, *tensors);
    if (why.ok()) {
      *out = b;
      return Status::Ok();
    }
    reasons += std::string("\n  ") + name(b->id) + ": " + why.message();
  }
  if (wanted != Backend::kAuto && reasons.empty())
    return unsupported(std::string("backend '") + name(wanted) + "' is not built into this library");
  return unsupported(std::string("no backend can run the ") + pass_name(pass) + " of " + p.to_string() +
                     (wanted == Backend::kAuto ? "" : std::string(" with backend '") + name(wanted) + "'") + ":" +
                     reasons);
}

template <class F>
Status guarded(F&& f) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return Status(StatusCode::kOutOfMemory, "out of host memory for the workspace");
  } catch (const std::exception& e) {
    return Status(StatusCode::kInternal, std::string("internal error: ") + e.what());
  } catch (...) {
    return Status(StatusCode::kInternal, "internal error: unknown exception");
  }
}

std::vector<TensorRule> forward_rules(const Problem& p, const ForwardTensors& t) {
  using namespace detail;
  const int64_t Dv = p.value_dim(), M = p.additional_tokens;
  return {
      {"query", &t.query, query_shape(p, p.heads, p.dim)},
      {"key", &t.key, token_shape(p, p.kv_heads, p.dim)},
      {"value", &t.value, token_shape(p, p.kv_heads, Dv)},
      {"rpb", &t.rpb, rpb_shape(p), p.has_rpb, false, true},
      {"additional_keys", &t.additional_keys, additional_shape(p, p.dim), M > 0},
      {"additional_values", &t.additional_values, additional_shape(p, Dv), M > 0},
      {"out", &t.out, query_shape(p, p.heads, Dv)},
      {"lse", &t.lse, lse_shape(p), false, true},
  };
}

std::vector<TensorRule> backward_rules(const Problem& p, const BackwardTensors& t) {
  using namespace detail;
  const int64_t Dv = p.value_dim(), M = p.additional_tokens;
  return {
      {"query", &t.query, query_shape(p, p.heads, p.dim)},
      {"key", &t.key, token_shape(p, p.kv_heads, p.dim)},
      {"value", &t.value, token_shape(p, p.kv_heads, Dv)},
      {"rpb", &t.rpb, rpb_shape(p), p.has_rpb, false, true},
      {"additional_keys", &t.additional_keys, additional_shape(p, p.dim), M > 0},
      {"additional_values", &t.additional_values, additional_shape(p, Dv), M > 0},
      {"out", &t.out, query_shape(p, p.heads, Dv)},
      {"lse", &t.lse, lse_shape(p), true, true},
      {"d_out", &t.d_out, query_shape(p, p.heads, Dv)},
      {"d_query", &t.d_query, query_shape(p, p.heads, p.dim)},
      {"d_key", &t.d_key, token_shape(p, p.kv_heads, p.dim)},
      {"d_value", &t.d_value, token_shape(p, p.kv_heads, Dv)},
      {"d_rpb", &t.d_rpb, rpb_shape(p), false, true},
      {"d_additional_keys", &t.d_additional_keys, additional_shape(p, p.dim), M > 0},
      {"d_additional_values", &t.d_additional_values, additional_shape(p, Dv), M > 0},
      {"d_lse", &t.d_lse, lse_shape(p), false, true},
  };
}

Status check_presence(const Problem& p, const TensorRef& rpb, const TensorRef& additional) {
  if (rpb.defined() && !p.has_rpb) return invalid_argument("rpb was given but problem.has_rpb is false");
  if (additional.defined() && p.additional_tokens == 0)
    return invalid_argument("additional keys/values were given but problem.additional_tokens is 0");
  return Status::Ok();
}

// Validate, check tensors, choose, run: the shape of every entry point.
template <class Run>
Status run_checked(const Problem& p, Pass pass, const std::vector<TensorRule>& rules, const Options& o, Run&& run) {
  return guarded([&]() -> Status {
    NBHD_RETURN_IF_ERROR(p.validate());
    Device device;
    NBHD_RETURN_IF_ERROR(detail::check_tensors(p, rules, &device));
    const BackendImpl* backend = nullptr;
    NBHD_RETURN_IF_ERROR(choose(p, pass, device, o.backend, &backend, &rules));
    return run(*backend);
  });
}

// A backend that tiles each dilation group runs a problem whose groups are short as
// the parts of core/unfold.hpp, when it supports every part; else as it is.
template <class Tensors>
Status run_unfolded(const BackendImpl& b, Pass pass, const Problem& p, const Tensors& t, const Options& o,
                    Status (*run)(const Problem&, const Tensors&, const Options&), bool single_part_only) {
  if (b.unfolds_short_groups) {
    const std::vector<detail::UnfoldedPart> parts = detail::unfold_short_groups(p, single_part_only);
    bool all_supported = !parts.empty();
    for (const detail::UnfoldedPart& part : parts) all_supported = all_supported && b.supports(part.problem, pass).ok();
    if (all_supported) {
      for (const detail::UnfoldedPart& part : parts)
        NBHD_RETURN_IF_ERROR(run(part.problem, detail::part_tensors(t, p, part), o));
      return Status::Ok();
    }
  }
  return run(p, t, o);
}

}  // namespace

const char* name(Backend b) {
  switch (b) {
    case Backend::kAuto: return "auto";
    case Backend::kReference: return "reference";
    case Backend::kCpu: return "cpu";
    case Backend::kNaive: return "naive";
    case Backend::kFused: return "fused";
    case Backend::kGemm: return "gemm";
  }
  return "?";
}

Status parse_backend(const std::string& text, Backend* out) {
  for (Backend b : {Backend::kAuto, Backend::kReference, Backend::kCpu, Backend::kNaive, Backend::kFused, Backend::kGemm})
    if (text == name(b)) {
      *out = b;
      return Status::Ok();
    }
  return invalid_argument("backend = '" + text + "' is not one of auto, reference, cpu, naive, fused, gemm");
}

std::vector<BackendInfo> built_backends() {
  std::vector<BackendInfo> out;
  for (const BackendImpl* b : detail::registry())
    out.push_back({b->id, b->device, b->forward != nullptr, b->unfused != nullptr, b->unfolds_short_groups});
  return out;
}

Status can_run(Backend backend, const Problem& p, Device device, bool backward) {
  return guarded([&]() -> Status {
    NBHD_RETURN_IF_ERROR(p.validate());
    const BackendImpl* chosen = nullptr;
    return choose(p, backward ? Pass::kBackward : Pass::kForward, device, backend, &chosen);
  });
}

Status check_forward(const Problem& p, const ForwardTensors& t) {
  return guarded([&]() -> Status {
    NBHD_RETURN_IF_ERROR(p.validate());
    NBHD_RETURN_IF_ERROR(detail::check_tensors(p, forward_rules(p, t), nullptr));
    return check_presence(p, t.rpb, t.additional_keys);
  });
}

Status check_backward(const Problem& p, const BackwardTensors& t) {
  return guarded([&]() -> Status {
    NBHD_RETURN_IF_ERROR(p.validate());
    NBHD_RETURN_IF_ERROR(detail::check_tensors(p, backward_rules(p, t), nullptr));
    return check_presence(p, t.rpb, t.additional_keys);
  });
}

Status forward(const Problem& p, const ForwardTensors& t, const Options& o) {
  return run_checked(p, Pass::kForward, forward_rules(p, t), o, [&](const BackendImpl& b) {
    NBHD_RETURN_IF_ERROR(check_presence(p, t.rpb, t.additional_keys));
    return run_unfolded(b, Pass::kForward, p, t, o, b.forward, /*single_part_only=*/false);
  });
}

Status backward(const Problem& p, const BackwardTensors& t, const Options& o) {
  return run_checked(p, Pass::kBackward, backward_rules(p, t), o, [&](const BackendImpl& b) {
    NBHD_RETURN_IF_ERROR(check_presence(p, t.rpb, t.additional_keys));
    // d rpb and the additional tokens' gradients sum over every query: one part only.
    const bool single_part_only = t.d_rpb.defined() || p.additional_tokens > 0;
    return run_unfolded(b, Pass::kBackward, p, t, o, b.backward, single_part_only);
  });
}

Status qk(const Problem& p, const QkTensors& t, const Options& o) {
  using namespace detail;
  std::vector<TensorRule> rules = {
      {"query", &t.query, query_shape(p, p.heads, p.dim)},
      {"key", &t.key, token_shape(p, p.kv_heads, p.dim)},
      {"rpb", &t.rpb, rpb_shape(p), p.has_rpb, false, true},
      {"additional_keys", &t.additional_keys, additional_shape(p, p.dim), p.additional_tokens > 0},
      {"attn", &t.attn, attn_shape(p)},
  };
  return run_checked(p, Pass::kUnfused, rules, o, [&](const BackendImpl& b) {
    NBHD_RETURN_IF_ERROR(check_presence(p, t.rpb, t.additional_keys));
    return b.unfused->qk(p, t, o);
  });
}

Status qk_backward(const Problem& p, const QkBackwardTensors& t, const Options& o) {
  using namespace detail;
  std::vector<TensorRule> rules = {
      {"query", &t.query, query_shape(p, p.heads, p.dim)},
      {"key", &t.key, token_shape(p, p.kv_heads, p.dim)},
      {"additional_keys", &t.additional_keys, additional_shape(p, p.dim), p.additional_tokens > 0},
      {"d_attn", &t.d_attn, attn_shape(p)},
      {"d_query", &t.d_query, query_shape(p, p.heads, p.dim)},
      {"d_key", &t.d_key, token_shape(p, p.kv_heads, p.dim)},
      {"d_rpb", &t.d_rpb, rpb_shape(p), false, true},
      {"d_additional_keys", &t.d_additional_keys, additional_shape(p, p.dim), false},
  };
  return run_checked(p, Pass::kUnfused, rules, o,
                                        [&](const BackendImpl& b) { return b.unfused->qk_backward(p, t, o); });
}

Status softmax(const Problem& p, const SoftmaxTensors& t, const Options& o) {
  using namespace detail;
  std::vector<TensorRule> rules = {{"attn", &t.attn, attn_shape(p)}, {"probs", &t.probs, attn_shape(p)}};
  return run_checked(p, Pass::kUnfused, rules, o,
                                     [&](const BackendImpl& b) { return b.unfused->softmax(p, t, o); });
}

Status softmax_backward(const Problem& p, const SoftmaxBackwardTensors& t, const Options& o) {
  using namespace detail;
  std::vector<TensorRule> rules = {{"probs", &t.probs, attn_shape(p)},
                                   {"d_probs", &t.d_probs, attn_shape(p)},
                                   {"d_attn", &t.d_attn, attn_shape(p)}};
  return run_checked(p, Pass::kUnfused, rules, o,
                                             [&](const BackendImpl& b) { return b.unfused->softmax_backward(p, t, o); });
}

Status av(const Problem& p, const AvTensors& t, const Options& o) {
  using namespace detail;
  const int64_t Dv = p.value_dim();
  std::vector<TensorRule> rules = {
      {"probs", &t.probs, attn_shape(p)},
      {"value", &t.value, token_shape(p, p.kv_heads, Dv)},
      {"additional_values", &t.additional_values, additional_shape(p, Dv), p.additional_tokens > 0},
      {"out", &t.out, query_shape(p, p.heads, Dv)},
  };
  return run_checked(p, Pass::kUnfused, rules, o, [&](const BackendImpl& b) {
    NBHD_RETURN_IF_ERROR(check_presence(p, TensorRef{}, t.additional_values));
    return b.unfused->av(p, t, o);
  });
}

Status av_backward(const Problem& p, const AvBackwardTensors& t, const Options& o) {
  using namespace detail;
  const int64_t Dv = p.value_dim();
  std::vector<TensorRule> rules = {
      {"probs", &t.probs, attn_shape(p)},
      {"value", &t.value, token_shape(p, p.kv_heads, Dv)},
      {"additional_values", &t.additional_values, additional_shape(p, Dv), p.additional_tokens > 0},
      {"d_out", &t.d_out, query_shape(p, p.heads, Dv)},
      {"d_probs", &t.d_probs, attn_shape(p)},
      {"d_value", &t.d_value, token_shape(p, p.kv_heads, Dv)},
      {"d_additional_values", &t.d_additional_values, additional_shape(p, Dv), false},
  };
  return run_checked(p, Pass::kUnfused, rules, o,
                                        [&](const BackendImpl& b) { return b.unfused->av_backward(p, t, o); });
}

}  // namespace nbhd
