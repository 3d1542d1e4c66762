// SPDX-License-Identifier: Apache-2.0
// Umbrella header of the public C++ API.
#pragma once

#include "nbhd/api.hpp"
#include "nbhd/core/window.hpp"
#include "nbhd/dtype.hpp"
#include "nbhd/problem.hpp"
#include "nbhd/status.hpp"
#include "nbhd/tensor.hpp"
