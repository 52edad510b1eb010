// pybind11 module var_rt._C. Pointers arrive as Python ints (tensor.data_ptr()), the CUDA stream as an int
// (torch.cuda.current_stream().cuda_stream); var_rt/_ext.py checks dtypes, shapes, devices and contiguity first.
// Nothing here knows about torch, so the module builds and imports without a CUDA torch, GPU or driver.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "rvq.h"

namespace py = pybind11;
using var_rt::RvqArgs;

namespace {

RvqArgs make_args(uintptr_t idx, uintptr_t codebook, int64_t vocab, uintptr_t phi_w, uintptr_t phi_b, uintptr_t f_hat,
                  uintptr_t scratch, uintptr_t next, int B, int Cv, int H, int pn, int pn_next, double resi) {
  if (B < 0 || Cv < 0 || H < 1 || pn < 1 || pn_next < 0 || vocab < 1)
    throw py::value_error("rvq_step: need B >= 0, Cv >= 0, H >= 1, pn >= 1, pn_next >= 0 (0 = none), vocab >= 1");
  if ((B > 0 && Cv > 0) && (!idx || !codebook || !phi_w || !phi_b || !f_hat || !scratch || (pn_next > 0 && !next)))
    throw py::value_error("rvq_step: null pointer");
  RvqArgs a;
  a.idx = reinterpret_cast<const int64_t*>(idx);
  a.codebook = reinterpret_cast<const float*>(codebook);
  a.phi_w = reinterpret_cast<const float*>(phi_w);
  a.phi_b = reinterpret_cast<const float*>(phi_b);
  a.f_hat = reinterpret_cast<float*>(f_hat);
  a.scratch = reinterpret_cast<float*>(scratch);
  a.next = pn_next > 0 ? reinterpret_cast<float*>(next) : nullptr;
  a.vocab = vocab;
  a.B = B, a.Cv = Cv, a.H = H, a.pn = pn, a.pn_next = pn_next;
  a.resi = resi;
  return a;
}

void rvq_step_cpu_py(uintptr_t idx, uintptr_t codebook, int64_t vocab, uintptr_t phi_w, uintptr_t phi_b,
                     uintptr_t f_hat, uintptr_t scratch, uintptr_t next, int B, int Cv, int H, int pn, int pn_next,
                     double resi, int num_threads) {
  const RvqArgs a = make_args(idx, codebook, vocab, phi_w, phi_b, f_hat, scratch, next, B, Cv, H, pn, pn_next, resi);
  std::string err;
  {
    py::gil_scoped_release nogil;  // pure loops over caller-owned memory
    err = var_rt::rvq_step_cpu(a, num_threads);
  }
  if (!err.empty()) throw py::index_error("rvq_step_cpu: " + err);
}

void rvq_step_elementwise_py(uintptr_t idx, uintptr_t codebook, int64_t vocab, uintptr_t phi_w, uintptr_t phi_b,
                             uintptr_t f_hat, uintptr_t scratch, uintptr_t next, int B, int Cv, int H, int pn,
                             int pn_next, double resi) {
  const RvqArgs a = make_args(idx, codebook, vocab, phi_w, phi_b, f_hat, scratch, next, B, Cv, H, pn, pn_next, resi);
  py::gil_scoped_release nogil;
  var_rt::rvq_step_cpu_elementwise(a);
}

#ifdef VAR_RT_WITH_CUDA
void rvq_step_cuda_py(uintptr_t idx, uintptr_t codebook, int64_t vocab, uintptr_t phi_w, uintptr_t phi_b,
                      uintptr_t f_hat, uintptr_t scratch, uintptr_t next, int B, int Cv, int H, int pn, int pn_next,
                      double resi, uintptr_t stream, int device) {
  const RvqArgs a = make_args(idx, codebook, vocab, phi_w, phi_b, f_hat, scratch, next, B, Cv, H, pn, pn_next, resi);
  const std::string err = var_rt::rvq_step_cuda(a, stream, device);
  if (!err.empty()) throw std::runtime_error(err);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "var_rt._C: fused residual-VQ step (gather, bicubic, Phi conv, accumulate, area-downsample); CPU + CUDA";

  m.def("rvq_step_cpu", &rvq_step_cpu_py, py::arg("idx"), py::arg("codebook"), py::arg("vocab"), py::arg("phi_w"),
        py::arg("phi_b"), py::arg("f_hat"), py::arg("scratch"), py::arg("next"), py::arg("B"), py::arg("Cv"),
        py::arg("H"), py::arg("pn"), py::arg("pn_next"), py::arg("resi"), py::arg("num_threads") = 1,
        "One residual-VQ step on host memory (raw pointers). pn_next=0: last scale, `next` unused. "
        "Raises IndexError, before touching anything, if an id is outside [0, vocab).");

  m.def("rvq_step_cpu_elementwise", &rvq_step_elementwise_py, py::arg("idx"), py::arg("codebook"), py::arg("vocab"),
        py::arg("phi_w"), py::arg("phi_b"), py::arg("f_hat"), py::arg("scratch"), py::arg("next"), py::arg("B"),
        py::arg("Cv"), py::arg("H"), py::arg("pn"), py::arg("pn_next"), py::arg("resi"),
        "For tests: the CUDA kernels' per-element code run serially on host memory (same arguments as "
        "rvq_step_cpu, no threads). Out-of-range ids give NaN rows, as on the GPU.");

#ifdef VAR_RT_WITH_CUDA
  m.def("rvq_step_cuda", &rvq_step_cuda_py, py::arg("idx"), py::arg("codebook"), py::arg("vocab"), py::arg("phi_w"),
        py::arg("phi_b"), py::arg("f_hat"), py::arg("scratch"), py::arg("next"), py::arg("B"), py::arg("Cv"),
        py::arg("H"), py::arg("pn"), py::arg("pn_next"), py::arg("resi"), py::arg("stream"), py::arg("device"),
        "One residual-VQ step on device memory, launched on `stream` (a cudaStream_t as int) of `device`; "
        "no allocation, no sync (CUDA-graph safe). Out-of-range ids give NaN rows.");
  m.def("has_cuda", [] { return true; }, "True: the CUDA kernels were compiled in.");
  m.def("cuda_device_count", [] { return var_rt::cuda_device_count(nullptr); },
        "GPUs the statically linked CUDA runtime sees; 0 (not a crash) without a GPU or driver.");
  m.def("cuda_error", [] {
        std::string err;
        var_rt::cuda_device_count(&err);
        return err;
      }, "Why cuda_device_count() is 0 ('' when it is not).");
  m.def("cuda_preload", [](int device) { return var_rt::cuda_preload(device); }, py::arg("device"),
        "Loads the kernels on `device` now ('' or the error): do it before capturing a CUDA graph.");
  m.def("cuda_runtime_version", &var_rt::cuda_runtime_version, "CUDA runtime version compiled in (e.g. 13000).");
  m.def("cuda_driver_version", &var_rt::cuda_driver_version, "Driver's CUDA version, 0 without a driver.");
#else
  m.def("has_cuda", [] { return false; }, "False: built without nvcc, CPU only.");
  m.def("cuda_device_count", [] { return 0; }, "0: built without CUDA.");
  m.def("cuda_error", [] { return std::string("var_rt._C was built without CUDA (no nvcc, or VAR_RT_CUDA=0)"); });
  m.def("cuda_preload", [](int) { return std::string("var_rt._C was built without CUDA"); }, py::arg("device"));
  m.def("cuda_runtime_version", [] { return 0; });
  m.def("cuda_driver_version", [] { return 0; });
#endif
}
