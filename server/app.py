"""The FastAPI app factory: settings in, app out; the engine lives in the lifespan.

Pattern from full-stack-fastapi-template and the FastAPI docs on lifespan events
(https://fastapi.tiangolo.com/advanced/events/). An engine passed to ``create_app`` belongs to the
caller (tests share one tiny engine across apps); otherwise the app builds one with ``engine_factory``
(``Engine`` by default; ``bench.tiny_server`` passes a tiny model's) from the settings' engine config,
loads it in a background thread, so ``/health`` answers 503 while the weights load, and drains and
stops it on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from engine import Engine, EngineConfig
from server.errors import install_error_handlers
from server.limits import BodySizeLimit, KeyLimiter
from server.messages import routes as messages
from server.metrics import Metrics, RequestCounter
from server.protocol import ERROR_RESPONSES
from server.responses import route as responses
from server.routes import chat, completions, health, metrics, models, sessions
from server.settings import Settings

log = logging.getLogger(__name__)

EngineFactory = Callable[[EngineConfig], Engine]


async def _load(app: FastAPI, engine: Engine) -> None:
    try:
        await asyncio.to_thread(engine.start)
    except Exception as exc:
        log.exception("loading the model failed")
        app.state.load_error = f"{type(exc).__name__}: {exc}"


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    if app.state.engine is not None:  # the caller's engine: the caller starts and stops it
        yield
        return
    engine = app.state.engine_factory(settings.engine_config())
    app.state.engine = engine
    loader = asyncio.create_task(_load(app, engine))
    try:
        yield
    finally:
        if not loader.done():
            log.info("shutdown requested while loading; waiting for the load to finish")
        await loader
        if engine.ready:
            engine.drain()
            await asyncio.to_thread(engine.stop)
            log.info("engine stopped; sessions persisted")


def create_app(settings: Settings | None = None, engine: Engine | None = None,
               engine_factory: EngineFactory | None = None) -> FastAPI:
    """The app; ``engine``: a started engine the caller owns, else one ``engine_factory`` builds at start."""
    settings = settings or Settings()
    app = FastAPI(title="sinkserve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.engine_factory = engine_factory or Engine
    app.state.load_error = None
    app.state.api_keys = settings.allowed_keys()
    app.state.limiter = KeyLimiter(settings.max_concurrent_per_key)
    app.state.metrics = Metrics(lambda: app.state.engine)

    install_error_handlers(app)
    for module in (chat, completions, models, responses, sessions):  # their errors are documented in OpenAPI
        app.include_router(module.router, responses=ERROR_RESPONSES)
    for module in (health, metrics, messages):  # messages: Anthropic's error shape (server/messages/errors.py)
        app.include_router(module.router)

    # Added last = outermost: count every response, including 413s and CORS preflights.
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-session-id", "x-sinkserve-evicted-tokens",
                                                               "x-sinkserve-pinned-tokens", "x-sinkserve-replica",
                                                               "x-sinkserve-session-source", "x-sinkserve-warning",
                                                               "x-sinkserve-tools-left-out"])
    app.add_middleware(RequestCounter, metrics=app.state.metrics)
    return app
