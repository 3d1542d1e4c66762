// SPDX-License-Identifier: Apache-2.0
// nbhd._nbhd: the C++ API for Python. Arrays arrive by DLPack (numpy, torch CPU or
// CUDA, zero copy) as TensorRefs; outputs are allocated by the caller in its own
// framework; a failed Status becomes ValueError / TypeError / MemoryError / RuntimeError.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "nbhd/api.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// Any dtype, device, shape and strides; read-only arrays are fine for inputs.
using InputArray = nb::ndarray<nb::ro>;
using OutputArray = nb::ndarray<>;

[[noreturn]] void raise(PyObject* type, const std::string& message) {
  PyErr_SetString(type, message.c_str());
  throw nb::python_error();
}

void check(const nbhd::Status& status) {
  if (status.ok()) return;
  switch (status.code()) {
    case nbhd::StatusCode::kInvalidArgument:
    case nbhd::StatusCode::kUnsupported: raise(PyExc_ValueError, status.message());
    case nbhd::StatusCode::kTypeMismatch: raise(PyExc_TypeError, status.message());
    case nbhd::StatusCode::kOutOfMemory: raise(PyExc_MemoryError, status.message());
    default: raise(PyExc_RuntimeError, status.message());
  }
}

std::string python_type(nb::handle h) { return nb::type_name(h.type()).c_str(); }

nbhd::DType to_dtype(const char* name, nb::dlpack::dtype t) {
  using Code = nb::dlpack::dtype_code;
  if (t.lanes == 1) {
    if (t.code == uint8_t(Code::Float) && t.bits == 16) return nbhd::DType::kFloat16;
    if (t.code == uint8_t(Code::Float) && t.bits == 32) return nbhd::DType::kFloat32;
    if (t.code == uint8_t(Code::Float) && t.bits == 64) return nbhd::DType::kFloat64;
    if (t.code == uint8_t(Code::Bfloat) && t.bits == 16) return nbhd::DType::kBFloat16;
  }
  raise(PyExc_TypeError, std::string(name) + " has an unsupported dtype (DLPack code " + std::to_string(t.code) +
                             ", " + std::to_string(t.bits) +
                             " bits); nbhd takes float16, bfloat16, float32 and float64");
}

// The DType named `text` ("float16", ...); false when none is.
bool dtype_named(const std::string& text, nbhd::DType* out) {
  for (nbhd::DType t : {nbhd::DType::kFloat16, nbhd::DType::kBFloat16, nbhd::DType::kFloat32, nbhd::DType::kFloat64})
    if (text == nbhd::name(t)) {
      *out = t;
      return true;
    }
  return false;
}

// Holds the imported arrays alive while the library reads their memory.
class Arrays {
 public:
  Arrays() = default;
  // Arrays described by (shape, dtype name, device type, device index) instead of
  // imported: tensors with no memory (a framework's fake tensors while it traces
  // shapes), for the checks, which read no data.
  static Arrays described() {
    Arrays a;
    a.described_ = true;
    return a;
  }

  // An input, or an undefined TensorRef when `h` is None.
  nbhd::TensorRef input(const char* name, nb::handle h) {
    if (h.is_none()) return {};
    if (described_) return describe(name, h);
    InputArray a;
    if (!nb::try_cast(h, a, /*convert=*/false))
      raise(PyExc_TypeError, std::string(name) + " must be an array with DLPack support (numpy, torch), got " +
                                 python_type(h) +
                                 (python_type(h) == "torch.Tensor" ? " (detach it if it requires grad)" : ""));
    inputs_.push_back(a);
    return to_ref(name, a.data(), a);
  }

  nbhd::TensorRef output(const char* name, nb::handle h) {
    if (h.is_none()) return {};
    if (described_) return describe(name, h);
    OutputArray a;
    if (!nb::try_cast(h, a, /*convert=*/false))
      raise(PyExc_TypeError,
            std::string(name) + " must be a writable array with DLPack support, got " + python_type(h));
    outputs_.push_back(a);
    return to_ref(name, a.data(), a);
  }

