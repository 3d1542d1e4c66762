// SPDX-License-Identifier: Apache-2.0
#include "report.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace nbhd::bench {

double pass_flops(const Problem& p, Pass pass) {
  const double forward = p.forward_flops();
  switch (pass) {
    case Pass::kForward: return forward;
    case Pass::kBackward: return 2.5 * forward;
    case Pass::kForwardBackward: return 3.5 * forward;
  }
  return 0;
}

double pass_bytes(const Problem& p, Pass pass) {
  // The query side (q, out, lse and their gradients) holds the query sub-box's tokens.
  const double e = size_of(p.dtype), n = double(p.batch) * double(p.tokens());
  const double nq = double(p.batch) * double(p.query_tokens());
  const double D = double(p.dim), Dv = double(p.value_dim()), H = double(p.heads), Hkv = double(p.kv_heads);
  const double q = nq * H * D, k = n * Hkv * D, v = n * Hkv * Dv, o = nq * H * Dv, lse_bytes = nq * H * 4.0;
  const double extra = double(p.batch) * double(p.additional_tokens) * Hkv * (D + Dv);
  // inputs q, k, v, out, d_out, lse (+ additional k/v); outputs dq, dk, dv (+ theirs).
  const double backward = e * (2 * (q + k + v) + 2 * o + 2 * extra) + lse_bytes;
  switch (pass) {
    case Pass::kForward: return p.forward_bytes();
    case Pass::kBackward: return backward;
    case Pass::kForwardBackward: return p.forward_bytes() + backward;
  }
  return 0;
}

Metrics compute_metrics(const Args& args, const Timings& t) {
  Metrics m;
  m.flops = pass_flops(args.problem, args.pass);
  m.bytes = pass_bytes(args.problem, args.pass);
  const double seconds = t.median_ms * 1e-3;
  if (seconds > 0) {
    m.tflops = m.flops / seconds * 1e-12;
    m.gbps = m.bytes / seconds * 1e-9;
  }
  if (args.sol_tflops || args.sol_gbps) {
    double sol_s = 0;
    if (args.sol_tflops) sol_s = std::max(sol_s, m.flops / (*args.sol_tflops * 1e12));
    if (args.sol_gbps) sol_s = std::max(sol_s, m.bytes / (*args.sol_gbps * 1e9));
    m.sol_ms = sol_s * 1e3;
    if (t.median_ms > 0) m.sol_fraction = *m.sol_ms / t.median_ms;
  }
  return m;
}

namespace {

std::string fmt(const char* format, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, x);
  return buf;
}

std::string tensor_list(const Verification& v) {
  std::string s;
  for (const Check& c : v.checks) s += (s.empty() ? "" : ", ") + c.tensor;
  return s;
}

}  // namespace

void print_text(const Report& r, std::ostream& os) {
  const Args& a = r.args;
  const Metrics& m = r.metrics;
  os << "problem   " << a.problem.to_string() << "\n";
  // The public API tells which backend runs a problem's forward; with auto the
  // library picks each pass's backend, so a backward may run on another one.
  const bool auto_backward = r.choice.requested == Backend::kAuto && a.pass != Pass::kForward;
  os << "backend   " << name(r.choice.backend)
     << (auto_backward ? " (auto, for the forward; the backward may use another)"
                       : r.choice.requested == Backend::kAuto ? " (auto)" : "")
     << " on " << name(r.choice.device) << ": " << r.device_name << "\n";
  os << "pass      " << name(a.pass) << ", " << r.warmup << " warm-up + " << r.iters << (r.iters == 1 ? " timed iteration\n" : " timed iterations\n");
  os << "time      median " << fmt("%.4g", r.timings.median_ms) << " ms (min " << fmt("%.4g", r.timings.min_ms)
     << ", max " << fmt("%.4g", r.timings.max_ms) << ")\n";
  os << "rate      " << fmt("%.4g", m.tflops) << " TFLOP/s (" << fmt("%.4g", m.flops * 1e-9)
     << " GFLOP over attended pairs), " << fmt("%.4g", m.gbps) << " GB/s (" << fmt("%.4g", m.bytes * 1e-6)
     << " MB)\n";
  if (m.sol_fraction)
    os << "SoL       " << fmt("%.1f", 100 * *m.sol_fraction) << "% of speed of light (" << fmt("%.4g", *m.sol_ms)
       << " ms at" << (a.sol_tflops ? " " + fmt("%g", *a.sol_tflops) + " TFLOP/s" : "")
       << (a.sol_gbps ? " " + fmt("%.4g", *a.sol_gbps) + " GB/s" + (a.measure_gbps ? " measured" : "") : "")
       << ")\n";
  if (!r.verification) return;
  const Verification& v = *r.verification;
  const Check* worst = v.worst();
  os << "verified: " << (v.pass() ? "PASS" : "FAIL");
  if (worst)
    os << " (max err " << fmt("%.3g", worst->err) << ", bound " << fmt("%.3g", worst->bound) << " on "
       << worst->tensor << "; " << tensor_list(v) << " over " << v.slices_checked << " of " << v.slices_total
       << " (batch, kv-head) slices)";
  os << "\n";
  for (const Check& c : v.checks)
    os << "  " << (c.ok() ? "ok   " : "FAIL ") << c.tensor << ": max err " << fmt("%.3g", c.err) << ", bound "
       << fmt("%.3g", c.bound) << " (" << c.rule << ")" << (c.finite ? "" : ", has non-finite values") << "\n";
  for (const std::string& note : v.notes) os << "  note: " << note << "\n";
}

