"""What VARPipeline and LlamaGenPipeline share: dtype, device and backend resolution, class-id and seed checks,
the KV pool per batch, running a generation (captured CUDA graph, or eagerly with a progress bar), and decoding in
fixed-size chunks (DECODE_CHUNK: an image's bytes do not depend on the batch it was drawn in).

Backend: resolved once at construction (`ops.resolve_backend`: None -> VAR_RT_BACKEND, else "fast" on CUDA,
"torch" elsewhere) and stored per pipeline; every model and decoder call of a pipeline runs inside
`ops.use_backend(self.backend)` (a ContextVar), so two pipelines with different backends never affect each other.
"""
from __future__ import annotations

import operator

import torch

from var_rt import ops
from var_rt.runtime.graphs import GraphCache
from var_rt.runtime.kv_pool import KVPool
from var_rt.runtime.settings import SamplingSettings

__all__ = ["PipelineBase", "SamplingSettings", "resolve_dtype", "image_seeds", "check_class_labels", "check_seeds",
           "check_device", "check_int"]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype, device=None) -> torch.dtype:
    """A torch dtype or a name (fp32 | bf16 | fp16 and long forms); None: bf16 on a CUDA device, fp32 elsewhere
    (as the command line)."""
    if dtype is None:
        return torch.bfloat16 if device is not None and torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(set(DTYPES))}")
    return DTYPES[dtype]


def check_device(device) -> torch.device:
    """torch.device(device) for 'cpu', 'cuda' or 'cuda:N' that exists here, or a ValueError saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: no CUDA device is available (use 'cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    return dev


def as_int(value, name: str) -> int:
    """An int (not a bool; numpy / torch integers too), or a ValueError naming `name`."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name}={value!r}: expected an int") from None


def check_int(value, name: str, lo: int = 1, hi: int | None = None) -> int:
    """An int (not a bool) in [lo, hi], or a ValueError naming `name`."""
    value = as_int(value, name)
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name}={value}: expected " + (f"{lo}..{hi}" if hi is not None else f"an int >= {lo}"))
    return value


# Images are decoded in chunks of a fixed size: the last chunk of a call is padded with copies of its last latent
# (dropped afterwards) and every chunk is a fresh NCHW-contiguous tensor, so every decoder call has the same shape,
# strides and alignment whatever the batch. oneDNN and cuDNN choose conv algorithms (MKL its GEMM kernels) by
# shape, and the same image decoded in batches of different sizes differed in the last bit (uint8 pixels off by 1
# here and there); decoded this way an image's bytes do not depend on the batch it came in.
# CPU: 1 image per call (the same call for a given latent, by construction) for images over 64 px; 4 for small
# ones (SHAPES-10's 32 px), where a decoder call is mostly per-op overhead (chunks of 1 cost +5..25% end to end
# there). CUDA: 8 (a call of fewer pads to 8: at batch 1 the decoder's cost is launches, not work). With a chunk
# over 1 an image's bytes also rely on a kernel computing each image of a batch the same way wherever it sits in
# it (true of the per-image and row-tiled kernels used; tests/test_batch_invariance.py checks it on the CPU).
DECODE_CHUNK = {"cpu": 1, "cuda": 8}
DECODE_CHUNK_SMALL = {"cpu": 4, "cuda": 8}  # images of at most SMALL_IMAGE x SMALL_IMAGE pixels
SMALL_IMAGE = 64


def decode_chunk_size(device, image_size: int | None = None) -> int:
    """Images per decoder call on `device` for images of `image_size` pixels (see DECODE_CHUNK)."""
    table = DECODE_CHUNK_SMALL if image_size is not None and image_size <= SMALL_IMAGE else DECODE_CHUNK
    return table.get(torch.device(device).type, 1)


def decode_in_chunks(fn, x: torch.Tensor, chunk: int, bar=None) -> torch.Tensor:
    """fn over x (B, ...) in chunks of exactly `chunk` rows (see DECODE_CHUNK): the last one padded with copies of
    its last row, whose outputs are dropped. bar: a tqdm bar advanced by the images of each chunk, or None.
    No host sync (CUDA-graph safe)."""
    outs = []
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk]
        n = part.shape[0]
        if n < chunk:
            part = torch.cat((part, part[-1:].expand(chunk - n, *part.shape[1:])))
        part = part.clone(memory_format=torch.contiguous_format)  # fresh, NCHW-contiguous: same layout always
        outs.append(fn(part)[:n])
        if bar is not None:
            bar.update(n)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def image_seeds(seed: int, indices) -> torch.Tensor:
    """Per-image seeds: a function of (global seed, image index) only."""
    return torch.tensor([ops.mix_seed(int(seed), int(i)) for i in indices], dtype=torch.int64)


def check_class_labels(class_labels, num_classes: int) -> torch.Tensor:
    """(B,) int64 class ids, or a ValueError naming what is wrong (empty, not integers, out of range)."""
    labels = torch.as_tensor(list(class_labels) if not torch.is_tensor(class_labels) else class_labels).flatten()
    if labels.numel() == 0:
        raise ValueError("class_labels is empty: give at least one class id")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"class ids must be integers, got {labels.dtype}")
    bad = [int(x) for x in labels if not 0 <= int(x) < num_classes]
    if bad:
        raise ValueError(f"class ids {bad} outside [0, {num_classes})")
    return labels.long()