 private:
  static nbhd::TensorRef describe(const char* name, nb::handle h) {
    const auto [shape, dtype, device, index] =
        nb::cast<std::tuple<std::vector<int64_t>, std::string, std::string, int>>(h);
    nbhd::TensorRef t;
    // Never read: check_forward / check_backward only need it non-null.
    t.data = reinterpret_cast<void*>(uintptr_t(256));
    if (!dtype_named(dtype, &t.dtype))
      raise(PyExc_TypeError, std::string(name) + " has dtype " + dtype +
                                 "; nbhd takes float16, bfloat16, float32 and float64");
    t.device = device == "cuda" ? nbhd::Device::kCUDA : nbhd::Device::kCPU;
    t.device_index = index;
    if (shape.size() > size_t(nbhd::kMaxTensorRank))
      raise(PyExc_ValueError, std::string(name) + " has " + std::to_string(shape.size()) + " dimensions; at most " +
                                  std::to_string(nbhd::kMaxTensorRank) + " are supported");
    t.ndim = int(shape.size());
    int64_t stride = 1;
    for (int i = t.ndim - 1; i >= 0; --i) {
      t.shape[i] = shape[size_t(i)];
      t.stride[i] = stride;
      stride *= std::max<int64_t>(shape[size_t(i)], 1);
    }
    return t;
  }

  template <class Array>
  static nbhd::TensorRef to_ref(const char* name, const void* data, const Array& a) {
    nbhd::TensorRef t;
    t.data = const_cast<void*>(data);
    t.dtype = to_dtype(name, a.dtype());
    if (a.device_type() == nb::device::cpu::value) {
      t.device = nbhd::Device::kCPU;
    } else if (a.device_type() == nb::device::cuda::value) {
      t.device = nbhd::Device::kCUDA;
    } else {
      raise(PyExc_TypeError, std::string(name) + " is on DLPack device type " + std::to_string(a.device_type()) +
                                 "; nbhd takes CPU and CUDA arrays");
    }
    t.device_index = a.device_id();
    if (a.ndim() > size_t(nbhd::kMaxTensorRank))
      raise(PyExc_ValueError, std::string(name) + " has " + std::to_string(a.ndim()) + " dimensions; at most " +
                                  std::to_string(nbhd::kMaxTensorRank) + " are supported");
    t.ndim = int(a.ndim());
    for (int i = 0; i < t.ndim; ++i) {
      t.shape[i] = int64_t(a.shape(size_t(i)));
      t.stride[i] = a.stride(size_t(i));
    }
    return t;
  }

  bool described_ = false;
  std::vector<InputArray> inputs_;
  std::vector<OutputArray> outputs_;
};

// The options of one call. `workspace`, when given, is a pair of Python callables
// (allocate(nbytes) -> device pointer as int, free(pointer)) that the CUDA backends
// take their scratch memory from: the torch adapter passes PyTorch's caching
// allocator on the call's device and stream, so the memory shows in
// torch.cuda.memory_allocated and reuses blocks PyTorch holds. Not copyable: the
// allocator's context points at this object.
class CallOptions {
 public:
  CallOptions(const std::string& backend, uintptr_t stream, bool deterministic, int num_threads,
              nb::handle workspace) {
    check(nbhd::parse_backend(backend, &options_.backend));
    options_.stream = reinterpret_cast<void*>(stream);
    options_.deterministic = deterministic;
    options_.num_threads = num_threads;
    if (workspace.is_none()) return;
    if (!nb::isinstance<nb::tuple>(workspace) || nb::len(workspace) != 2 ||
        !PyCallable_Check(workspace[0].ptr()) || !PyCallable_Check(workspace[1].ptr()))
      raise(PyExc_TypeError, "workspace must be None or a pair of callables (allocate(nbytes), free(pointer))");
    allocate_ = nb::borrow(workspace[0]);
    free_ = nb::borrow(workspace[1]);
    options_.allocator = {&CallOptions::allocate, &CallOptions::deallocate, this};
  }
  CallOptions(const CallOptions&) = delete;
  CallOptions& operator=(const CallOptions&) = delete;

  const nbhd::Options& get() const { return options_; }

 private:
  // Called by the library with the GIL released. A Python error (PyTorch's
  // out-of-memory) becomes a null pointer, which the library reports with the
  // size and purpose of the workspace.
  static void* allocate(std::size_t bytes, void* context) {
    nb::gil_scoped_acquire gil;
    try {
      return reinterpret_cast<void*>(nb::cast<uintptr_t>(static_cast<CallOptions*>(context)->allocate_(bytes)));
    } catch (const nb::python_error&) {
      return nullptr;
    }
  }
  static void deallocate(void* pointer, void* context) {
    nb::gil_scoped_acquire gil;
    try {
      static_cast<CallOptions*>(context)->free_(reinterpret_cast<uintptr_t>(pointer));
    } catch (nb::python_error& e) {
      e.discard_as_unraisable("nbhd workspace free");
    }
  }

