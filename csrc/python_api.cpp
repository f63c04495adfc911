// Python bindings of the native copy kernels: zmqdisagg.native._C.
//
// Python does the control (which pointers, which stream, how many CTAs); this module only moves bytes.
// Pointers and streams are plain integers (tensor.data_ptr(), stream.cuda_stream), so the module does
// not link against torch's C++ API and builds in seconds.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "copy.h"

namespace py = pybind11;

namespace {

void copy_list(const std::vector<std::tuple<uint64_t, uint64_t, uint64_t>>& entries, int blocks,
               uint64_t stream) {
  std::vector<ZdCopy> list;
  list.reserve(entries.size());
  for (const auto& [src, dst, nbytes] : entries)
    list.push_back(ZdCopy{reinterpret_cast<const void*>(src), reinterpret_cast<void*>(dst), nbytes});
  int err;
  {
    py::gil_scoped_release nogil;
    err = zd_copy_list(list.data(), static_cast<int>(list.size()), blocks, reinterpret_cast<void*>(stream));
  }
  if (err != 0) throw std::runtime_error(std::string("zmqdisagg copy kernel: ") + zd_error_string(err));
}

void register_copy(py::module_& m) {
  m.def("copy_list", &copy_list, py::arg("entries"), py::arg("blocks"), py::arg("stream"),
        "Copy (src, dst, nbytes) device ranges in one launch per 64 entries on `stream`.");
  m.def("chunk_bytes", &zd_chunk_bytes, "Bytes one CTA moves per step.");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "zmqdisagg native pack/unpack/SM-copy kernels";
  register_copy(m);
}
