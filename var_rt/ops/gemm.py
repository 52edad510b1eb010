"""The transformers' linear layers: `linear` (F.linear) and `Linear` (nn.Linear calling it; same parameters and
names, so official state dicts load unchanged).

On the CPU the rows of a GEMM are padded with zeros to a multiple of ROW_MULTIPLE and the extra rows dropped.
Why: MKL computes a row of x @ W.T with different kernels depending on the number of rows M (M = 1, and the last
1-3 rows of each thread's block when M is small, take other code paths than its full-tile micro-kernel), so the
same row came out different in the last bit in a batch of 1 and a batch of 8 (measured: every VAR scale's logits
of an image differed by ~1e-6 between the two), and a Gumbel-max draw near a tie could flip. With M a multiple
of 16 every row went through the full-tile kernel and the logits of an image were bitwise equal whatever the
batch (MKL 2024.2, AVX-512, 1 to 16 threads; tests/test_batch_invariance.py holds the pipelines to it). This is
observed behaviour of the BLAS, not a documented guarantee. The padding costs one copy of x per call.

Elsewhere (CUDA, meta) this is F.linear itself: cuBLAS also chooses its kernel by M, so on a GPU an image's
logits can still depend on the batch in the last bits (see README, "Batch independence").
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ROW_MULTIPLE = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); on the CPU with the rows padded to a multiple of ROW_MULTIPLE (module docstring)."""
    if x.device.type != "cpu" or x.dim() == 0:
        return F.linear(x, weight, bias)
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    if M == 0:
        return F.linear(x, weight, bias)
    pad = (-M) % ROW_MULTIPLE
    rows = x.reshape(M, K)
    if pad:
        rows = torch.cat((rows, rows.new_zeros(pad, K)))
    y = F.linear(rows, weight, bias)
    return (y[:M] if pad else y).reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear through `linear` (same parameters, names and init)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