namespace {

// A minimal JSON writer: objects of numbers, strings, booleans, arrays, nulls.
class Json {
 public:
  Json& key(const std::string& k) {
    comma();
    s_ << quote(k) << ": ";
    fresh_ = true;
    return *this;
  }
  Json& value(double x) {
    comma();
    if (std::isfinite(x)) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.9g", x);
      s_ << buf;
    } else {
      s_ << "null";
    }
    return *this;
  }
  Json& value(int64_t x) {
    comma();
    s_ << x;
    return *this;
  }
  Json& value(int x) { return value(int64_t(x)); }
  Json& value(bool x) {
    comma();
    s_ << (x ? "true" : "false");
    return *this;
  }
  Json& value(const std::string& x) {
    comma();
    s_ << quote(x);
    return *this;
  }
  Json& value(const char* x) { return value(std::string(x)); }
  Json& null() {
    comma();
    s_ << "null";
    return *this;
  }
  template <class T>
  Json& optional(const std::optional<T>& x) {
    return x ? value(*x) : null();
  }
  Json& open(char bracket) {
    comma();
    s_ << bracket;
    fresh_ = true;
    return *this;
  }
  Json& close(char bracket) {
    s_ << bracket;
    fresh_ = false;
    return *this;
  }
  std::string str() const { return s_.str(); }

 private:
  void comma() {
    if (!fresh_) s_ << ", ";
    fresh_ = false;
  }
  static std::string quote(const std::string& x) {
    std::string q = "\"";
    for (char c : x) {
      if (c == '"' || c == '\\') {
        q += '\\';
        q += c;
      } else if (static_cast<unsigned char>(c) < 0x20) {
        char buf[8];
        std::snprintf(buf, sizeof buf, "\\u%04x", c);
        q += buf;
      } else {
        q += c;
      }
    }
    return q + "\"";
  }
  std::ostringstream s_;
  bool fresh_ = true;
};

template <class T>
void axes(Json& j, const char* k, const Problem& p, const T& v) {
  j.key(k).open('[');
  for (int a = 0; a < p.rank; ++a) j.value(v[a]);
  j.close(']');
}

}  // namespace

std::string to_json(const Report& r) {
  const Args& a = r.args;
  const Problem& p = a.problem;
  const Metrics& m = r.metrics;
  Json j;
  j.open('{');
  j.key("problem").value(p.to_string());
  j.key("rank").value(p.rank);
  axes(j, "extent", p, p.extent);
  axes(j, "kernel", p, p.kernel);
  axes(j, "dilation", p, p.dilation);
  axes(j, "stride", p, p.stride);
  axes(j, "causal", p, p.causal);
  axes(j, "periodic", p, p.periodic);
  if (p.has_query_box()) {
    std::array<int64_t, 3> begin{}, end{};
    for (int a = 0; a < p.rank; ++a) {
      const Range r = p.padded_query_range(kMaxRank - p.rank + a);
      begin[a] = r.begin;
      end[a] = r.end;
    }
    axes(j, "query_begin", p, begin);
    axes(j, "query_end", p, end);
  }
  j.key("batch").value(p.batch).key("heads").value(p.heads).key("kv_heads").value(p.kv_heads);
  j.key("dim").value(p.dim).key("dim_v").value(p.value_dim());
  j.key("additional_tokens").value(p.additional_tokens).key("rpb").value(p.has_rpb);
  j.key("scale").value(p.softmax_scale()).key("dtype").value(name(p.dtype));
  j.key("attended_pairs").value(p.attended_pairs());
  j.key("backend").value(name(r.choice.requested)).key("resolved_backend").value(name(r.choice.backend));
  j.key("device").value(name(r.choice.device)).key("device_name").value(r.device_name);
  j.key("pass").value(name(a.pass)).key("warmup").value(r.warmup).key("iters").value(r.iters);
  j.key("seed").value(int64_t(a.seed)).key("threads").value(a.threads).key("deterministic").value(a.deterministic);
  j.key("time_ms").open('{');
  j.key("median").value(r.timings.median_ms).key("min").value(r.timings.min_ms).key("max").value(r.timings.max_ms);
  j.close('}');
  j.key("times_ms").open('[');
  for (double t : r.timings.ms) j.value(t);
  j.close(']');
  j.key("flops").value(m.flops).key("bytes").value(m.bytes);
  j.key("tflops").value(m.tflops).key("gbps").value(m.gbps);
  j.key("sol_tflops").optional(a.sol_tflops).key("sol_gbps").optional(a.sol_gbps);
  j.key("sol_gbps_measured").value(a.measure_gbps);
  j.key("sol_ms").optional(m.sol_ms).key("sol_fraction").optional(m.sol_fraction);
  j.key("verified");
  if (r.verification)
    j.value(r.verification->pass());
  else
    j.null();
  if (r.verification) {
    const Verification& v = *r.verification;
    j.key("verification").open('{');
    j.key("slices_checked").value(v.slices_checked).key("slices_total").value(v.slices_total);
    j.key("checks").open('[');
    for (const Check& c : v.checks) {
      j.open('{');
      j.key("tensor").value(c.tensor).key("max_err").value(c.err).key("bound").value(c.bound);
      j.key("rule").value(c.rule).key("finite").value(c.finite).key("ok").value(c.ok());
      j.close('}');
    }
    j.close(']');
    j.close('}');
  }
  j.close('}');
  return j.str();
}

}  // namespace nbhd::bench
