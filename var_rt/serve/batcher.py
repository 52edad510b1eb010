"""Dynamic batching: requests wait in one list; a scheduler task on the event loop groups the head request with
the later ones of the same key (Engine.parse: same pipeline, same validated settings) until the batch holds
`max_batch` images or the head has waited `max_wait_ms`, and hands the batch to ONE worker thread, which owns the
model: one batch at a time on the device, and the event loop never waits on it (it awaits the thread's future).

In the worker a batch is padded to a bucket size (where the pipeline replays CUDA graphs, one per batch size:
the next power of two, or max_batch) with copies of its last row, whose images are dropped; images do not depend
on the batch, so a request gets the bytes of its own offline call. A batch that runs out of memory is split in
halves and retried (down to one image, then that request fails with Unavailable: HTTP 503); a batch that fails
otherwise is rerun one request at a time, so only the request that fails gets the error. Streamed requests run
alone, one at a time, in the same worker (their previews are sent as they come). A client that goes away cancels
its request: dropped from the list if it has not started; a running stream stops at its next preview; a request
in a running batch is computed and discarded. `close()` stops taking requests and returns once every waiting one
is answered.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from dataclasses import dataclass, field

import numpy as np

from var_rt.serve.engine import Engine, Request, is_oom


class QueueFull(Exception):
    """The waiting list is full (HTTP 429); retry_after: seconds, an estimate."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Unavailable(Exception):
    """The server cannot run this request now (HTTP 503): out of memory at one image, or shutting down."""


@dataclass(eq=False)
class Job:
    """One request in the batcher: `future` (a batch's result: uint8 (n, H, W, 3)) or `events` (a stream's
    ("preview" | "final", step, uint8 images) and ("error", exception) tuples)."""
    req: Request
    t0: float
    future: asyncio.Future | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False
    images: list = field(default_factory=list)
    error: BaseException | None = None


def buckets_for(max_batch: int) -> list:
    """Batch buckets: powers of two up to max_batch, and max_batch."""
    return sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch} | {max_batch})


