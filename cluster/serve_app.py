"""The OpenAI-compatible endpoint: a FastAPI app over one model replica, deployed with Ray Serve.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health   GET /metrics

`create_app(config, replica)` is the plain ASGI app (no Ray needed); `build_app(args)` is the
Serve import path (`cluster.serve_app:build_app`), a deployment holding one `LocalReplica`.
Every error is an OpenAI error body with its status; a streaming request that fails after its
first byte ends with an error chunk and `data: [DONE]`. A client that goes away cancels its
handler, which closes the engine stream and so aborts the request and frees its slot.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from cluster.admission import Admission
from cluster.api import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from cluster.auth import APIKeys, load_keys
from cluster.chat_prompt import build_chat_prompt
from cluster.engine import RequestError, SamplingError
from cluster.image_source import image_filesystem
from cluster.local_replica import ReplicaDead
from cluster.metrics import Metrics
from cluster.responder import DONE, ChatResponder, CompletionResponder, sse
from cluster.serve_config import ServeConfig

log = logging.getLogger("deltaray.serve")
ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


def error_response(error: APIError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def as_api_error(e: BaseException) -> APIError:
    """Any failure as the error a client sees: input errors 400, a dead engine 503, else 500."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, (RequestError, SamplingError)):
        return APIError(400, str(e), param=str(e).split(" ")[0] if isinstance(e, SamplingError)
                        else None, code="invalid_value")
    if isinstance(e, ReplicaDead):
        return APIError(503, "the model replica failed and is being replaced; retry later",
                        code="engine_dead", retry_after=1)
    log.exception("unexpected error", exc_info=e)
    return APIError(500, "internal server error", code="internal_error")


async def read_json(request: Request, limit: int) -> dict:
    """The JSON object in the body; 413 past `limit` bytes, 400 when it is not JSON."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body is {length} bytes; the limit is {limit}",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes",
                           code="request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return data


def parse(schema, data: dict):
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


class StatusCounter:
    """ASGI middleware counting responses by route and status (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)
        await self.app(scope, receive, counted)


