"""The server's metrics, rendered in the Prometheus text exposition format (version 0.0.4) by hand: a few
counters, gauges and histograms do not need a client library. Updated from the event loop only (no locks)."""
from __future__ import annotations

import collections
import time

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0  # images/s: images finished in the last RATE_WINDOW_S seconds


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list:
        out = [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {_num(self.sum)}",
                      f"{name}_count {self.count}"]


def _num(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


class Metrics:
    """What /metrics shows. queue_depth is read from a callable (the batcher's waiting list)."""

    def __init__(self, max_batch: int, queue_depth=lambda: 0, in_flight=lambda: 0):
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch})
        self.batch_size = Histogram([s for s in sizes if s <= max_batch])
        self.batch_seconds = Histogram(LATENCY_BUCKETS)
        self.request_seconds = Histogram(LATENCY_BUCKETS)
        self.requests = collections.Counter()  # HTTP status -> count (POST /v1/images)
        self.images = 0
        self.batches = 0
        self.padded_rows = 0
        self.cancelled = 0
        self.oom_retries = 0
        self.streams = 0
        self._done = collections.deque()  # (time, images) of the last RATE_WINDOW_S seconds
        self._queue_depth, self._in_flight = queue_depth, in_flight
        self.started = time.monotonic()

    def batch(self, rows: int, padded: int, seconds: float) -> None:
        self.batches += 1
        self.batch_size.observe(rows)
        self.padded_rows += padded
        self.batch_seconds.observe(seconds)

    def finished(self, status: int, images: int = 0, seconds: float | None = None) -> None:
        self.requests[status] += 1
        if images:
            self.images += images
            self._done.append((time.monotonic(), images))
        if seconds is not None:
            self.request_seconds.observe(seconds)

    def images_per_second(self) -> float:
        now = time.monotonic()
        while self._done and self._done[0][0] < now - RATE_WINDOW_S:
            self._done.popleft()
        span = min(RATE_WINDOW_S, max(now - self.started, 1e-3))
        return sum(n for _, n in self._done) / span

    def render(self) -> str:
        out = []

        def metric(name, kind, help_, lines):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines if isinstance(lines, list) else [f"{name} {_num(lines)}"])
        metric("var_rt_queue_depth", "gauge", "Requests waiting for the model.", self._queue_depth())
        metric("var_rt_in_flight", "gauge", "Requests received and not yet answered.", self._in_flight())
        metric("var_rt_requests_total", "counter", "Image requests answered, by HTTP status.",
               [f'var_rt_requests_total{{code="{c}"}} {n}' for c, n in sorted(self.requests.items())]
               or ['var_rt_requests_total{code="200"} 0'])
        metric("var_rt_images_total", "counter", "Images delivered.", self.images)
        metric("var_rt_images_per_second", "gauge", f"Images delivered per second over the last {RATE_WINDOW_S:g} s.",
               round(self.images_per_second(), 3))
        metric("var_rt_batches_total", "counter", "Model runs (batches).", self.batches)
        metric("var_rt_padded_rows_total", "counter", "Dummy rows added to reach a batch bucket.", self.padded_rows)
        metric("var_rt_streams_total", "counter", "Streamed requests run.", self.streams)
        metric("var_rt_cancelled_total", "counter", "Requests cancelled by a client that went away.", self.cancelled)
        metric("var_rt_oom_retries_total", "counter", "Batches split and retried after running out of memory.",
               self.oom_retries)
        metric("var_rt_batch_size", "histogram", "Images per model run (without padding).",
               self.batch_size.lines("var_rt_batch_size"))
        metric("var_rt_batch_seconds", "histogram", "Time of one model run, PNG encoding excluded.",
               self.batch_seconds.lines("var_rt_batch_seconds"))
        metric("var_rt_request_seconds", "histogram", "Latency of an image request, from arrival to answer.",
               self.request_seconds.lines("var_rt_request_seconds"))
        return "\n".join(out) + "\n"
