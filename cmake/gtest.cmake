# GoogleTest: the system's (scripts/setup installs libgtest-dev), else a source
# tree carried to machines without network (scripts/carry copies one to .carry/).
find_package(GTest QUIET)
if(NOT GTest_FOUND)
  set(NBHD_GTEST_SOURCE_DIR "${PROJECT_SOURCE_DIR}/.carry/googletest" CACHE PATH "GoogleTest source tree")
  if(NOT EXISTS ${NBHD_GTEST_SOURCE_DIR}/CMakeLists.txt)
    message(FATAL_ERROR "GoogleTest not found: run scripts/setup (installs libgtest-dev) or set NBHD_GTEST_SOURCE_DIR")
  endif()
  set(INSTALL_GTEST OFF CACHE BOOL "" FORCE)
  add_subdirectory(${NBHD_GTEST_SOURCE_DIR} ${CMAKE_BINARY_DIR}/googletest EXCLUDE_FROM_ALL)
  add_library(GTest::gtest ALIAS gtest)
  add_library(GTest::gtest_main ALIAS gtest_main)
endif()
