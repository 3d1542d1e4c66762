# SPDX-License-Identifier: Apache-2.0
"""The test infrastructure itself: what ctest counts as skipped."""

import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

SKIPPED = "[  SKIPPED ] FusedForwardSmoke.SmallProblems (0 ms)"
# A failing test whose message quotes the word must count as failed.
FAILED = "fused_test.cpp:42: Failure\nExpected: status == SKIPPED\n[  FAILED  ] FusedX.Y (3 ms)"


def cmake_files():
    return [ROOT / "CMakeLists.txt", *ROOT.glob("tests/**/CMakeLists.txt"), *ROOT.glob("cmake/*.cmake")]


def test_the_project_sets_no_skip_expression_of_its_own():
    # gtest_discover_tests sets GoogleTest's; a second one broke the generated test
    # lists under a newer CMake (every GPU test unlisted on an H100, 2026-12-06).
    for path in cmake_files():
        code = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        assert "SKIP_REGULAR_EXPRESSION" not in code, f"{path.relative_to(ROOT)} sets SKIP_REGULAR_EXPRESSION"


def test_only_googletests_skip_line_counts_as_skipped():
    """The expression CMake's gtest_discover_tests gives every test (the project needs
    CMake >= 3.25, whose GoogleTestAddTests.cmake sets it), against GoogleTest's skip
    line and a failure that quotes the word. Read where ctest reads it, the test files
    discovery wrote into a build directory, where one exists; else from the module,
    which writes it quoted (3.25) or as a bracket argument (newer releases)."""
    minimum = re.search(r"cmake_minimum_required\(VERSION (\d+)\.(\d+)", (ROOT / "CMakeLists.txt").read_text())
    assert (int(minimum.group(1)), int(minimum.group(2))) >= (3, 25)
    texts = [p.read_text() for p in sorted(ROOT.glob("build*/tests/**/*_tests.cmake"))[:4]]
    if not texts:
        cmake = shutil.which("cmake")
        if cmake is None:
            pytest.skip("no build directory and no cmake on PATH")
        root = subprocess.run([cmake, "--system-information"], capture_output=True, text=True, check=True).stdout
        cmake_root = re.search(r'^CMAKE_ROOT "([^"]+)"', root, re.M).group(1)
        texts = [pathlib.Path(cmake_root, "Modules", "GoogleTestAddTests.cmake").read_text()]
    found = []
    for text in texts:
        found += [q.replace("\\\\", "\\") for q in re.findall(r'SKIP_REGULAR_EXPRESSION\s+"((?:[^"\\]|\\.)*)"', text)]
        found += [b for _, b in re.findall(r"SKIP_REGULAR_EXPRESSION\s+\[(=*)\[(.*?)\]\1\]", text)]
    assert found, "CMake's gtest_discover_tests sets no SKIP_REGULAR_EXPRESSION: GPU tests would pass without a GPU"
    for regex in found:
        assert re.search(regex, SKIPPED), f"{regex!r} misses GoogleTest's skip line"
        assert not re.search(regex, FAILED), f"{regex!r} counts a failure that says SKIPPED as skipped"