def check_seeds(n: int, seed=0, seeds=None) -> torch.Tensor:
    """(n,) int64 per-image seeds on the CPU: image i gets mix_seed(seed, i), or explicit `seeds` (one integer per
    image, overriding `seed`)."""
    if seeds is None:
        return image_seeds(as_int(seed, "seed"), range(n))
    try:
        s = torch.as_tensor(seeds)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ValueError(f"seeds: expected one integer (int64) per image, got {seeds!r:.60}") from None
    if s.dtype.is_floating_point or s.dtype.is_complex or s.dtype == torch.bool:
        raise ValueError(f"seeds must be integers, got {s.dtype}")
    s = s.to(torch.int64).flatten().cpu()
    if s.numel() != n:
        raise ValueError(f"{s.numel()} seeds for {n} images")
    return s


class PipelineBase:
    """Shared state and plumbing of the pipelines. A subclass calls `_init_base(device, backend)` and defines
    `num_classes`."""

    def _init_base(self, device, backend) -> None:
        self.device = torch.device(device)
        self.backend = backend                      # resolved by the setter
        self._pools: dict = {}                      # batch (KV rows) -> KVPool
        self._graphs: GraphCache | None = None
        self.use_graphs = self.device.type == "cuda"  # whole-generation CUDA graphs, eager fallback
        self.last_tokens = None
        self.last_stats: dict = {}
        self.last_forward_passes: int | None = None
        self._decode_chunk: int | None = None  # None: decode_chunk_size(device, image_size)

    @property
    def backend(self) -> str:
        """'torch' or 'fast', resolved at construction; assigning a name (or None) resolves it again."""
        return self._backend

    @backend.setter
    def backend(self, name) -> None:
        self._backend = ops.resolve_backend(name, self.device)

    # ---- checks -------------------------------------------------------------------------------------------------
    def check_labels(self, class_labels) -> torch.Tensor:
        return check_class_labels(class_labels, self.num_classes)

    # ---- the KV pool --------------------------------------------------------------------------------------------
    def _kv_pool(self, rows: int, shapes, dtype: torch.dtype, share: bool = True) -> KVPool:
        """One arena per batch (`rows`); shapes() -> {model: [per-layer KV shape]}, called when one is built.
        Captured graphs point into their arenas, so with graphs every batch keeps its own; without, only the
        latest is kept."""
        if rows not in self._pools:
            if not self.use_graphs:
                self._pools.clear()
            layer_shapes = shapes()
            try:
                self._pools[rows] = KVPool(layer_shapes, dtype, self.device, share=share)
            except torch.cuda.OutOfMemoryError:
                need = max(KVPool.bytes_needed(layer_shapes, dtype).values()) / 2**30
                raise MemoryError(f"batch {rows} is too large: its KV cache alone needs {need:.1f} GiB; "
                                  "use a smaller batch") from None
        return self._pools[rows]

    @property
    def decode_chunk(self) -> int:
        """Images per decoder call (DECODE_CHUNK): a constant of the device and the image size. Setting it changes
        the decoded bytes in the last bit (and is then part of what they depend on); None restores the default."""
        if self._decode_chunk is not None:
            return self._decode_chunk
        return decode_chunk_size(self.device, self.image_size)

    @decode_chunk.setter
    def decode_chunk(self, n) -> None:
        self._decode_chunk = None if n is None else check_int(n, "decode_chunk", 1)

    # ---- decoding ---------------------------------------------------------------------------------------------------
    def _decode(self, fn, x: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """fn (one decoder call) over x in chunks of self.decode_chunk, on this pipeline's backend; with `progress`
        a tqdm bar of images (decode_in_chunks)."""
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=x.shape[0], desc="decode", unit="img", leave=False)
        try:
            with ops.use_backend(self._backend):
                return decode_in_chunks(fn, x, self.decode_chunk, bar)
        finally:
            if bar is not None:
                bar.close()

    # ---- running a generation -------------------------------------------------------------------------------------
    def _generate(self, key, fn, labels, seeds, *, capture: bool, progress: bool, total: int, desc: str, unit: str):
        """fn(labels, seeds, bar) -> tuple of tensors, inside this pipeline's backend. With graphs (CUDA) and
        `capture`, one graph per key replays it (eager where this run cannot be captured, see GraphCache);
        otherwise eagerly, with a tqdm bar of `total` steps when `progress`."""
        with ops.use_backend(self._backend):
            if self.use_graphs and capture:
                if self._graphs is None:
                    self._graphs = GraphCache(self.device)
                return self._graphs.run(key, lambda lab, sd: fn(lab, sd, None), labels, seeds, backend=self._backend)
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
            try:
                return fn(labels, seeds, bar)
            finally:
                if bar is not None:
                    bar.close()