class OpenAIServer:
    """The route handlers, over one replica."""

    def __init__(self, config: ServeConfig, replica):
        self.config, self.replica = config, replica
        self.keys = APIKeys(load_keys(config.api_key_env, config.api_key_file))
        self.metrics = Metrics(replica)
        self.admission = Admission(config.max_ongoing_requests, config.max_queued_requests,
                                   config.retry_after_s)

    # ---- checks --------------------------------------------------------------------------
    async def read(self, request: Request, schema):
        self.keys.check(request.headers.get("authorization"))
        body = parse(schema, await read_json(request, self.config.max_request_bytes))
        if body.model is not None and body.model != self.config.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves "
                                f"{self.config.model_name!r}", param="model",
                           code="model_not_found")
        return body

    def sampling(self, body, limit: int | None, logprobs: int | None, prompt_len: int, param: str):
        """Sampling params, after checking the prompt (and max_tokens) fit the context."""
        longest = self.replica.max_model_len
        if prompt_len >= longest:
            raise APIError(400, f"this model's maximum context length is {longest} tokens, but "
                                f"the prompt has {prompt_len} tokens", param=param,
                           code="context_length_exceeded")
        if limit is not None and prompt_len + limit > longest:
            raise APIError(400, f"this model's maximum context length is {longest} tokens, but "
                                f"{prompt_len + limit} were requested ({prompt_len} in the "
                                f"prompt, {limit} for the completion)", param="max_tokens",
                           code="context_length_exceeded")
        try:
            return body.sampling_params(limit, logprobs)
        except SamplingError as e:
            raise as_api_error(e) from None

    # ---- engine streams ------------------------------------------------------------------
    async def timed(self, prompt: dict, params, request_id: str) -> AsyncIterator:
        """The replica's outputs, recording token counts, TTFT and inter-token latency."""
        start = last = time.perf_counter()
        seen, finished = 0, False
        try:
            async with aclosing(self.replica.generate(prompt, params, request_id)) as outs:
                async for out in outs:       # closed on exit, so an early leave aborts at once
                    now = time.perf_counter()
                    tokens = sum(len(o.delta_token_ids) for o in out.outputs)
                    if tokens and seen == 0:
                        self.metrics.ttft.observe(now - start)
                    elif tokens:
                        self.metrics.itl.observe((now - last) / tokens)
                    if tokens:
                        last, seen = now, seen + tokens
                    finished = out.finished
                    yield out
        finally:
            self.metrics.generation_tokens.inc(seen)
            if finished:
                self.metrics.prompt_tokens.inc(len(out.prompt_token_ids))
                self.metrics.e2e.observe(time.perf_counter() - start)
            else:
                self.metrics.aborted.inc()

    async def admitted(self, stream: AsyncIterator) -> AsyncIterator:
        """`stream` run while holding an engine place (the place is taken before the call)."""
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()
            self.admission.leave()

    async def start(self, streams: list) -> list:
        """Admit, then wait for each stream's first output (so input errors get their status)."""
        await self.admission.enter()
        runs = [self.admitted(s) for s in streams]
        try:
            return [(run, await anext(run)) for run in runs]
        except BaseException:
            for run in runs:
                await run.aclose()
            raise

    # ---- routes --------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        body = await self.read(request, ChatCompletionRequest)
        prompt = build_chat_prompt(body, self.replica.tokenizer, self.config,
                                   self.replica.accepts_images)
        params = self.sampling(body, body.output_limit, body.num_logprobs, len(prompt.token_ids),
                               "messages")
        responder = ChatResponder(self.config.model_name, prompt, self.replica.tokenizer,
                                  body.num_logprobs)
        [(run, first)] = await self.start([self.timed(prompt.engine_prompt(), params, responder.id)])
        if body.stream:
            return StreamingResponse(self.chat_events(responder, run, first, body),
                                     media_type="text/event-stream")
        final = first
        async for final in run:
            pass
        return JSONResponse(responder.body(final))

    async def chat_events(self, responder: ChatResponder, run, first, body) -> AsyncIterator[str]:
        with_usage = body.include_usage
        try:
            for event in responder.first_chunks(body.n, with_usage):
                yield event
            out = first
            for event in responder.step_chunks(first, with_usage):
                yield event
            async for out in run:
                for event in responder.step_chunks(out, with_usage):
                    yield event
            if with_usage:
                yield responder.usage_chunk(out)
        except Exception as e:
            yield sse(as_api_error(e).body())
        finally:
            await run.aclose()
        yield DONE

    async def completions(self, request: Request) -> Response:
        body = await self.read(request, CompletionRequest)
        if body.echo and body.stream:
            raise APIError(400, "echo is not supported with stream", param="echo")
        tokenizer, streams = self.replica.tokenizer, []
        rid = uuid.uuid4().hex
        for k, p in enumerate(body.prompts):
            ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
            params = self.sampling(body, body.max_tokens or 16, body.logprobs, len(ids), "prompt")
            prompt = {"prompt": p if isinstance(p, str) else None, "prompt_token_ids": ids}
            streams.append(self.timed(prompt, params, f"cmpl-{rid}-{k}"))
        responder = CompletionResponder(self.config.model_name, tokenizer, body.logprobs,
                                        body.n, body.echo)
        if len(streams) > 1 and body.stream:
            raise APIError(400, "stream takes a single prompt", param="prompt")
        started = await self.start(streams)
        if body.stream:
            return StreamingResponse(self.completion_events(responder, started[0], body),
                                     media_type="text/event-stream")
        finals = []
        for run, final in started:
            async for final in run:
                pass
            finals.append(final)
        return JSONResponse(responder.body(finals))

    async def completion_events(self, responder, started, body) -> AsyncIterator[str]:
        (run, out), with_usage = started, body.include_usage
        try:
            for event in responder.step_chunks(0, out, with_usage, False):
                yield event
            async for out in run:
                for event in responder.step_chunks(0, out, with_usage, False):
                    yield event
            if with_usage:
                yield responder.usage_chunk([out])
        except Exception as e:
            yield sse(as_api_error(e).body())
        finally:
            await run.aclose()
        yield DONE

    async def models(self, request: Request) -> dict:
        self.keys.check(request.headers.get("authorization"))
        return {"object": "list", "data": [{
            "id": self.config.model_name, "object": "model", "created": 0, "owned_by": "deltaray",
            "max_model_len": self.replica.max_model_len}]}

    async def health(self) -> Response:
        try:
            self.replica.check_health()
        except ReplicaDead as e:
            return error_response(APIError(503, str(e), code="engine_dead"))
        return JSONResponse({"status": "ok"})

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")


def create_app(config: ServeConfig, replica) -> FastAPI:
    server = OpenAIServer(config, replica)
    app = FastAPI(title="deltaray", description="OpenAI-compatible API", version="0.1.0")
    app.state.server = server
    app.add_api_route("/v1/chat/completions", server.chat, methods=["POST"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_text, methods=["GET"])

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return error_response(APIError(e.status_code, str(e.detail), code="not_found"
                                       if e.status_code == 404 else None))

    async def known_error(_, e: Exception):
        return error_response(as_api_error(e))
    for kind in (APIError, RequestError, SamplingError, ReplicaDead, Exception):
        app.add_exception_handler(kind, known_error)
    app.add_middleware(StatusCounter, metrics=server.metrics)
    from cluster.openapi_schema import describe_request_bodies
    describe_request_bodies(app)
    return app


# ---- Ray Serve ---------------------------------------------------------------------------
def deployment_class():
    """The Serve deployment (built on demand so that importing this module needs no Ray)."""
    from ray import serve

    from cluster.local_replica import LocalReplica

    @serve.deployment(name="OpenAIServer")
    @serve.ingress()
    class OpenAIDeployment:
        def __init__(self, config: dict):
            self.config = ServeConfig.model_validate(config)
            self.replica = LocalReplica(self.config.model, self.config.engine,
                                        self.config.ep_size, self.config.num_gpus,
                                        image_filesystem(self.config.allowed_s3_buckets))

        def __serve_build_asgi_app__(self):
            return create_app(self.config, self.replica)

        def check_health(self):
            self.replica.check_health()
    return OpenAIDeployment


def build_app(args: dict | ServeConfig | None = None):
    """Serve application builder: `serve run cluster.serve_app:build_app model=...`."""
    config = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args or {})
    options = config.deployment_options()
    return deployment_class().options(**options).bind(config.model_dump(mode="json"))
