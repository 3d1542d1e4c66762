// SPDX-License-Identifier: Apache-2.0
// nbhd-bench: the argument parser (good and bad flags, per-axis values), the work
// counts it reports, and the binary itself (exit codes, JSON keys, --dry-run). The
// --verify smoke runs are plain ctest invocations (tools/nbhd-bench/cli_tests.cmake).
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "args.hpp"
#include "backends.hpp"
#include "report.hpp"

namespace nbhd::bench {
namespace {

Status parse(std::vector<const char*> argv, Args* out) {
  argv.insert(argv.begin(), "nbhd-bench");
  return parse_args(int(argv.size()), argv.data(), out);
}

Args parse_ok(std::vector<const char*> argv) {
  Args a;
  const Status s = parse(argv, &a);
  EXPECT_TRUE(s.ok()) << s.message();
  return a;
}

std::string parse_error(std::vector<const char*> argv) {
  Args a;
  const Status s = parse(argv, &a);
  EXPECT_FALSE(s.ok());
  return s.message();
}

TEST(BenchArgs, RankComesFromTheExtentAndOneValueCoversEveryAxis) {
  const Args a = parse_ok({"--extent", "16x48x80", "--kernel", "8x16x24", "--dilation", "2", "--stride=1x2x3",
                           "--causal", "1x0x1"});
  const Problem& p = a.problem;
  EXPECT_EQ(p.rank, 3);
  EXPECT_EQ(p.extent, (std::array<int64_t, 3>{16, 48, 80}));
  EXPECT_EQ(p.kernel, (std::array<int64_t, 3>{8, 16, 24}));
  EXPECT_EQ(p.dilation, (std::array<int64_t, 3>{2, 2, 2}));
  EXPECT_EQ(p.stride, (std::array<int64_t, 3>{1, 2, 3}));
  EXPECT_EQ(p.causal, (std::array<bool, 3>{true, false, true}));
  EXPECT_TRUE(p.validate().ok());

  const Args one = parse_ok({"--extent", "32768", "--kernel", "2048", "--causal", "1"});
  EXPECT_EQ(one.problem.rank, 1);
  EXPECT_EQ(one.problem.extent[0], 32768);
  EXPECT_TRUE(one.problem.causal[0]);
}

TEST(BenchArgs, Defaults) {
  const Args a = parse_ok({"--extent", "56x56", "--kernel", "7"});
  EXPECT_EQ(a.problem.batch, 1);
  EXPECT_EQ(a.problem.heads, 1);
  EXPECT_EQ(a.problem.kv_heads, 1);
  EXPECT_EQ(a.problem.dim, 64);
  EXPECT_EQ(a.problem.value_dim(), 64);
  EXPECT_EQ(a.problem.dtype, DType::kFloat32);
  EXPECT_FALSE(a.problem.scale.has_value());
  EXPECT_EQ(a.backend, Backend::kAuto);
  EXPECT_EQ(a.pass, Pass::kForward);
  EXPECT_FALSE(a.verify || a.dry_run || a.json || a.deterministic);
  EXPECT_EQ(a.warmup, -1);  // the device's default
  EXPECT_EQ(a.iters, -1);
}

TEST(BenchArgs, EveryFlag) {
  const Args a = parse_ok({"--extent", "56x56", "--kernel", "7x7", "--batch", "64", "--heads", "8", "--kv-heads", "2",
                           "--dim", "32", "--dim-v", "16", "--additional", "3", "--rpb", "--scale", "0.5", "--dtype",
                           "bfloat16", "--backend", "reference", "--pass", "fwd+bwd", "--verify", "--warmup", "2",
                           "--iters", "7", "--json", "out.json", "--seed", "9", "--threads", "3", "--sol-tflops", "600",
                           "--sol-gbps=3020", "--deterministic"});
  const Problem& p = a.problem;
  EXPECT_EQ(p.batch, 64);
  EXPECT_EQ(p.heads, 8);
  EXPECT_EQ(p.kv_heads, 2);
  EXPECT_EQ(p.dim, 32);
  EXPECT_EQ(p.value_dim(), 16);
  EXPECT_EQ(p.additional_tokens, 3);
  EXPECT_TRUE(p.has_rpb);
  EXPECT_DOUBLE_EQ(p.softmax_scale(), 0.5);
  EXPECT_EQ(p.dtype, DType::kBFloat16);
  EXPECT_EQ(a.backend, Backend::kReference);
  EXPECT_EQ(a.pass, Pass::kForwardBackward);
  EXPECT_TRUE(a.verify && a.json && a.deterministic);
  EXPECT_EQ(a.json_file, "out.json");
  EXPECT_EQ(a.warmup, 2);
  EXPECT_EQ(a.iters, 7);
  EXPECT_EQ(a.seed, 9u);
  EXPECT_EQ(a.threads, 3);
  EXPECT_DOUBLE_EQ(*a.sol_tflops, 600);
  EXPECT_DOUBLE_EQ(*a.sol_gbps, 3020);
}

TEST(BenchArgs, JsonFileIsOptional) {
  EXPECT_EQ(parse_ok({"--extent", "9", "--kernel", "3", "--json"}).json_file, "");
  EXPECT_EQ(parse_ok({"--extent", "9", "--kernel", "3", "--json", "--verify"}).json_file, "");
  EXPECT_TRUE(parse_ok({"--extent", "9", "--kernel", "3", "--json", "--verify"}).verify);
  EXPECT_EQ(parse_ok({"--extent", "9", "--kernel", "3", "--json=r.json"}).json_file, "r.json");
}

TEST(BenchArgs, BadFlagsNameTheFlagAndTheValue) {
  auto has = [](const std::string& message, const std::string& part) {
    EXPECT_NE(message.find(part), std::string::npos) << "'" << message << "' should mention '" << part << "'";
  };
  has(parse_error({"--kernel", "7"}), "--extent is required");
  has(parse_error({"--extent", "56x56"}), "--kernel is required");
  has(parse_error({"--extent", "56x56", "--kernel", "7x7x7"}), "--kernel = '7x7x7'");
  has(parse_error({"--extent", "56x56", "--kernel", "7", "--stride", "1x2x3"}), "rank 2");
  has(parse_error({"--extent", "1x2x3x4", "--kernel", "1"}), "rank must be 1, 2 or 3");
  has(parse_error({"--extent", "56x", "--kernel", "7"}), "--extent = ''");
  has(parse_error({"--extent", "56x56", "--kernel", "7", "--heads", "four"}), "--heads = 'four'");
  has(parse_error({"--extent", "56x56", "--kernel", "7", "--heads"}), "--heads needs a value");
  has(parse_error({"--extent", "56x56", "--kernel", "7", "--causal", "2"}), "0 or 1");
  has(parse_error({"--extent", "56x56", "--kernel", "7", "--dtype", "half"}), "--dtype = 'half'");
  has(parse_error({"--extent", "56x56", "--kernel", "7", "--pass", "both"}), "--pass = 'both'");
  has(parse_error({"--extent", "56x56", "--kernel", "7", "--backend", "gpu"}), "backend = 'gpu'");
  has(parse_error({"--extent", "56x56", "--kernel", "7", "--bogus"}), "unknown argument '--bogus'");
  has(parse_error({"--extent", "56x56", "--kernel", "7", "--verify=yes"}), "--verify takes no value");
  has(parse_error({"--extent", "56x56", "--kernel", "7", "--iters", "0"}), "--iters = '0'");
  has(parse_error({"--extent", "56x56", "--kernel", "7", "--sol-tflops", "-1"}), "--sol-tflops = '-1'");
  has(parse_error({"--extent", "56x56", "--kernel", "7", "--scale", "nan"}), "--scale = 'nan'");
  has(parse_error({"56x56"}), "unknown argument '56x56'");
  has(parse_error({"--extent", "56x56", "--kernel", "7", "--query-box", "0-8"}), "'begin:end'");
  has(parse_error({"--extent", "56x56", "--kernel", "7", "--query-box", "0:8x0:8x0:8"}), "rank 2");
  has(parse_error({"--extent", "56x56", "--kernel", "7", "--query-box", "0:8xa:9"}), "--query-box = 'a'");
}

TEST(BenchArgs, QueryBoxIsOnePairPerAxisOrOneForAll) {
  const Args a = parse_ok({"--extent", "56x40", "--kernel", "7", "--query-box", "8:48x0:20"});
  EXPECT_EQ(a.problem.query_begin[0], 8);
  EXPECT_EQ(a.problem.query_end[0], 48);
  EXPECT_EQ(a.problem.query_begin[1], 0);
  EXPECT_EQ(a.problem.query_end[1], 20);
  EXPECT_TRUE(a.problem.validate().ok());
  const Args b = parse_ok({"--extent", "56x40", "--kernel", "7", "--query-box", "2:30"});
  EXPECT_EQ(b.problem.query_begin, (std::array<int64_t, 3>{2, 2, 0}));
  EXPECT_EQ(b.problem.query_end, (std::array<int64_t, 3>{30, 30, 0}));
  // Out of bounds parses; the library's validation names the axis and the bound.
  const Args c = parse_ok({"--extent", "56x40", "--kernel", "7", "--query-box", "2:50"});
  const Status s = c.problem.validate();
  EXPECT_NE(s.message().find("query_end[axis 1] = 50"), std::string::npos) << s.message();
}

TEST(BenchArgs, InvalidProblemsParseAndAreLeftToTheLibrarysValidation) {
  // The parser only reads numbers; Problem::validate states the rules.
  const Args a = parse_ok({"--extent", "56x56", "--kernel", "70", "--heads", "0"});
  const Status s = a.problem.validate();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("heads = 0"), std::string::npos) << s.message();
}

TEST(BenchReport, WorkIsCountedOverAttendedPairs) {
  const Args a = parse_ok({"--extent", "56x56", "--kernel", "7x7", "--heads", "4", "--dim", "32"});
  const Problem& p = a.problem;
  // 56 queries per axis, 7 keys each (windows shift inward at the borders): 56^2 * 49.
  EXPECT_EQ(p.attended_pairs(), 56 * 56 * 49);
  EXPECT_DOUBLE_EQ(pass_flops(p, Pass::kForward), 4.0 * 4 * 56 * 56 * 49 * 32);
  EXPECT_DOUBLE_EQ(pass_flops(p, Pass::kBackward), 2.5 * pass_flops(p, Pass::kForward));
  EXPECT_DOUBLE_EQ(pass_flops(p, Pass::kForwardBackward), 3.5 * pass_flops(p, Pass::kForward));
  EXPECT_DOUBLE_EQ(pass_bytes(p, Pass::kForward), p.forward_bytes());
  // backward: q, k, v, out, d_out read and dq, dk, dv written (8 tensors of
  // 56*56*4*32 floats), plus lse read.
  EXPECT_DOUBLE_EQ(pass_bytes(p, Pass::kBackward), 4.0 * (8 * 56 * 56 * 4 * 32 + 56 * 56 * 4));
}

TEST(BenchReport, SpeedOfLightIsTheSlowerOfComputeAndMemory) {
  Args a = parse_ok({"--extent", "56x56", "--kernel", "7x7", "--heads", "4", "--dim", "32", "--sol-tflops", "100",
                     "--sol-gbps", "1000"});
  Timings t = summarize({2.0, 1.0, 3.0});
  EXPECT_DOUBLE_EQ(t.median_ms, 2.0);
  EXPECT_DOUBLE_EQ(t.min_ms, 1.0);
  EXPECT_DOUBLE_EQ(t.max_ms, 3.0);
  const Metrics m = compute_metrics(a, t);
  const double flops_ms = m.flops / 100e12 * 1e3, bytes_ms = m.bytes / 1000e9 * 1e3;
  EXPECT_DOUBLE_EQ(*m.sol_ms, std::max(flops_ms, bytes_ms));
  EXPECT_DOUBLE_EQ(*m.sol_fraction, *m.sol_ms / 2.0);
  EXPECT_DOUBLE_EQ(m.tflops, m.flops / 2e-3 * 1e-12);
  a.sol_tflops.reset();
  a.sol_gbps.reset();
  EXPECT_FALSE(compute_metrics(a, t).sol_fraction.has_value());
}

// ---------------------------------------------------------------- the binary

struct Result {
  int exit_code;
  std::string output;  // stdout and stderr
};

Result run_bench(const std::string& args, bool with_stderr = true) {
  const std::string command = std::string(NBHD_BENCH_PATH) + " " + args + (with_stderr ? " 2>&1" : " 2>/dev/null");
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return {-1, "popen failed"};
  std::string output;
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof buf, pipe)) > 0;) output.append(buf, n);
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

