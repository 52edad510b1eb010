// var_rt._C: residual-VQ accumulation, one fused step per VAR scale (CPU loops + CUDA twin).
//
// Spec: var_rt.ops.rvq_step_ref. In place on f_hat (B, Cv, H, H) fp32:
//   h = codebook[idx] as (B, Cv, pn, pn)                     idx (B, pn*pn) int64, codebook (V, Cv)
//   h = bicubic(h, H x H) unless pn == H                       (torch F.interpolate, align_corners=False)
//   f_hat += (1 - resi) h + resi (conv3x3(h, phi_w, pad 1) + phi_b)     phi_w (Cv, Cv, 3, 3), phi_b (Cv,)
//   next (B, pn_next^2, Cv) = area(f_hat, pn_next) token-major      (adaptive_avg_pool2d windows)
// The upsampled h goes to a caller-given scratch (B, Cv, H, H) so nothing is allocated here.
//
// This header is the only file shared by the C++ and the CUDA halves: no torch, no pybind11. The per-element
// math (bicubic taps, area windows) is written once, host+device, so the CPU tests also cover the CUDA kernels.
#pragma once

#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define VRT_HD __host__ __device__ __forceinline__
#else
#define VRT_HD inline
#include <cmath>
#endif
#include <math.h>  // NAN

