"""Which model runs which VAR scale: plain VAR, or CoDe (drafter on scales 0..N-1, refiner from N)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    model: str            # key into the engine's models: "main", "drafter" or "refiner"
    scales: tuple         # scales whose tokens this phase samples, in order
    prefill: tuple = ()   # scales whose inputs are fed (block-causal) before the first sampled scale


def var_schedule(num_scales: int, draft_steps: int | None = None) -> list[Phase]:
    """Plain VAR when draft_steps is None or == num_scales (the drafter alone); CoDe otherwise:
    the drafter samples scales 0..N-1, the refiner prefills scales 0..N in ONE pass and samples N..K-1."""
    K = num_scales
    if draft_steps is None:
        return [Phase("main", tuple(range(K)))]
    if not 1 <= draft_steps <= K:
        raise ValueError(f"draft_steps must be in 1..{K} (K = {K} scales; {K} = drafter alone), got {draft_steps}")
    if draft_steps == K:
        return [Phase("drafter", tuple(range(K)))]
    N = draft_steps
    return [Phase("drafter", tuple(range(N))), Phase("refiner", tuple(range(N, K)), prefill=tuple(range(N + 1)))]