// A backend that unfolds short dilation groups lists the parts it runs (the CPU
// build has none, so a BackendInfo stands in for one).
TEST(BenchDryRun, ListsTheUnfoldedParts) {
  Problem p;
  p.rank = 1;
  p.extent = {2048, 1, 1};
  p.kernel = {3, 1, 1};
  p.dilation = {520, 1, 1};
  p.dim = 64;
  const BackendInfo unfolding{Backend::kGemm, Device::kCUDA, true, true, /*unfolds_short_groups=*/true};
  const std::vector<std::string> lines = candidate_lines(p, unfolding);
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_NE(lines[0].find("unfolded"), std::string::npos) << lines[0];
  EXPECT_NE(lines[0].find("2 parts"), std::string::npos) << lines[0];
  EXPECT_NE(lines[1].find("extent=4x488 kernel=3x1"), std::string::npos) << lines[1];
  EXPECT_NE(lines[2].find("extent=3x32 kernel=3x1"), std::string::npos) << lines[2];
  p.dilation = {1, 1, 1};
  EXPECT_TRUE(candidate_lines(p, unfolding).empty());
}

TEST(BenchCli, BadArgumentsExitWithStatus2AndTheMessage) {
  Result r = run_bench("--extent 56x56 --kernel 7 --no-such-flag");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("unknown argument '--no-such-flag'"), std::string::npos) << r.output;

  r = run_bench("--extent 56x56 --kernel 70");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("kernel_size[axis 0] = 70"), std::string::npos) << r.output;

  r = run_bench("--extent 56x56 --kernel 7 --heads 6 --kv-heads 4");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("multiple of kv_heads"), std::string::npos) << r.output;

  r = run_bench("");
  EXPECT_EQ(r.exit_code, 2) << r.output;
}