namespace var_rt {

// ---- bicubic (A = -0.75), exactly torch's upsample_bicubic2d with align_corners=False -------------------------
VRT_HD float cubic_conv1(float x, float A) { return ((A + 2.f) * x - (A + 3.f)) * x * x + 1.f; }           // |x| <= 1
VRT_HD float cubic_conv2(float x, float A) { return ((A * x - 5.f * A) * x + 8.f * A) * x - 4.f * A; }   // 1 < |x| < 2

// Source taps of output index `dst` (of out_size) into an axis of in_size: 4 clamped indices and weights.
VRT_HD void cubic_taps(int dst, int in_size, int out_size, int idx[4], float w[4]) {
  const float A = -0.75f;
  const float scale = (float)in_size / (float)out_size;            // torch: area_pixel_compute_scale, fp32
  const float src = scale * ((float)dst + 0.5f) - 0.5f;             // NOT clamped at 0 (cubic=true)
  const float fl = floorf(src);
  int i0 = (int)fl;
  if (i0 > in_size - 1) i0 = in_size - 1;                           // torch's guard_index_and_lambda
  float t = src - (float)i0;
  t = t < 0.f ? 0.f : (t > 1.f ? 1.f : t);
  w[0] = cubic_conv2(t + 1.f, A);
  w[1] = cubic_conv1(t, A);
  const float t2 = 1.f - t;
  w[2] = cubic_conv1(t2, A);
  w[3] = cubic_conv2(t2 + 1.f, A);
  for (int j = 0; j < 4; ++j) {
    int i = i0 - 1 + j;
    idx[j] = i < 0 ? 0 : (i > in_size - 1 ? in_size - 1 : i);
  }
}

// ---- area (adaptive_avg_pool2d) window [start, end) of output index o ------------------------------------------
VRT_HD int area_start(int o, int out_size, int in_size) { return (int)(((int64_t)o * in_size) / out_size); }
VRT_HD int area_end(int o, int out_size, int in_size) {
  return (int)(((int64_t)(o + 1) * in_size + out_size - 1) / out_size);
}

// ---- the op's arguments: raw pointers and sizes ----------------------------------------------------------------
struct RvqArgs {
  const int64_t* idx;      // (B, pn*pn)
  const float* codebook;   // (V, Cv)
  const float* phi_w;      // (Cv, Cv, 3, 3)
  const float* phi_b;      // (Cv,)
  float* f_hat;            // (B, Cv, H, H), updated in place
  float* scratch;          // (B, Cv, H, H), receives the upsampled h
  float* next;             // (B, pn_next*pn_next, Cv), or null when pn_next == 0
  int64_t vocab;           // V
  int B, Cv, H, pn, pn_next;  // pn_next == 0: last scale, no next written
  double resi;
};

// ---- one output element each: the bodies of the CUDA kernels (rvq_cuda.cu), also run on the host by
// rvq_step_cpu_elementwise so the CPU tests check the kernels' indexing and math too ---------------------------
#if defined(__CUDA_ARCH__)
#define VRT_LDG(p) __ldg(p)
#else
#define VRT_LDG(p) (*(p))
#endif

// scratch[i], i over (B, Cv, H, H): bicubic(codebook[idx[b]] as (pn, pn))[c, y, x], or h itself when pn == H.
// An id outside [0, vocab) yields NaN (a kernel cannot raise; this never reads out of bounds).
VRT_HD void upsample_gather_elem(const RvqArgs& a, int64_t i) {
  const int H = a.H, pn = a.pn, Cv = a.Cv;
  const int x = (int)(i % H), y = (int)((i / H) % H), c = (int)((i / ((int64_t)H * H)) % Cv);
  const int b = (int)(i / ((int64_t)H * H * Cv));
  const int64_t* ids = a.idx + (int64_t)b * pn * pn;
  auto tap = [&](int py, int px) -> float {  // h[b, c, py, px] = codebook[ids[py * pn + px], c]
    const int64_t id = VRT_LDG(ids + py * pn + px);
    return (id < 0 || id >= a.vocab) ? NAN : VRT_LDG(a.codebook + id * Cv + c);
  };
  if (pn == H) {
    a.scratch[i] = tap(y, x);
    return;
  }
  int ty[4], tx[4];
  float wy[4], wx[4];
  cubic_taps(y, pn, H, ty, wy);
  cubic_taps(x, pn, H, tx, wx);
  float out = 0.f;
  for (int j = 0; j < 4; ++j) {  // torch's order: each source row along x, then the rows along y
    float r = tap(ty[j], tx[0]) * wx[0];
    for (int k = 1; k < 4; ++k) r += tap(ty[j], tx[k]) * wx[k];
    out = j == 0 ? r * wy[0] : out + r * wy[j];
  }
  a.scratch[i] = out;
}

// f_hat[i], i over (B, Cv, H, H): += (1 - resi) h + resi (conv3x3(h, phi_w, pad 1) + phi_b), h = scratch.
VRT_HD void conv_add_elem(const RvqArgs& a, int64_t i, float keep, float r) {
  const int H = a.H, Cv = a.Cv;
  const int x = (int)(i % H), y = (int)((i / H) % H), co = (int)((i / ((int64_t)H * H)) % Cv);
  const int b = (int)(i / ((int64_t)H * H * Cv));
  const float* hb = a.scratch + (int64_t)b * Cv * H * H;
  const float* wco = a.phi_w + (int64_t)co * Cv * 9;
  float acc = 0.f;
  for (int ci = 0; ci < Cv; ++ci) {  // summation order (ci, ky, kx), as the CPU loops
    const float* in = hb + (int64_t)ci * H * H;
    const float* w = wco + ci * 9;
    for (int ky = 0; ky < 3; ++ky) {
      const int yy = y + ky - 1;
      if (yy < 0 || yy >= H) continue;
      for (int kx = 0; kx < 3; ++kx) {
        const int xx = x + kx - 1;
        if (xx < 0 || xx >= H) continue;
        acc += VRT_LDG(w + ky * 3 + kx) * in[yy * H + xx];
      }
    }
  }
  a.f_hat[i] += a.scratch[i] * keep + (acc + VRT_LDG(a.phi_b + co)) * r;
}

// next[i], i over (B, pn_next^2, Cv), c fastest: the mean of f_hat[b, c] over the area window of token o.
VRT_HD void area_elem(const RvqArgs& a, int64_t i) {
  const int P = a.pn_next, H = a.H, Cv = a.Cv;
  const int c = (int)(i % Cv);
  const int o = (int)((i / Cv) % ((int64_t)P * P));
  const int b = (int)(i / ((int64_t)Cv * P * P));
  const int oy = o / P, ox = o % P;
  const int y0 = area_start(oy, P, H), y1 = area_end(oy, P, H);
  const int x0 = area_start(ox, P, H), x1 = area_end(ox, P, H);
  const float* f = a.f_hat + ((int64_t)b * Cv + c) * H * H;
  float s = 0.f;
  for (int yy = y0; yy < y1; ++yy)
    for (int xx = x0; xx < x1; ++xx) s += f[yy * H + xx];
  a.next[i] = s / (float)((y1 - y0) * (x1 - x0));
}

// CPU: returns "" on success, else an error message (bad id: nothing was modified). Uses exactly num_threads
// threads (<= 1: this one only).
std::string rvq_step_cpu(const RvqArgs& a, int num_threads);
// The CUDA kernels' element functions run serially on the host (for tests: no GPU needed to check their math).
std::string rvq_step_cpu_elementwise(const RvqArgs& a);

#ifdef VAR_RT_WITH_CUDA
// CUDA: launches 2-3 kernels on `stream` (a cudaStream_t as an integer) on `device`; no allocation, no sync, so
// it can be captured in a CUDA graph. Out-of-range ids produce NaN rows instead of reading out of bounds.
// Returns "" on success, else the CUDA error string of the launch.
std::string rvq_step_cuda(const RvqArgs& a, uintptr_t stream, int device);
// Devices the CUDA runtime (linked statically) sees; 0 with no driver or a driver too old. *err gets the reason.
int cuda_device_count(std::string* err);
int cuda_runtime_version();
int cuda_driver_version();
// Loads the kernels on `device` now (CUDA loads them lazily, at first launch): call before any graph capture.
std::string cuda_preload(int device);
#endif

}  // namespace var_rt
