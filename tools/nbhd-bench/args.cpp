// SPDX-License-Identifier: Apache-2.0
#include "args.hpp"

#include <cerrno>
#include <climits>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <map>
#include <vector>

namespace nbhd::bench {

const char* name(Pass p) {
  switch (p) {
    case Pass::kForward: return "fwd";
    case Pass::kBackward: return "bwd";
    case Pass::kForwardBackward: return "fwd+bwd";
  }
  return "?";
}

std::string usage() {
  return R"(usage: nbhd-bench --extent 56x56 --kernel 7x7 [options]

Runs one neighborhood attention problem: times it, optionally verifies it against
the reference backend, and reports TFLOP/s over attended pairs only.

problem (per-axis values are 'x'-separated, or one number for every axis;
the rank is the number of extents):
  --extent E          token grid, e.g. 32768, 56x56, 16x48x80 (required)
  --kernel K          window size per axis (required)
  --dilation D        default 1
  --stride S          default 1
  --causal C          0 or 1 per axis, default 0
  --periodic P        0 or 1 per axis, default 0: the axis wraps around (never causal)
  --query-box B       compute only the queries of a box of the grid, 'begin:end' per
                      axis (e.g. 0:56x8:48; one pair for every axis): the call a
                      distributed rank makes for its own queries (docs/python.md)
  --batch N           default 1
  --heads N           query heads, default 1
  --kv-heads N        key/value heads (GQA), default = --heads
  --dim N             head dim of q and k, default 64
  --dim-v N           head dim of v and out, default = --dim
  --additional N      additional key/value tokens every query attends to, default 0
  --rpb               add a relative positional bias
  --scale X           softmax scale, default 1/sqrt(dim)
  --dtype T           float16 | bfloat16 | float32 | float64, default float32

run:
  --backend B         auto | reference | cpu | naive | fused | gemm, default auto
                      (--dry-run lists the ones this build has)
  --pass P            fwd | bwd | fwd+bwd, default fwd
  --warmup N          untimed iterations (default 10 on a GPU, 1 on the CPU)
  --iters N           timed iterations (default 30 on a GPU, 5 on the CPU)
  --seed N            seed of the random inputs, default 0
  --threads N         CPU backends: worker threads, default all
  --deterministic     bitwise-reproducible gradients

report:
  --verify            check the result against the reference backend (exit 1 on FAIL)
  --dry-run           list the built backends, whether each can run the problem and
                      why not, and the fused backend's tile configurations, ranked
  --json [FILE]       one JSON object to stdout, or to FILE
  --sol-tflops X      the card's attention rate, for % of speed of light
  --sol-gbps X        the card's copy bandwidth (GB/s, read + write), for % of speed
                      of light; 'measure' times a device-to-device copy first
  --help              this text

exit status: 0 ok, 1 verification failed, 2 bad arguments or a problem no backend
can run, 3 a runtime error (device, memory).
)";
}

namespace {

Status bad_value(const std::string& flag, const std::string& text, const std::string& what) {
  return invalid_argument(flag + " = '" + text + "' is invalid: " + what);
}

Status parse_int(const std::string& flag, const std::string& text, int64_t min, int64_t max, int64_t* out) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno == ERANGE) return bad_value(flag, text, "it must be an integer");
  if (v < min) return bad_value(flag, text, "it must be >= " + std::to_string(min));
  if (v > max) return bad_value(flag, text, "it must be <= " + std::to_string(max));
  *out = v;
  return Status::Ok();
}

Status parse_double(const std::string& flag, const std::string& text, bool positive, double* out) {
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(v))
    return bad_value(flag, text, "it must be a finite number");
  if (positive && v <= 0) return bad_value(flag, text, "it must be > 0");
  *out = v;
  return Status::Ok();
}

std::vector<std::string> split_x(const std::string& text) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (;;) {
    const size_t x = text.find('x', start);
    parts.push_back(text.substr(start, x - start));
    if (x == std::string::npos) return parts;
    start = x + 1;
  }
}

Status parse_dtype(const std::string& text, DType* out) {
  static const std::map<std::string, DType> names = {
      {"float16", DType::kFloat16},   {"fp16", DType::kFloat16},  {"bfloat16", DType::kBFloat16},
      {"bf16", DType::kBFloat16},     {"float32", DType::kFloat32}, {"fp32", DType::kFloat32},
      {"float64", DType::kFloat64},   {"fp64", DType::kFloat64},
  };
  const auto it = names.find(text);
  if (it == names.end()) return bad_value("--dtype", text, "it must be float16, bfloat16, float32 or float64");
  *out = it->second;
  return Status::Ok();
}

