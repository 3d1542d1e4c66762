// SPDX-License-Identifier: Apache-2.0
// Status: how every public entry point reports failure. No exception leaves the
// library; a message names the argument, the axis and the bound that was broken.
#pragma once

#include <string>
#include <utility>

namespace nbhd {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,  // a value out of its bounds (Python: ValueError)
  kTypeMismatch,     // wrong dtype or device (Python: TypeError)
  kUnsupported,      // valid problem this backend cannot run (Python: ValueError)
  kOutOfMemory,      // workspace allocation failed (Python: MemoryError)
  kDeviceError,      // the CUDA runtime reported an error (Python: RuntimeError)
  kInternal,         // a bug: please report (Python: RuntimeError)
};

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return {}; }
  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status invalid_argument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status type_mismatch(std::string m) { return {StatusCode::kTypeMismatch, std::move(m)}; }
inline Status unsupported(std::string m) { return {StatusCode::kUnsupported, std::move(m)}; }

// Return early from a function returning Status.
#define NBHD_RETURN_IF_ERROR(expr)              \
  do {                                          \
    ::nbhd::Status nbhd_status_ = (expr);       \
    if (!nbhd_status_.ok()) return nbhd_status_; \
  } while (0)

}  // namespace nbhd
