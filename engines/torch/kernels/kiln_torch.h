// What kiln's kernels use from torch (Tensor, the dtype constants and factories, TORCH_CHECK, at::parallel_for,
// pybind11 with torch's Tensor casters), without <torch/extension.h>.
//
// Why: <torch/extension.h> pulls in all of libtorch's C++ API (nn, optim, data, serialization, JIT), which is
// most of a kernel's compile time; these headers give the same declarations the kernels use in about half of it
// (each kernel and ISA level is its own g++ run, and CI compiles every one from scratch).
#pragma once

#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/types.h>

namespace py = pybind11;