  nbhd::Options options_;
  nb::object allocate_, free_;
};

// The problem's dtype is its first tensor's; the library checks the others against it.
nbhd::Problem typed(nbhd::Problem p, const nbhd::TensorRef& first) {
  p.dtype = first.dtype;
  return p;
}

// Runs `call` without the GIL, then raises on failure.
template <class F>
void run(F&& call) {
  nbhd::Status status;
  {
    nb::gil_scoped_release release;
    status = call();
  }
  check(status);
}

// An array argument that may be None (the default).
// (`auto`: the argument type carries the none() flag as a template parameter since
// nanobind 3, and the GPU machine's nanobind is 3.1 while the pinned one is 2.10.)
auto optional_array(const char* name) { return nb::arg(name).none() = nb::none(); }

nbhd::ForwardTensors forward_tensors(Arrays& a, nb::handle query, nb::handle key, nb::handle value, nb::handle out,
                                     nb::handle lse, nb::handle rpb, nb::handle additional_keys,
                                     nb::handle additional_values) {
  nbhd::ForwardTensors t;
  t.query = a.input("query", query);
  t.key = a.input("key", key);
  t.value = a.input("value", value);
  t.rpb = a.input("rpb", rpb);
  t.additional_keys = a.input("additional_keys", additional_keys);
  t.additional_values = a.input("additional_values", additional_values);
  t.out = a.output("out", out);
  t.lse = a.output("lse", lse);
  return t;
}

nbhd::BackwardTensors backward_tensors(Arrays& a, nb::handle query, nb::handle key, nb::handle value,
                                       nb::handle out, nb::handle lse, nb::handle d_out, nb::handle d_query,
                                       nb::handle d_key, nb::handle d_value, nb::handle rpb,
                                       nb::handle additional_keys, nb::handle additional_values, nb::handle d_rpb,
                                       nb::handle d_additional_keys, nb::handle d_additional_values,
                                       nb::handle d_lse) {
  nbhd::BackwardTensors t;
  t.query = a.input("query", query);
  t.key = a.input("key", key);
  t.value = a.input("value", value);
  t.out = a.input("out", out);
  t.lse = a.input("lse", lse);
  t.d_out = a.input("d_out", d_out);
  t.rpb = a.input("rpb", rpb);
  t.additional_keys = a.input("additional_keys", additional_keys);
  t.additional_values = a.input("additional_values", additional_values);
  t.d_query = a.output("d_query", d_query);
  t.d_key = a.output("d_key", d_key);
  t.d_value = a.output("d_value", d_value);
  t.d_rpb = a.output("d_rpb", d_rpb);
  t.d_additional_keys = a.output("d_additional_keys", d_additional_keys);
  t.d_additional_values = a.output("d_additional_values", d_additional_values);
  t.d_lse = a.input("d_lse", d_lse);
  return t;
}

#define NBHD_OPTION_ARGS                                                                           \
  "backend"_a = "auto", "stream"_a = 0, "deterministic"_a = false, "num_threads"_a = 0, \
      nb::arg("workspace").none() = nb::none()

}  // namespace

