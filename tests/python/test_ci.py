# SPDX-License-Identifier: Apache-2.0
"""The test infrastructure itself: what ctest counts as skipped."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def skip_patterns():
    """(file, regex) of every SKIP_REGULAR_EXPRESSION in the project's CMake files, as
    ctest sees it (CMake's string escapes undone)."""
    found = []
    for path in [ROOT / "CMakeLists.txt", *ROOT.glob("tests/**/CMakeLists.txt"), *ROOT.glob("cmake/*.cmake")]:
        for m in re.finditer(r'SKIP_REGULAR_EXPRESSION\s+"((?:[^"\\]|\\.)*)"', path.read_text()):
            found.append((path.relative_to(ROOT), m.group(1).replace("\\\\", "\\")))
    return found


def test_only_googletests_skip_line_counts_as_skipped():
    patterns = skip_patterns()
    assert patterns, "no SKIP_REGULAR_EXPRESSION found: the GPU tests would count as passed without a GPU"
    skipped = "[  SKIPPED ] FusedForwardSmoke.SmallProblems (0 ms)"
    # A failing test whose message quotes the word must count as failed.
    failed = "fused_test.cpp:42: Failure\nExpected: status == SKIPPED\n[  FAILED  ] FusedX.Y (3 ms)"
    for path, regex in patterns:
        assert re.search(regex, skipped), f"{path}: {regex!r} misses GoogleTest's skip line"
        assert not re.search(regex, failed), f"{path}: {regex!r} counts a failure that says SKIPPED as skipped"
