// CUDA twin of rvq_cpu.cpp (see rvq.h). Three small kernels on the caller's stream: gather+bicubic into the
// scratch, conv3x3+blend into f_hat, area-downsample into the next scale's token rows. No allocation and no
// synchronisation, so the step can be captured in a CUDA graph. Linked against the static cudart: this file uses
// the runtime API only through calls that also work when the stream was created by another runtime (torch's).
#include "rvq.h"

#include <cuda_runtime.h>

#include <string>

namespace var_rt {
namespace {

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t n) { return (unsigned)((n + kThreads - 1) / kThreads); }

// The element functions live in rvq.h (shared with the host, where rvq_step_cpu_elementwise runs them for tests).
// Thread i computes element i; x (or c, for area) is fastest, so a warp reads and writes contiguous memory and,
// in conv_add, shares (b, co) and so reads the weights as one broadcast.
__global__ void upsample_gather_kernel(RvqArgs a, int64_t n) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) upsample_gather_elem(a, i);
}

__global__ void conv_add_kernel(RvqArgs a, int64_t n, float keep, float r) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) conv_add_elem(a, i, keep, r);
}

__global__ void area_kernel(RvqArgs a, int64_t n) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) area_elem(a, i);
}

std::string err_string(cudaError_t e, const char* what) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

}  // namespace

std::string rvq_step_cuda(const RvqArgs& a, uintptr_t stream_handle, int device) {
  if (a.B == 0 || a.Cv == 0) return "";
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  int prev = -1;
  cudaError_t e = cudaGetDevice(&prev);
  if (e != cudaSuccess) return err_string(e, "cudaGetDevice");
  if (prev != device && (e = cudaSetDevice(device)) != cudaSuccess) return err_string(e, "cudaSetDevice");

  const int64_t n = (int64_t)a.B * a.Cv * a.H * a.H;
  upsample_gather_kernel<<<grid_for(n), kThreads, 0, stream>>>(a, n);
  conv_add_kernel<<<grid_for(n), kThreads, 0, stream>>>(a, n, (float)(1.0 - a.resi), (float)a.resi);
  if (a.pn_next > 0) {
    const int64_t m = (int64_t)a.B * a.pn_next * a.pn_next * a.Cv;
    area_kernel<<<grid_for(m), kThreads, 0, stream>>>(a, m);
  }
  e = cudaGetLastError();  // launch-configuration errors only; never waits for the GPU
  if (prev != device) cudaSetDevice(prev);
  return e == cudaSuccess ? std::string() : err_string(e, "rvq_step_cuda launch");
}

std::string cuda_preload(int device) {
  int prev = -1;
  cudaError_t e = cudaGetDevice(&prev);
  if (e != cudaSuccess) return err_string(e, "cudaGetDevice");
  if (prev != device && (e = cudaSetDevice(device)) != cudaSuccess) return err_string(e, "cudaSetDevice");
  cudaFuncAttributes attr;
  const void* kernels[] = {(const void*)upsample_gather_kernel, (const void*)conv_add_kernel, (const void*)area_kernel};
  for (const void* k : kernels) {
    if ((e = cudaFuncGetAttributes(&attr, k)) != cudaSuccess) break;  // forces the lazy module load
  }
  if (prev != device) cudaSetDevice(prev);
  return e == cudaSuccess ? std::string() : err_string(e, "loading var_rt._C kernels");
}

int cuda_device_count(std::string* err) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (err) *err = err_string(e, "cudaGetDeviceCount");
    cudaGetLastError();  // clear it, so a later launch check does not report this one
    return 0;
  }
  return n;
}

int cuda_runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int cuda_driver_version() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

}  // namespace var_rt