Status parse_pass(const std::string& text, Pass* out) {
  for (Pass p : {Pass::kForward, Pass::kBackward, Pass::kForwardBackward})
    if (text == name(p)) {
      *out = p;
      return Status::Ok();
    }
  return bad_value("--pass", text, "it must be fwd, bwd or fwd+bwd");
}

constexpr int64_t kAnyInt = INT64_MIN;  // problem values: Problem::validate gives the rules

// The per-axis flags are kept as text until the rank (from --extent) is known.
struct AxisFlags {
  std::string extent, kernel, dilation = "1", stride = "1", causal = "0", periodic = "0", query_box;
};

// --query-box: 'begin:end' per axis (or one pair for every axis) into the problem's
// query_begin / query_end; Problem::validate checks the bounds.
Status parse_query_box(const std::string& text, Problem* p) {
  const std::vector<std::string> parts = split_x(text);
  if (parts.size() != 1 && int(parts.size()) != p->rank)
    return bad_value("--query-box", text,
                     "it has " + std::to_string(parts.size()) + " ranges but --extent has rank " +
                         std::to_string(p->rank) + " (give 1 range or " + std::to_string(p->rank) + ")");
  for (int a = 0; a < p->rank; ++a) {
    const std::string& range = parts[parts.size() == 1 ? 0 : a];
    const size_t colon = range.find(':');
    if (colon == std::string::npos) return bad_value("--query-box", text, "each axis must be 'begin:end'");
    NBHD_RETURN_IF_ERROR(parse_int("--query-box", range.substr(0, colon), kAnyInt, INT64_MAX, &p->query_begin[a]));
    NBHD_RETURN_IF_ERROR(parse_int("--query-box", range.substr(colon + 1), kAnyInt, INT64_MAX, &p->query_end[a]));
  }
  return Status::Ok();
}

}  // namespace

Status parse_axes(const std::string& flag, const std::string& text, int rank, std::array<int64_t, 3>* out) {
  const std::vector<std::string> parts = split_x(text);
  if (parts.size() != 1 && int(parts.size()) != rank)
    return bad_value(flag, text,
                     "it has " + std::to_string(parts.size()) + " values but --extent has rank " +
                         std::to_string(rank) + " (give 1 value or " + std::to_string(rank) + ")");
  for (int a = 0; a < rank; ++a) {
    int64_t v = 0;
    NBHD_RETURN_IF_ERROR(parse_int(flag, parts[parts.size() == 1 ? 0 : a], kAnyInt, INT64_MAX, &v));
    (*out)[a] = v;
  }
  return Status::Ok();
}