TEST(BenchCli, HelpAndDryRun) {
  Result r = run_bench("--help");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.output.find("--extent"), std::string::npos);

  r = run_bench("--extent 56x56 --kernel 7 --heads 4 --dim 32 --dry-run");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("cpu"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("reference"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("can run"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("median"), std::string::npos) << "a dry run runs nothing:\n" << r.output;
}

TEST(BenchCli, JsonHasEveryKey) {
  const Result r = run_bench("--backend cpu --extent 12x10 --kernel 3x5 --heads 2 --dim 8 --iters 2 --warmup 0 "
                             "--verify --sol-tflops 1 --json",
                             /*with_stderr=*/false);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ASSERT_FALSE(r.output.empty());
  EXPECT_EQ(r.output.front(), '{') << "stdout holds only the JSON object:\n" << r.output;
  EXPECT_EQ(r.output[r.output.find_last_not_of('\n')], '}') << r.output;
  for (const char* key : {"problem", "rank", "extent", "kernel", "dilation", "stride", "causal", "batch", "heads",
                          "kv_heads", "dim", "dim_v", "dtype", "backend", "resolved_backend", "device",
                          "device_name", "pass", "time_ms", "median", "min", "max", "tflops", "gbps", "flops",
                          "bytes", "sol_fraction", "verified"})
    EXPECT_NE(r.output.find("\"" + std::string(key) + "\": "), std::string::npos) << key << " missing:\n" << r.output;
  EXPECT_NE(r.output.find("\"verified\": true"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("\"resolved_backend\": \"cpu\""), std::string::npos) << r.output;
}

TEST(BenchCli, JsonToAFileKeepsTheTextOnStdout) {
  const std::string file = ::testing::TempDir() + "nbhd_bench_cli_test.json";
  std::remove(file.c_str());
  const Result r = run_bench("--backend reference --extent 9 --kernel 3 --dim 4 --iters 1 --json " + file);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("median"), std::string::npos) << r.output;
  std::ifstream in(file);
  std::stringstream json;
  json << in.rdbuf();
  EXPECT_NE(json.str().find("\"resolved_backend\": \"reference\""), std::string::npos) << json.str();
  std::remove(file.c_str());
}

TEST(BenchCli, VerifyRefusesProblemsOverItsBudget) {
  const Result r = run_bench("--backend cpu --extent 2048x2048 --kernel 255 --dim 128 --verify");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--verify"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace nbhd::bench
