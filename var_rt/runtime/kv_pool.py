"""One preallocated KV arena; every layer of every model gets a view, and phases that never overlap in time
(CoDe's drafter, then its refiner) share the same bytes. No torch.cat in the hot loop."""
from __future__ import annotations

import math

import torch


class KVPool:
    def __init__(self, layer_shapes: dict[str, list[tuple]], dtype: torch.dtype, device, share: bool = True):
        """layer_shapes: model name -> per-layer KV shapes. share=True: models run one after the other, so the
        arena is as big as the largest model's cache; share=False: the sum."""
        self.dtype, self.device = dtype, torch.device(device)
        sizes = {m: sum(math.prod(s) for s in shapes) for m, shapes in layer_shapes.items()}
        self.numel_per_model = sizes
        total = max(sizes.values()) if share else sum(sizes.values())
        self.arena = torch.zeros(total, dtype=dtype, device=self.device)
        self.views: dict[str, list[torch.Tensor]] = {}
        offset = 0
        for m, shapes in layer_shapes.items():
            base = 0 if share else offset
            views = []
            for s in shapes:
                n = math.prod(s)
                views.append(self.arena[base:base + n].view(s))
                base += n
            self.views[m] = views
            offset = base

    @staticmethod
    def bytes_needed(layer_shapes: dict[str, list[tuple]], dtype: torch.dtype) -> dict[str, int]:
        size = torch.empty((), dtype=dtype).element_size()
        return {m: sum(math.prod(s) for s in shapes) * size for m, shapes in layer_shapes.items()}

    @property
    def nbytes(self) -> int:
        return self.arena.numel() * self.arena.element_size()

    def model_bytes(self, model: str) -> int:
        return self.numel_per_model[model] * self.arena.element_size()
