"""HTTP serving: a classification server whose batcher is the continuous early-exit engine.

``python -m earlyexit_kernels serve MODEL`` runs it (see :mod:`earlyexit_kernels.integrations.cli`);
:func:`create_app` builds the ASGI app for a patched model and its tokenizer;
:mod:`earlyexit_kernels.integrations.server.ray_serve` runs replicas of it on Ray Serve. Needs the
``serve`` extra: starlette, uvicorn, prometheus_client, pydantic (the routes' bodies, :mod:`.routes`) and
swagger-ui-py (``/docs``, Swagger UI 5; the server works without it)
(:mod:`earlyexit_kernels.integrations.extras`).
"""

from earlyexit_kernels.integrations.server.app import create_app
from earlyexit_kernels.integrations.server.errors import RequestError
from earlyexit_kernels.integrations.server.routes.shared import format_answer
from earlyexit_kernels.integrations.server.routes.tei import PredictRequest, parse_predict_request

__all__ = ["PredictRequest", "RequestError", "create_app", "format_answer", "parse_predict_request"]