NB_MODULE(_nbhd, m) {
  m.doc() = "nbhd C++ library: neighborhood attention kernels (arrays cross by DLPack)";

  nb::class_<nbhd::Problem>(m, "Problem", "Everything that defines one call except the data (see problem.hpp).")
      .def(nb::init<>())
      .def_rw("rank", &nbhd::Problem::rank)
      .def_rw("extent", &nbhd::Problem::extent)
      .def_rw("kernel", &nbhd::Problem::kernel)
      .def_rw("dilation", &nbhd::Problem::dilation)
      .def_rw("stride", &nbhd::Problem::stride)
      .def_rw("causal", &nbhd::Problem::causal)
      .def_rw("periodic", &nbhd::Problem::periodic)
      .def_rw("batch", &nbhd::Problem::batch)
      .def_rw("heads", &nbhd::Problem::heads)
      .def_rw("kv_heads", &nbhd::Problem::kv_heads)
      .def_rw("dim", &nbhd::Problem::dim)
      .def_rw("dim_v", &nbhd::Problem::dim_v)
      .def_rw("scale", &nbhd::Problem::scale, nb::for_setter(nb::arg("scale").none()))
      .def_rw("additional_tokens", &nbhd::Problem::additional_tokens)
      .def_rw("has_rpb", &nbhd::Problem::has_rpb)
      .def_rw("query_begin", &nbhd::Problem::query_begin)
      .def_rw("query_end", &nbhd::Problem::query_end)
      .def_prop_rw(
          "dtype", [](const nbhd::Problem& p) { return std::string(nbhd::name(p.dtype)); },
          [](nbhd::Problem& p, const std::string& text) {
            if (!dtype_named(text, &p.dtype))
              raise(PyExc_ValueError, "dtype = '" + text + "' is not one of float16, bfloat16, float32, float64");
          },
          "Element type of q, k, v and out; the array functions set it from the query.")
      .def("validate", [](const nbhd::Problem& p) { check(p.validate()); },
           "Raise ValueError naming the argument, axis and bound if the problem is invalid.")
      .def("window_size", &nbhd::Problem::window_size)
      .def("softmax_scale", &nbhd::Problem::softmax_scale)
      .def("has_query_box", &nbhd::Problem::has_query_box)
      .def("attended_pairs", &nbhd::Problem::attended_pairs)
      .def("forward_flops", &nbhd::Problem::forward_flops)
      .def("__repr__", [](const nbhd::Problem& p) { return "Problem(" + p.to_string() + ")"; });

  m.def("built_backends", [] {
    nb::list out;
    for (const nbhd::BackendInfo& b : nbhd::built_backends()) {
      nb::dict d;
      d["name"] = nbhd::name(b.backend);
      d["device"] = nbhd::name(b.device);
      d["fused_ops"] = b.fused_ops;
      d["unfused_ops"] = b.unfused_ops;
      out.append(d);
    }
    return out;
  }, "Backends compiled in, best first: dicts with name, device, fused_ops, unfused_ops.");

  m.def("can_run", [](const std::string& backend, const nbhd::Problem& p, const std::string& device, bool backward) {
    nbhd::Backend b;
    check(nbhd::parse_backend(backend, &b));
    if (device != "cpu" && device != "cuda") raise(PyExc_ValueError, "device = '" + device + "' is not cpu or cuda");
    const nbhd::Status s = nbhd::can_run(b, p, device == "cpu" ? nbhd::Device::kCPU : nbhd::Device::kCUDA, backward);
    return s.ok() ? std::string() : s.message();
  }, "backend"_a, "problem"_a, "device"_a, "backward"_a = false,
     "Empty string if the backend can run the forward (with backward=True, the backward), else why not.");

  m.def("forward", [](const nbhd::Problem& p, nb::handle query, nb::handle key, nb::handle value, nb::handle out,
                      nb::handle lse, nb::handle rpb, nb::handle additional_keys, nb::handle additional_values,
                      const std::string& backend, uintptr_t stream, bool deterministic, int num_threads,
                      nb::handle workspace) {
    Arrays a;
    const nbhd::ForwardTensors t =
        forward_tensors(a, query, key, value, out, lse, rpb, additional_keys, additional_values);
    const CallOptions o(backend, stream, deterministic, num_threads, workspace);
    const nbhd::Problem typed_p = typed(p, t.query);
    run([&] { return nbhd::forward(typed_p, t, o.get()); });
  }, "problem"_a, "query"_a, "key"_a, "value"_a, "out"_a, optional_array("lse"), optional_array("rpb"),
     optional_array("additional_keys"), optional_array("additional_values"), NBHD_OPTION_ARGS);

  m.def("check_forward", [](const nbhd::Problem& p, nb::handle query, nb::handle key, nb::handle value,
                            nb::handle out, nb::handle lse, nb::handle rpb, nb::handle additional_keys,
                            nb::handle additional_values) {
    Arrays a = Arrays::described();
    const nbhd::ForwardTensors t =
        forward_tensors(a, query, key, value, out, lse, rpb, additional_keys, additional_values);
    check(nbhd::check_forward(typed(p, t.query), t));
  }, "problem"_a, "query"_a, "key"_a, "value"_a, "out"_a, optional_array("lse"), optional_array("rpb"),
     optional_array("additional_keys"), optional_array("additional_values"),
     "forward's checks on tensors described as (shape, dtype, device type, device index): raises as forward would.");

  m.def("backward", [](const nbhd::Problem& p, nb::handle query, nb::handle key, nb::handle value, nb::handle out,
                       nb::handle lse, nb::handle d_out, nb::handle d_query, nb::handle d_key, nb::handle d_value,
                       nb::handle rpb, nb::handle additional_keys, nb::handle additional_values, nb::handle d_rpb,
                       nb::handle d_additional_keys, nb::handle d_additional_values, nb::handle d_lse,
                       const std::string& backend, uintptr_t stream, bool deterministic, int num_threads,
                       nb::handle workspace) {
    Arrays a;
    const nbhd::BackwardTensors t =
        backward_tensors(a, query, key, value, out, lse, d_out, d_query, d_key, d_value, rpb, additional_keys,
                         additional_values, d_rpb, d_additional_keys, d_additional_values, d_lse);
    const CallOptions o(backend, stream, deterministic, num_threads, workspace);
    const nbhd::Problem typed_p = typed(p, t.query);
    run([&] { return nbhd::backward(typed_p, t, o.get()); });
  }, "problem"_a, "query"_a, "key"_a, "value"_a, "out"_a, "lse"_a, "d_out"_a, "d_query"_a, "d_key"_a, "d_value"_a,
     optional_array("rpb"), optional_array("additional_keys"), optional_array("additional_values"),
     optional_array("d_rpb"), optional_array("d_additional_keys"), optional_array("d_additional_values"),
     optional_array("d_lse"), NBHD_OPTION_ARGS);

  m.def("check_backward", [](const nbhd::Problem& p, nb::handle query, nb::handle key, nb::handle value,
                             nb::handle out, nb::handle lse, nb::handle d_out, nb::handle d_query, nb::handle d_key,
                             nb::handle d_value, nb::handle rpb, nb::handle additional_keys,
                             nb::handle additional_values, nb::handle d_rpb, nb::handle d_additional_keys,
                             nb::handle d_additional_values, nb::handle d_lse) {
    Arrays a = Arrays::described();
    const nbhd::BackwardTensors t =
        backward_tensors(a, query, key, value, out, lse, d_out, d_query, d_key, d_value, rpb, additional_keys,
                         additional_values, d_rpb, d_additional_keys, d_additional_values, d_lse);
    check(nbhd::check_backward(typed(p, t.query), t));
  }, "problem"_a, "query"_a, "key"_a, "value"_a, "out"_a, "lse"_a, "d_out"_a, "d_query"_a, "d_key"_a, "d_value"_a,
     optional_array("rpb"), optional_array("additional_keys"), optional_array("additional_values"),
     optional_array("d_rpb"), optional_array("d_additional_keys"), optional_array("d_additional_values"),
     optional_array("d_lse"),
     "backward's checks on tensors described as (shape, dtype, device type, device index): raises as backward would.");

  m.def("qk", [](const nbhd::Problem& p, nb::handle query, nb::handle key, nb::handle attn, nb::handle rpb,
                 nb::handle additional_keys, const std::string& backend, uintptr_t stream, bool deterministic,
                 int num_threads, nb::handle workspace) {
    Arrays a;
    nbhd::QkTensors t;
    t.query = a.input("query", query);
    t.key = a.input("key", key);
    t.rpb = a.input("rpb", rpb);
    t.additional_keys = a.input("additional_keys", additional_keys);
    t.attn = a.output("attn", attn);
    const CallOptions o(backend, stream, deterministic, num_threads, workspace);
    const nbhd::Problem typed_p = typed(p, t.query);
    run([&] { return nbhd::qk(typed_p, t, o.get()); });
  }, "problem"_a, "query"_a, "key"_a, "attn"_a, optional_array("rpb"), optional_array("additional_keys"),
     NBHD_OPTION_ARGS);

  m.def("qk_backward", [](const nbhd::Problem& p, nb::handle query, nb::handle key, nb::handle d_attn,
                          nb::handle d_query, nb::handle d_key, nb::handle additional_keys, nb::handle d_rpb,
                          nb::handle d_additional_keys, const std::string& backend, uintptr_t stream,
                          bool deterministic, int num_threads, nb::handle workspace) {
    Arrays a;
    nbhd::QkBackwardTensors t;
    t.query = a.input("query", query);
    t.key = a.input("key", key);
    t.d_attn = a.input("d_attn", d_attn);
    t.additional_keys = a.input("additional_keys", additional_keys);
    t.d_query = a.output("d_query", d_query);
    t.d_key = a.output("d_key", d_key);
    t.d_rpb = a.output("d_rpb", d_rpb);
    t.d_additional_keys = a.output("d_additional_keys", d_additional_keys);
    const CallOptions o(backend, stream, deterministic, num_threads, workspace);
    const nbhd::Problem typed_p = typed(p, t.query);
    run([&] { return nbhd::qk_backward(typed_p, t, o.get()); });
  }, "problem"_a, "query"_a, "key"_a, "d_attn"_a, "d_query"_a, "d_key"_a, optional_array("additional_keys"),
     optional_array("d_rpb"), optional_array("d_additional_keys"), NBHD_OPTION_ARGS);

  m.def("softmax", [](const nbhd::Problem& p, nb::handle attn, nb::handle probs, const std::string& backend,
                      uintptr_t stream, bool deterministic, int num_threads,
                      nb::handle workspace) {
    Arrays a;
    nbhd::SoftmaxTensors t;
    t.attn = a.input("attn", attn);
    t.probs = a.output("probs", probs);
    const CallOptions o(backend, stream, deterministic, num_threads, workspace);
    const nbhd::Problem typed_p = typed(p, t.attn);
    run([&] { return nbhd::softmax(typed_p, t, o.get()); });
  }, "problem"_a, "attn"_a, "probs"_a, NBHD_OPTION_ARGS);

  m.def("softmax_backward", [](const nbhd::Problem& p, nb::handle probs, nb::handle d_probs, nb::handle d_attn,
                               const std::string& backend, uintptr_t stream, bool deterministic, int num_threads,
                               nb::handle workspace) {
    Arrays a;
    nbhd::SoftmaxBackwardTensors t;
    t.probs = a.input("probs", probs);
    t.d_probs = a.input("d_probs", d_probs);
    t.d_attn = a.output("d_attn", d_attn);
    const CallOptions o(backend, stream, deterministic, num_threads, workspace);
    const nbhd::Problem typed_p = typed(p, t.probs);
    run([&] { return nbhd::softmax_backward(typed_p, t, o.get()); });
  }, "problem"_a, "probs"_a, "d_probs"_a, "d_attn"_a, NBHD_OPTION_ARGS);

  m.def("av", [](const nbhd::Problem& p, nb::handle probs, nb::handle value, nb::handle out,
                 nb::handle additional_values, const std::string& backend, uintptr_t stream, bool deterministic,
                 int num_threads, nb::handle workspace) {
    Arrays a;
    nbhd::AvTensors t;
    t.probs = a.input("probs", probs);
    t.value = a.input("value", value);
    t.additional_values = a.input("additional_values", additional_values);
    t.out = a.output("out", out);
    const CallOptions o(backend, stream, deterministic, num_threads, workspace);
    const nbhd::Problem typed_p = typed(p, t.probs);
    run([&] { return nbhd::av(typed_p, t, o.get()); });
  }, "problem"_a, "probs"_a, "value"_a, "out"_a, optional_array("additional_values"), NBHD_OPTION_ARGS);

  m.def("av_backward", [](const nbhd::Problem& p, nb::handle probs, nb::handle value, nb::handle d_out,
                          nb::handle d_probs, nb::handle d_value, nb::handle additional_values,
                          nb::handle d_additional_values, const std::string& backend, uintptr_t stream,
                          bool deterministic, int num_threads, nb::handle workspace) {
    Arrays a;
    nbhd::AvBackwardTensors t;
    t.probs = a.input("probs", probs);
    t.value = a.input("value", value);
    t.d_out = a.input("d_out", d_out);
    t.additional_values = a.input("additional_values", additional_values);
    t.d_probs = a.output("d_probs", d_probs);
    t.d_value = a.output("d_value", d_value);
    t.d_additional_values = a.output("d_additional_values", d_additional_values);
    const CallOptions o(backend, stream, deterministic, num_threads, workspace);
    const nbhd::Problem typed_p = typed(p, t.probs);
    run([&] { return nbhd::av_backward(typed_p, t, o.get()); });
  }, "problem"_a, "probs"_a, "value"_a, "d_out"_a, "d_probs"_a, "d_value"_a, optional_array("additional_values"),
     optional_array("d_additional_values"), NBHD_OPTION_ARGS);
}
