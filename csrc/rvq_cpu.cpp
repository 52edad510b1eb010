// CPU loops for one residual-VQ step (see rvq.h). Plain C++17: per-plane loops the compiler vectorises, split over
// std::threads when the step is big enough (no OpenMP, so no second OpenMP runtime next to torch's).
#include "rvq.h"

#include <algorithm>
#include <atomic>
#include <string>
#include <thread>
#include <vector>

// A second, AVX2 copy of the hot loop picked at load time on x86-64 (no FMA, so both copies round alike).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(VAR_RT_NO_CLONES)
#define VRT_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VRT_VECTOR_CLONES
#endif

namespace var_rt {
namespace {

// Runs fn(i) for i in [0, n) on up to num_threads threads; serial when num_threads <= 1. Items are handed out one
// at a time from an atomic counter, so this thread keeps working even if a helper thread starts late.
template <typename Fn>
void parallel_for(int64_t n, int num_threads, Fn fn) {
  const int64_t nt = std::min<int64_t>(std::max(num_threads, 1), n);
  if (nt <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  };
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int64_t t = 1; t < nt; ++t) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
}

// f_hat[b, co] += (1 - resi) h[b, co] + resi (conv3x3(h[b])[co] + bias[co]) for co in [co0, co1).
// h[b] is first copied into a zero-padded (Cv, H+2, H+2) buffer; then each of the Cv*9 taps is ONE long contiguous
// multiply-add over the plane in padded row pitch (H+2): no bounds tests, so the compiler vectorises it. The two
// extra columns per row are computed and ignored. Summation order per pixel is (ci, ky, kx), in fp32 like torch.
VRT_VECTOR_CLONES
void conv_add_planes(const RvqArgs& a, int b, int co0, int co1, std::vector<float>& pad, std::vector<float>& acc) {
  const int H = a.H, Cv = a.Cv, W = H + 2;
  const int64_t HH = (int64_t)H * H;
  pad.assign((size_t)Cv * W * W, 0.f);
  const float* hb = a.scratch + (int64_t)b * Cv * HH;
  for (int ci = 0; ci < Cv; ++ci)
    for (int y = 0; y < H; ++y)
      std::copy(hb + ci * HH + y * H, hb + ci * HH + (y + 1) * H, pad.data() + ((int64_t)ci * W + y + 1) * W + 1);
  const int n = (H - 1) * W + H;  // flat span from pixel (0, 0) to pixel (H-1, H-1) in pitch W
  acc.resize((size_t)H * W);
  const float keep = (float)(1.0 - a.resi), r = (float)a.resi;
  for (int co = co0; co < co1; ++co) {
    float* __restrict o = acc.data();
    std::fill(o, o + n, 0.f);
    const float* w = a.phi_w + (int64_t)co * Cv * 9;
    for (int ci = 0; ci < Cv; ++ci) {
      for (int k = 0; k < 9; ++k) {
        const float wv = w[ci * 9 + k];
        const float* __restrict s = pad.data() + (int64_t)ci * W * W + (k / 3) * W + (k % 3);
        for (int p = 0; p < n; ++p) o[p] += wv * s[p];
      }
    }
    const float bias = a.phi_b[co];
    const float* h = hb + (int64_t)co * HH;
    float* f = a.f_hat + ((int64_t)b * Cv + co) * HH;
    for (int y = 0; y < H; ++y)
      for (int x = 0; x < H; ++x) f[y * H + x] += h[y * H + x] * keep + (o[y * W + x] + bias) * r;
  }
}

}  // namespace

std::string rvq_step_cpu(const RvqArgs& a, int num_threads) {
  const int B = a.B, Cv = a.Cv, H = a.H, pn = a.pn;
  if (B == 0 || Cv == 0) return "";
  for (int64_t i = 0, n = (int64_t)B * pn * pn; i < n; ++i) {  // checked first: nothing changes on a bad id
    if (a.idx[i] < 0 || a.idx[i] >= a.vocab)
      return "token id " + std::to_string(a.idx[i]) + " at flat position " + std::to_string(i) +
             " is out of range for a codebook of " + std::to_string(a.vocab) + " rows";
  }
  const int nt = std::min(256, std::max(1, num_threads));  // the caller decides whether a step is worth threads

  // gather + bicubic and the area-downsample are cheap next to the conv: the kernels' element code (rvq.h) does them
  const int64_t plane = (int64_t)H * H;
  parallel_for((int64_t)B * Cv, nt, [&](int64_t p) {
    for (int64_t i = p * plane; i < (p + 1) * plane; ++i) upsample_gather_elem(a, i);
  });
  // conv in tasks of (b, group of output channels): one padded copy of h[b] per task
  const int group = nt == 1 ? Cv : std::max(1, std::min(Cv, (Cv * B + 2 * nt - 1) / (2 * nt)));  // ~2 tasks/thread
  const int n_groups = (Cv + group - 1) / group;
  parallel_for((int64_t)B * n_groups, nt, [&](int64_t i) {
    thread_local std::vector<float> pad, acc;
    const int b = (int)(i / n_groups), co0 = (int)(i % n_groups) * group;
    conv_add_planes(a, b, co0, std::min(Cv, co0 + group), pad, acc);
  });
  if (a.pn_next > 0) {
    const int64_t row = (int64_t)a.pn_next * Cv;  // one row of tokens
    parallel_for((int64_t)B * a.pn_next, nt, [&](int64_t p) {
      for (int64_t i = p * row; i < (p + 1) * row; ++i) area_elem(a, i);
    });
  }
  return "";
}

std::string rvq_step_cpu_elementwise(const RvqArgs& a) {
  const int64_t n = (int64_t)a.B * a.Cv * a.H * a.H;
  for (int64_t i = 0; i < n; ++i) upsample_gather_elem(a, i);
  const float keep = (float)(1.0 - a.resi), r = (float)a.resi;
  for (int64_t i = 0; i < n; ++i) conv_add_elem(a, i, keep, r);
  if (a.pn_next > 0) {
    const int64_t m = (int64_t)a.B * a.pn_next * a.pn_next * a.Cv;
    for (int64_t i = 0; i < m; ++i) area_elem(a, i);
  }
  return "";
}

}  // namespace var_rt
