"""The HTTP application (Starlette; uvicorn runs it: var_rt/cli/serve.py).

POST /v1/images  {"class_label": 207, "n": 1, "seed": 0, <sampling settings>, "stream": false}
                 -> 200 {"images": ["<base64 PNG>", ...], "seeds": [...]}; with "stream": true, Server-Sent Events:
                 `preview` events {"step": k, "images": [...]} (VAR: after scale k; LlamaGen: k token rows
                 complete), then one `final` {"images": [...], "seeds": [...], "step": k} (or one `error`
                 {"error": ..., "status": ...}). 400: a bad request ({"error": one line}; also a ValueError the
                 pipeline raises when it runs, for a rule only it checks); 429 + Retry-After: the
                 queue is full; 503: out of memory at one image, or shutting down; 500: the model failed.
GET /v1/info     the model, its classes, the settings a request may give and their defaults (the page reads it)
GET /healthz     200 {"status": "ok", ...}; 503 while draining
GET /metrics     Prometheus text format (metrics.py)
GET /            the page (page.html)
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import json
import time
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from var_rt.serve.batcher import Batcher, QueueFull, Unavailable
from var_rt.serve.engine import Engine
from var_rt.serve.metrics import Metrics


def one_line(e: BaseException) -> str:
    """An error as the command line prints it (cli.one_line, for the exceptions a request can raise)."""
    return " ".join((str(e) or type(e).__name__).split())


def png_base64(images) -> list:
    """uint8 (n, H, W, 3) -> base64 PNG strings."""
    from PIL import Image
    out = []
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def _error(status: int, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _status(e: BaseException) -> int:
    return 503 if isinstance(e, Unavailable) else 400 if isinstance(e, ValueError) else 500


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read: the next ASGI message is http.disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """A StreamingResponse that calls on_close() once it is over, however it ended (finished, failed, or cancelled
    because the client went away, possibly before its body started)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def create_app(engine: Engine, max_batch: int = 16, max_wait_ms: float = 10.0, queue_size: int = 256,
               pad: bool | None = None) -> Starlette:
    """The application around `engine`; its batcher starts with the app (lifespan) and drains when it stops."""
    state = {"in_flight": 0}
    batcher_box: list = []
    metrics = Metrics(max_batch, queue_depth=lambda: len(batcher_box[0].waiting) if batcher_box else 0,
                      in_flight=lambda: state["in_flight"])
    encoder = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="var-rt-png")
    page = resources.files("var_rt.serve").joinpath("page.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        b = Batcher(engine, metrics, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size, pad=pad)
        b.start()
        batcher_box.append(b)
        app.state.batcher = b
        try:
            yield
        finally:
            await b.close()
            encoder.shutdown(wait=True)

    async def encode(u8) -> list:
        return await asyncio.get_running_loop().run_in_executor(encoder, png_base64, u8)

    async def images(request: Request):
        t0 = time.monotonic()
        state["in_flight"] += 1
        streaming = False
        try:
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as e:
                metrics.finished(400)
                return _error(400, f"the request body is not JSON: {one_line(e)}")
            try:
                req = engine.parse(body)
            except ValueError as e:
                metrics.finished(400)
                return _error(400, one_line(e))
            b = batcher_box[0]
            try:
                job = b.submit(req)
            except QueueFull as e:
                metrics.finished(429)
                return _error(429, str(e), headers={"Retry-After": str(e.retry_after)})
            except Unavailable as e:
                metrics.finished(503)
                return _error(503, str(e))
            if req.stream:
                streaming = True
                sse = {"done": False}

                def closed():  # however the response ended (even before its body started: no generator finally)
                    if not sse["done"]:
                        b.cancel(job)
                        metrics.finished(499)
                    state["in_flight"] -= 1
                return _EventStream(events(job, t0, sse), closed, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
            waiter = asyncio.ensure_future(_disconnected(request))
            await asyncio.wait({job.future, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not job.future.done():
                b.cancel(job)
                job.future.cancel()
                metrics.finished(499)
                return _error(499, "client closed the request")
            waiter.cancel()
            if job.future.exception() is not None:
                e = job.future.exception()
                metrics.finished(_status(e))
                return _error(_status(e), one_line(e))
            pngs = await encode(job.future.result())
            metrics.finished(200, req.n, time.monotonic() - t0)
            return JSONResponse({"images": pngs, "seeds": req.seeds})
        finally:
            if not streaming:
                state["in_flight"] -= 1

    async def events(job, t0: float, sse: dict):
        """The SSE body of a streamed request (its end, or the client's going away: _EventStream's on_close)."""
        while True:
            kind, step, payload = await job.events.get()
            if kind == "error":
                status = _status(payload)
                metrics.finished(status)
                sse["done"] = True
                yield f"event: error\ndata: {json.dumps({'error': one_line(payload), 'status': status})}\n\n"
                return
            data = {"step": step, "images": await encode(payload)}
            if kind == "final":
                data["seeds"] = job.req.seeds
                metrics.finished(200, job.req.n, time.monotonic() - t0)
                sse["done"] = True
            yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
            if kind == "final":
                return

    async def info(request: Request):
        return JSONResponse(engine.info())

    async def healthz(request: Request):
        b = batcher_box[0] if batcher_box else None
        if b is None or b.closing:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "model": engine.name, "queue_depth": len(b.waiting),
                             "in_flight": state["in_flight"]})

    async def metrics_text(request: Request):
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def index(request: Request):
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    app = Starlette(routes=[
        Route("/", index), Route("/v1/images", images, methods=["POST"]), Route("/v1/info", info),
        Route("/healthz", healthz), Route("/metrics", metrics_text),
    ], lifespan=lifespan)
    app.state.metrics = metrics
    app.state.engine = engine
    return app
