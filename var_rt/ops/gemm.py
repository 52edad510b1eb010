"""The transformers' linear layers: `linear` (F.linear) and `Linear` (nn.Linear calling it; same parameters and
names, so official state dicts load unchanged).

On the CPU the rows of a GEMM are padded (zeros) to a multiple of ROW_MULTIPLE and the extra rows dropped.
Why: MKL computes a row of x @ W.T with other kernels when the row count M is not a multiple of 4 and small
(M = 1..3; with 2 threads also 5..7 and 9..11; with 16 threads odd counts up to ~30), so the same row came out
different in the last bit in a batch of 1 and in a batch of 8: an image's logits differed by ~1e-6 at every VAR
scale and every sequential LlamaGen pass (their GEMMs have M = 2B rows there), and a Gumbel-max draw near a tie
could flip. With M a multiple of 4, every row of every GEMM measured went through the same kernel (MKL 2024.2,
AVX-512, 1 to 16 threads, M up to 512) and an image's logits are bitwise equal whatever the batch
(tests/test_batch_invariance.py holds the pipelines to it). This is observed behaviour of the BLAS, not a
documented guarantee: another BLAS or CPU may need another multiple (the tests say so). Cost: a copy of x and
the GEMM of up to 3 extra rows, only when M is not a multiple of 4 (odd batches at VAR's first scale and in
LlamaGen's single-token passes): ~18 us a call, +20% for the 6-layer demo LlamaGen at batch 1, nothing at even
batches.

Elsewhere (CUDA, meta) this is F.linear itself: cuBLAS also chooses its kernel by M, so on a GPU an image's
logits can still depend on the batch in the last bits (see README, "Batch independence").
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ROW_MULTIPLE = 4


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
