"""The sampling settings of one call, validated once, for both families (VAR/CoDe and LlamaGen/ZipAR)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

# temperature 0 is the official LlamaGen behaviour: logits / max(temperature, 1e-5), i.e. near-greedy
MIN_TEMPERATURE = 1e-5


def _is_int(x) -> bool:
    """An integer value: an int (not a bool) or an integer-valued float (900.0)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return False
    return math.isfinite(x) and int(x) == x


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingSettings:
    """Validated sampling settings; hashable (CUDA graphs are cached per settings). Build with `build(...)`.

    Rules, the same for both families:
      cfg          a number >= 0. VAR mixes (1 + t) cond - t uncond with t = cfg * k / (K - 1) at scale k;
                   LlamaGen applies CFG when cfg > 1: uncond + cfg * (cond - uncond) (official code).
      top_k        an integer >= 0; 0 = off.
      top_p        in (0, 1]; 1 = off.
      temperature  a number >= 0; 0 means the official LlamaGen rule logits / max(temperature, 1e-5) (near-greedy),
                   and the draw uses max(temperature, 1e-5) in both families (`at`).
      cfg_interval LlamaGen only: an int >= -1; -1 = CFG on every token, else token t >= 1 drops CFG once
                   t - 1 > cfg_interval.
      cfg_skip_last VAR/CoDe only: an int in 0..K-1 (0 = off). The last M scales run the conditional rows alone
                   (B instead of 2B) and draw from the conditional logits: guidance t = 0 there instead of
                   cfg * k / (K - 1) (an approximation of the official distribution; README "Guidance skipping").
    top_k, top_p and temperature are a scalar or, for VAR only, a list of one value per scale (`steps` = K);
    LlamaGen (`steps` = None) takes one value (a list of length 1 is accepted).
    Fields hold one value per step: tuples of length K (VAR) or 1 (LlamaGen).
    """
    cfg: float
    top_k: tuple
    top_p: tuple
    temperature: tuple
    cfg_interval: int = -1
    cfg_skip_last: int = 0

    @classmethod
    def build(cls, cfg=4.0, top_k=0, top_p=1.0, temperature=1.0, cfg_interval=-1,
              steps: int | None = None, cfg_skip_last=0) -> "SamplingSettings":
        """steps: K for VAR (scalars are repeated K times, lists must have K values); None for LlamaGen."""
        n = 1 if steps is None else int(steps)
        if steps is None and not (_is_int(cfg_skip_last) and cfg_skip_last == 0):
            raise ValueError(f"cfg_skip_last={cfg_skip_last!r}: guidance skipping is for VAR/CoDe models (LlamaGen "
                             "drops CFG with cfg_interval)")
        if not (_is_int(cfg_skip_last) and 0 <= cfg_skip_last < n):
            raise ValueError(f"cfg_skip_last={cfg_skip_last!r}: must be an int in 0..{n - 1} (the last scales drawn "
                             "without guidance; 0 = off)")

        def per_step(v, name, ok, why):
            if isinstance(v, (list, tuple)):
                vals = list(v)
                if steps is None and len(vals) != 1:
                    raise ValueError(f"{name}: per-scale lists are for VAR models; LlamaGen takes one value "
                                     f"(got a list of {len(vals)})")
                if len(vals) != n:
                    raise ValueError(f"{name}: expected a scalar or a list of {n} values (one per scale), "
                                     f"got {len(vals)}")
            else:
                vals = [v] * n
            for x in vals:
                if not ok(x):
                    raise ValueError(f"{name}={x!r}: {why}")
            return vals
        if not (_is_real(cfg) and cfg >= 0):
            raise ValueError(f"cfg={cfg!r}: must be a number >= 0 (LlamaGen applies CFG when cfg > 1)")
        if not (_is_int(cfg_interval) and cfg_interval >= -1):
            raise ValueError(f"cfg_interval={cfg_interval!r}: must be an int >= -1 (-1 = CFG on every token)")
        return cls(
            cfg=float(cfg),
            top_k=tuple(int(x) for x in per_step(top_k, "top_k", lambda x: _is_int(x) and x >= 0,
                                                 "must be an integer >= 0 (0 = off)")),
            top_p=tuple(float(x) for x in per_step(top_p, "top_p", lambda x: _is_real(x) and 0 < x <= 1,
                                                   "must be in (0, 1] (1 = off)")),
            temperature=tuple(float(x) for x in per_step(temperature, "temperature",
                                                         lambda x: _is_real(x) and 0 <= x < math.inf,
                                                         "must be a number >= 0 (0 = near-greedy)")),
            cfg_interval=int(cfg_interval),
            cfg_skip_last=int(cfg_skip_last),
        )

    def guided(self, k: int) -> bool:
        """Whether VAR scale k runs the CFG pair (2B rows) and mixes the guidance; False at the last
        cfg_skip_last scales (the conditional rows alone)."""
        return k < len(self.top_k) - self.cfg_skip_last

    def at(self, i: int = 0) -> tuple:
        """(top_k, top_p, temperature) of step i (VAR scale i; LlamaGen: 0), the temperature as drawn:
        max(temperature, 1e-5)."""
        return self.top_k[i], self.top_p[i], max(self.temperature[i], MIN_TEMPERATURE)
