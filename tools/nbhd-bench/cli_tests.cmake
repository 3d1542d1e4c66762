# nbhd-bench's tests, included from tests/cpp/CMakeLists.txt (tests are registered
# after enable_testing()). All run on the CPU.

# The argument parser and report counts as unit tests, the binary through popen.
add_executable(bench_cli_test ${PROJECT_SOURCE_DIR}/tests/cpp/bench_cli_test.cpp)
target_link_libraries(bench_cli_test PRIVATE nbhd_bench_core GTest::gtest_main)
target_compile_definitions(bench_cli_test PRIVATE NBHD_BENCH_PATH="$<TARGET_FILE:nbhd-bench>")
add_dependencies(bench_cli_test nbhd-bench)
gtest_discover_tests(bench_cli_test DISCOVERY_TIMEOUT 60 PROPERTIES LABELS cpu)

# --verify smoke runs: nbhd-bench as the verifier, one problem each. Small enough that
# each takes well under a second.
set(nbhd_bench_quick --warmup 0 --iters 2 --verify)
set(nbhd_bench_smoke
  # The issue's done-when line.
  "done_when|--backend cpu --extent 56x56 --kernel 7x7 --heads 4 --dim 32"
  "rank1_causal_dilation_stride|--backend cpu --extent 200 --kernel 17 --dilation 3 --stride 4 --causal 1 --heads 2 --dim 16"
  "rank2_dilation_stride|--backend cpu --extent 23x30 --kernel 5x7 --dilation 2x3 --stride 2x3 --heads 2 --dim 16"
  "rank3_mixed_causal|--backend cpu --extent 6x10x12 --kernel 3x5x5 --stride 1x2x1 --causal 1x0x1 --dim 16"
  "gqa_additional_rpb|--backend cpu --extent 20x24 --kernel 5 --heads 8 --kv-heads 2 --additional 4 --rpb --dim 16 --dim-v 8"
  "float64_cpu|--backend cpu --extent 17x19 --kernel 5x3 --heads 2 --dim 16 --dtype float64"
  "float64_reference|--backend reference --extent 17x19 --kernel 5x3 --causal 0x1 --heads 2 --dim 16 --dtype float64"
  "float16_cpu|--backend cpu --extent 24x24 --kernel 7 --heads 2 --dim 32 --dtype float16"
  "bfloat16_cpu|--backend cpu --extent 24x24 --kernel 7 --heads 2 --dim 32 --dtype bfloat16"
  "reference_rank1|--backend reference --extent 300 --kernel 31 --stride 31 --heads 2 --dim 16"
  "auto_backend|--backend auto --extent 30x30 --kernel 7 --heads 2 --dim 32"
  "fwd_bwd_cpu|--backend cpu --extent 20x24 --kernel 5x7 --causal 1x0 --heads 4 --kv-heads 2 --dim 16 --pass fwd+bwd"
  "bwd_cpu_float64|--backend cpu --extent 40 --kernel 9 --dilation 2 --heads 2 --dim 16 --dtype float64 --additional 2 --pass bwd"
  "fwd_bwd_reference|--backend reference --extent 6x7x8 --kernel 3 --heads 2 --dim 8 --pass fwd+bwd --rpb"
  "query_box_cpu|--backend cpu --extent 20x16 --kernel 5x3 --dilation 2x1 --query-box 3:17x2:16 --rpb --heads 2 --dim 16 --pass fwd+bwd"
  "periodic_auto|--backend auto --extent 12x20 --kernel 5x7 --dilation 1x2 --stride 1x2 --periodic 0x1 --rpb --heads 2 --dim 16 --pass fwd+bwd"
  "sol_measured_bandwidth|--backend cpu --extent 20x24 --kernel 5 --heads 2 --dim 16 --sol-tflops 1 --sol-gbps measure"
)
foreach(entry IN LISTS nbhd_bench_smoke)
  string(REPLACE "|" ";" parts "${entry}")
  list(GET parts 0 name)
  list(GET parts 1 flags)
  separate_arguments(flags UNIX_COMMAND "${flags}")
  add_test(NAME nbhd_bench.verify.${name} COMMAND nbhd-bench ${flags} ${nbhd_bench_quick})
  set_tests_properties(nbhd_bench.verify.${name} PROPERTIES
    LABELS "cpu;bench" PASS_REGULAR_EXPRESSION "verified: PASS" FAIL_REGULAR_EXPRESSION "verified: FAIL|error:")
endforeach()
