"""`var-rt serve`: an HTTP server with dynamic batching, streamed previews and a page to try it.

engine.py   the models a server runs and what a request means for them: parse (the checks and one-line messages
            of the CLI and the pipelines), the group key of compatible requests, one batch run, one stream
batcher.py  dynamic batching: a queue, one worker thread that owns the model (one batch at a time), padding to
            a batch bucket, OOM retries at smaller sizes, per-request failures, cancellation, draining
metrics.py  counters, gauges and histograms in the Prometheus text format
app.py      the Starlette application (POST /v1/images, GET /v1/info, /healthz, /metrics, the page at /)
page.html   the page (plain HTML + JS, no build step)

Starlette and uvicorn are an optional extra (pip install var_rt[serve]); nothing outside this package and
var_rt/cli/serve.py imports them.
"""
from __future__ import annotations

MISSING = "var-rt serve needs starlette and uvicorn: pip install var_rt[serve]"


def require() -> None:
    """ImportError with one line saying what to install when the serving stack is missing."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImportError(MISSING) from None