Status parse_args(int argc, const char* const* argv, Args* out) {
  Args args;
  AxisFlags axes;
  std::optional<int64_t> kv_heads;  // default: --heads
  int64_t dim_v = 0;                // 0: same as --dim
  args.problem.dim = 64;

  // Flags with a value: each handler parses the text into `args`.
  using Handler = std::function<Status(const std::string& flag, const std::string& value)>;
  auto integer = [](int64_t* target, int64_t min, int64_t max = INT64_MAX) -> Handler {
    return [=](const std::string& f, const std::string& v) { return parse_int(f, v, min, max, target); };
  };
  int64_t warmup = -1, iters = -1, seed = 0, threads = 0;
  const std::map<std::string, Handler> valued = {
      {"--extent", [&](auto&, auto& v) { axes.extent = v; return Status::Ok(); }},
      {"--kernel", [&](auto&, auto& v) { axes.kernel = v; return Status::Ok(); }},
      {"--dilation", [&](auto&, auto& v) { axes.dilation = v; return Status::Ok(); }},
      {"--stride", [&](auto&, auto& v) { axes.stride = v; return Status::Ok(); }},
      {"--causal", [&](auto&, auto& v) { axes.causal = v; return Status::Ok(); }},
      {"--periodic", [&](auto&, auto& v) { axes.periodic = v; return Status::Ok(); }},
      {"--query-box", [&](auto&, auto& v) { axes.query_box = v; return Status::Ok(); }},
      // Problem values take any integer: the library's validation states the rules.
      {"--batch", integer(&args.problem.batch, kAnyInt)},
      {"--heads", integer(&args.problem.heads, kAnyInt)},
      {"--kv-heads",
       [&](auto& f, auto& v) {
         int64_t x = 0;
         NBHD_RETURN_IF_ERROR(parse_int(f, v, kAnyInt, INT64_MAX, &x));
         kv_heads = x;
         return Status::Ok();
       }},
      {"--dim", integer(&args.problem.dim, kAnyInt)},
      {"--dim-v", integer(&dim_v, kAnyInt)},
      {"--additional", integer(&args.problem.additional_tokens, kAnyInt)},
      {"--warmup", integer(&warmup, 0, INT32_MAX)},
      {"--iters", integer(&iters, 1, INT32_MAX)},
      {"--seed", integer(&seed, 0)},
      {"--threads", integer(&threads, 0, 4096)},
      {"--scale",
       [&](auto& f, auto& v) {
         double s = 0;
         NBHD_RETURN_IF_ERROR(parse_double(f, v, /*positive=*/false, &s));
         args.problem.scale = s;
         return Status::Ok();
       }},
      {"--dtype", [&](auto&, auto& v) { return parse_dtype(v, &args.problem.dtype); }},
      {"--backend", [&](auto&, auto& v) { return parse_backend(v, &args.backend); }},
      {"--pass", [&](auto&, auto& v) { return parse_pass(v, &args.pass); }},
      {"--sol-tflops",
       [&](auto& f, auto& v) {
         double x = 0;
         NBHD_RETURN_IF_ERROR(parse_double(f, v, /*positive=*/true, &x));
         args.sol_tflops = x;
         return Status::Ok();
       }},
      {"--sol-gbps",
       [&](auto& f, auto& v) {
         if (v == "measure") {
           args.measure_gbps = true;
           return Status::Ok();
         }
         double x = 0;
         NBHD_RETURN_IF_ERROR(parse_double(f, v, /*positive=*/true, &x));
         args.sol_gbps = x;
         return Status::Ok();
       }},
  };
  const std::map<std::string, bool*> switches = {
      {"--rpb", &args.problem.has_rpb},   {"--verify", &args.verify}, {"--dry-run", &args.dry_run},
      {"--deterministic", &args.deterministic}, {"--help", &args.help}, {"-h", &args.help},
  };

  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    const std::string flag = arg.substr(0, eq);
    const bool inline_value = eq != std::string::npos;
    const std::string value = inline_value ? arg.substr(eq + 1) : "";

    if (flag == "--json") {
      args.json = true;
      if (inline_value)
        args.json_file = value;
      else if (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0)
        args.json_file = argv[++i];
      continue;
    }
    if (const auto s = switches.find(flag); s != switches.end()) {
      if (inline_value) return invalid_argument(flag + " takes no value (got '" + arg + "')");
      *s->second = true;
      continue;
    }
    const auto h = valued.find(flag);
    if (h == valued.end())
      return invalid_argument("unknown argument '" + arg + "' (nbhd-bench --help lists the flags)");
    if (!inline_value && i + 1 >= argc) return invalid_argument(flag + " needs a value");
    NBHD_RETURN_IF_ERROR(h->second(flag, inline_value ? value : std::string(argv[++i])));
  }
  if (args.help) {
    *out = args;
    return Status::Ok();
  }

  if (axes.extent.empty()) return invalid_argument("--extent is required (e.g. --extent 56x56)");
  if (axes.kernel.empty()) return invalid_argument("--kernel is required (e.g. --kernel 7x7)");
  Problem& p = args.problem;
  p.rank = int(split_x(axes.extent).size());
  if (p.rank > 3)
    return bad_value("--extent", axes.extent, "it has " + std::to_string(p.rank) + " axes; the rank must be 1, 2 or 3");
  NBHD_RETURN_IF_ERROR(parse_axes("--extent", axes.extent, p.rank, &p.extent));
  NBHD_RETURN_IF_ERROR(parse_axes("--kernel", axes.kernel, p.rank, &p.kernel));
  NBHD_RETURN_IF_ERROR(parse_axes("--dilation", axes.dilation, p.rank, &p.dilation));
  NBHD_RETURN_IF_ERROR(parse_axes("--stride", axes.stride, p.rank, &p.stride));
  std::array<int64_t, 3> causal{}, periodic{};
  NBHD_RETURN_IF_ERROR(parse_axes("--causal", axes.causal, p.rank, &causal));
  NBHD_RETURN_IF_ERROR(parse_axes("--periodic", axes.periodic, p.rank, &periodic));
  for (int a = 0; a < p.rank; ++a) {
    if (causal[a] != 0 && causal[a] != 1) return bad_value("--causal", axes.causal, "each axis must be 0 or 1");
    if (periodic[a] != 0 && periodic[a] != 1) return bad_value("--periodic", axes.periodic, "each axis must be 0 or 1");
    p.causal[a] = causal[a] == 1;
    p.periodic[a] = periodic[a] == 1;
  }
  if (!axes.query_box.empty()) NBHD_RETURN_IF_ERROR(parse_query_box(axes.query_box, &p));
  p.kv_heads = kv_heads ? *kv_heads : p.heads;
  p.dim_v = dim_v;  // 0 means "same as dim" in Problem too
  args.warmup = int(warmup);
  args.iters = int(iters);
  args.seed = uint64_t(seed);
  args.threads = int(threads);
  *out = args;
  return Status::Ok();
}

}  // namespace nbhd::bench