class Batcher:
    def __init__(self, engine: Engine, metrics, max_batch: int = 16, max_wait_ms: float = 10.0,
                 queue_size: int = 256, pad: bool | None = None):
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.pad = engine.pads if pad is None else pad
        self.buckets = buckets_for(max_batch)
        self.waiting: list = []
        self.running = 0
        self.closing = False
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="var-rt-model")

    # ---- the event loop's side ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._schedule())

    async def close(self) -> None:
        """Stop taking requests; return once every waiting and running one is answered."""
        self.closing = True
        if self._arrived is not None:
            self._arrived.set()
        if self._task is not None:
            await self._task
        self._worker.shutdown(wait=True)

    def submit(self, req: Request) -> Job:
        if self.closing:
            raise Unavailable("the server is shutting down")
        if len(self.waiting) >= self.queue_size:
            raise QueueFull(self.retry_after())
        loop = asyncio.get_running_loop()
        job = Job(req, time.monotonic())
        if req.stream:
            job.events = asyncio.Queue()
        else:
            job.future = loop.create_future()
        self.waiting.append(job)
        self._arrived.set()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits; a running stream stops at its next preview."""
        if job.cancelled:
            return
        job.cancelled = True
        self.metrics.cancelled += 1
        if job in self.waiting:
            self.waiting.remove(job)

    def retry_after(self) -> int:
        """Seconds until the waiting list has room, estimated from the mean batch time."""
        h = self.metrics.batch_seconds
        mean = h.sum / h.count if h.count else 1.0
        return max(1, math.ceil(mean * (len(self.waiting) / self.max_batch + 1)))

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.waiting:
                if self.closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            head = self.waiting[0]
            if head.req.stream:
                self.waiting.pop(0)
                await self._run(loop, self._execute_stream, head, loop)
                continue
            deadline = head.t0 + self.max_wait
            while True:
                batch = self._group(head)
                rows = sum(j.req.n for j in batch)
                wait = deadline - time.monotonic()
                if rows >= self.max_batch or wait <= 0 or self.closing or head.cancelled:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            batch = [j for j in self._group(head) if not j.cancelled]
            if not batch:
                continue
            for j in batch:
                self.waiting.remove(j)
            try:
                runs = await self._run(loop, self._execute, batch)
            except Exception as e:  # noqa: BLE001 (a bug here must not stop the scheduler: answer the batch)
                runs = []
                for j in batch:
                    j.error = e
            for rows, padded, seconds in runs:
                self.metrics.batch(rows, padded, seconds)
            for j in batch:
                if j.cancelled or j.future.done():
                    continue
                if j.error is not None:
                    j.future.set_exception(j.error)
                else:
                    j.future.set_result(np.stack(j.images))

    def _group(self, head: Job) -> list:
        """The head and the later waiting jobs of its key, in order, up to max_batch images (the head always: a
        request of more images runs alone)."""
        batch, rows = [], 0
        for j in self.waiting:
            if j.req.stream or j.req.key != head.req.key or j.cancelled:
                continue
            if batch and rows + j.req.n > self.max_batch:
                break
            batch.append(j)
            rows += j.req.n
        return batch

    async def _run(self, loop, fn, *args):
        self.running += 1
        try:
            return await loop.run_in_executor(self._worker, fn, *args)
        finally:
            self.running -= 1

    # ---- the worker thread's side ---------------------------------------------------------------------------------
    def _execute(self, jobs: list) -> list:
        """Run a batch, filling each job's images or error. Returns (rows, padded rows, seconds) per model run."""
        for j in jobs:
            j.images = [None] * j.req.n
        runs: list = []
        self._attempt(jobs[0].req, [(j, 0, j.req.n) for j in jobs], runs)
        return runs

    def _attempt(self, req: Request, pieces: list, runs: list) -> None:
        """pieces: (job, first image, end) of jobs sharing req.key; one model run over all of them, padded."""
        from var_rt import images
        labels = [p[0].req.label for p in pieces for _ in range(p[1], p[2])]
        seeds = [s for j, a, b in pieces for s in j.req.seeds[a:b]]
        rows = len(labels)
        size = next((b for b in self.buckets if b >= rows), rows) if self.pad else rows
        t = time.perf_counter()
        try:
            out = self.engine.run(req, labels + labels[-1:] * (size - rows), seeds + seeds[-1:] * (size - rows))
            u8 = images.to_uint8(out[:rows])
        except Exception as e:  # noqa: BLE001 (any failure is answered to its request, never kills the worker)
            self._failed(req, pieces, runs, e, rows)
            return
        runs.append((rows, size - rows, time.perf_counter() - t))
        k = 0
        for j, a, b in pieces:
            j.images[a:b] = list(u8[k:k + b - a])
            k += b - a

    def _failed(self, req, pieces, runs, e, rows) -> None:
        if is_oom(e):
            _empty_cache(self.engine)
            if rows == 1:
                for j, _, _ in pieces:
                    j.error = Unavailable("out of memory at a batch of one image; try again later")
                return
            self.metrics.oom_retries += 1   # written by this thread only
            first, second = split_rows(pieces, rows // 2)
            self._attempt(req, first, runs)
            self._attempt(req, second, runs)
            return
        jobs = list(dict.fromkeys(p[0] for p in pieces))
        if len(jobs) > 1:  # one bad request must not fail its batch-mates: each alone
            for j in jobs:
                self._attempt(req, [p for p in pieces if p[0] is j], runs)
            return
        jobs[0].error = e

    def _execute_stream(self, job: Job, loop) -> None:
        """Run one streamed request, sending its previews to the event loop as they come."""
        from var_rt import images

        def put(event):
            loop.call_soon_threadsafe(job.events.put_nowait, event)
        t = time.perf_counter()
        try:
            gen = self.engine.stream(job.req)
            try:
                for step, imgs, final in gen:
                    if job.cancelled:
                        break
                    put(("final" if final else "preview", step, images.to_uint8(imgs)))
            finally:
                close = getattr(gen, "close", None)
                if close is not None:
                    close()
        except Exception as e:  # noqa: BLE001
            if is_oom(e):
                _empty_cache(self.engine)
                e = Unavailable(f"out of memory streaming {job.req.n} images; try fewer or again later")
            put(("error", None, e))
            return
        self.metrics.streams += 1
        loop.call_soon_threadsafe(self.metrics.batch, job.req.n, 0, time.perf_counter() - t)


def split_rows(pieces: list, half: int):
    """(job, first, end) pieces -> the first `half` rows and the rest, a job cut in two where the halves meet."""
    first, second, k = [], [], 0
    for j, a, b in pieces:
        if k + (b - a) <= half:
            first.append((j, a, b))
        elif k >= half:
            second.append((j, a, b))
        else:
            cut = a + half - k
            first.append((j, a, cut))
            second.append((j, cut, b))
        k += b - a
    return first, second


def _empty_cache(engine) -> None:
    import torch
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
