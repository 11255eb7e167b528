"""The Ray Serve application: a FastAPI ingress deployment in front of one engine per replica.

``build_app(args)`` is both the Python API and the ``import_path`` of a Serve config file
(``raytron.serve.app:build_app``); ``args`` is ``{"config": PATH, "overrides": [...]}`` or a
serve config mapping itself. ``run_app(cfg)`` starts Serve's proxy on ``http.host:http.port``
and deploys it.

Routes: ``GET /health`` (no key needed; engine occupancy), ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` answers server-sent
events ending with ``data: [DONE]``). Every error is an OpenAI-style body with a 4xx/5xx code.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at
# runtime, and behind @serve.ingress string annotations no longer resolve (requests answered 422).
import asyncio
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

from raytron.config import TrackingConfig
from raytron.model.sampling import SamplingParams
from raytron.serve.chat_template import TURN_STOPS, render_chat
from raytron.serve.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, chat_choice, chat_delta,
                                    completion_body, models_body, new_id, parse_request, text_choice, usage)
from raytron.serve.engine import Delta, Engine, EngineLimits, RequestTooLarge
from raytron.serve.metrics import ServeMetrics
from raytron.serve.model_source import MODEL_URI_PREFIX, load_model
from raytron.serve.settings import ServeConfig, build_serve_config, load_serve_config
from raytron.tracking.mlflow_run import resolve_tracking_uri

log = logging.getLogger(__name__)

api = FastAPI(title="raytron", description="OpenAI-compatible completions from a raytron GPT")


@api.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Unknown routes and methods answer in OpenAI's error shape too."""
    body = ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}").body()
    return JSONResponse(body, status_code=error.status_code)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@serve.deployment
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, config: dict[str, Any]):
        self.cfg = build_serve_config(config, "deployment args")
        actor = self.cfg.deployment.ray_actor_options
        torch.set_num_threads(max(1, int(actor.num_cpus)))
        device = "cuda" if actor.num_gpus > 0 else "cpu"
        loaded = load_model(self.cfg.model.source, self.cfg.model.tracking_uri, device)
        model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.eos_id = loaded.eos_id
        limits = self.cfg.limits
        context = limits.context or model.cfg.max_position_embeddings
        self.metrics = ServeMetrics(self.cfg.model.name)
        self.engine = Engine(model, loaded.eos_id, self.tokenizer.decode,
                             EngineLimits(limits.max_batch_size, limits.max_tokens_in_flight, context), self.metrics)
        self.created = int(time.time())
        log.info("serving %s from %s (context %d)", self.cfg.model.name, loaded.origin, context)

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.cfg.model.name, **self.engine.stats()}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self._answer(request, None, lambda _: models_body(self.cfg.model.name, self.created))

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._answer(request, CompletionRequest, self._completion)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._answer(request, ChatCompletionRequest, self._chat_completion)

    async def _answer(self, request: Request, schema: type | None, handle) -> Response:
        """Count, authorize, parse and validate; any ApiError becomes its OpenAI-style body."""
        self.metrics.request()
        try:
            self._authorize(request)
            body = None
            if schema is not None:
                body = parse_request(schema, await self._json(request))
                if body.model != self.cfg.model.name:
                    raise ApiError(404, f"The model `{body.model}` does not exist; this server serves "
                                        f"`{self.cfg.model.name}`", "model", "model_not_found")
            result = handle(body)
            result = await result if asyncio.iscoroutine(result) else result
        except ApiError as error:
            self.metrics.error(error.status)
            return JSONResponse(error.body(), status_code=error.status)
        except Exception as error:  # a bug or a failed step: a 500 in OpenAI's shape, and keep serving
            log.exception("request failed")
            self.metrics.error(500)
            return JSONResponse(ApiError(500, f"internal error: {error}", kind="server_error").body(), status_code=500)
        return result if isinstance(result, Response) else JSONResponse(result)

    def _authorize(self, request: Request) -> None:
        key = self.cfg.http.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", code="invalid_api_key")

    async def _json(self, request: Request) -> Any:
        limit = self.cfg.limits.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}",
                           code="request_too_large")
        raw = await request.body()
        if len(raw) > limit:
            raise ApiError(413, f"request body of {len(raw)} bytes exceeds the limit of {limit}",
                           code="request_too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"could not parse the JSON body of the request: {error}", code="invalid_json") from None

    def _prepare(self, body: CompletionRequest | ChatCompletionRequest, prompt: str, param: str,
                 extra_stops: tuple[str, ...] = ()) -> tuple[list[int], SamplingParams]:
        """Tokenize one prompt and turn the request's parameters (or the config's defaults) into
        SamplingParams that fit the context window; the ids and the params."""
        ids = self.tokenizer.encode(prompt).ids or [self.eos_id or 0]  # an empty prompt opens a new text
        context, limits, defaults = self.engine.limits.context, self.cfg.limits, self.cfg.sampling
        if len(ids) >= context:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; the context window is {context} tokens, "
                                "including at least one to generate", param, "context_length_exceeded")
        if body.max_tokens is not None and body.max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens: {body.max_tokens} exceeds this server's limit of {limits.max_tokens}",
                           "max_tokens", "invalid_value")
        # an explicit max_tokens must fit; the default shrinks to what the window leaves
        max_tokens = body.max_tokens or min(defaults.max_tokens, context - len(ids))
        try:
            self.engine.check(len(ids), max_tokens)
        except RequestTooLarge as error:
            raise ApiError(400, str(error), "max_tokens", "context_length_exceeded") from None
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
            top_k=defaults.top_k if body.top_k is None else body.top_k,
            seed=body.seed, stop=body.stops() + extra_stops)
        return ids, params

    async def _completion(self, body: CompletionRequest) -> Response | dict:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        prepared = [self._prepare(body, prompt, "prompt") for prompt in prompts]
        request_id, name = new_id("cmpl"), self.cfg.model.name
        prompt_tokens = sum(len(ids) for ids, _ in prepared)
        if body.stream:
            async def events() -> AsyncIterator[str]:
                generated = 0
                async for index, delta in self._merged(prepared):
                    if delta.text or delta.finish_reason:
                        choice = text_choice(index, delta.text, delta.finish_reason)
                        yield _sse(completion_body(request_id, name, [choice], None, chunk=True))
                    generated += delta.completion_tokens if delta.finish_reason else 0
                if body.include_usage:
                    yield _sse(completion_body(request_id, name, [], usage(prompt_tokens, generated), chunk=True))
            return self._event_stream(events())
        done = await asyncio.gather(*(self.engine.complete(ids, params) for ids, params in prepared))
        choices = [text_choice(i, d.text, d.finish_reason) for i, d in enumerate(done)]
        return completion_body(request_id, name, choices, usage(prompt_tokens, sum(d.completion_tokens for d in done)))

    async def _chat_completion(self, body: ChatCompletionRequest) -> Response | dict:
        prepared = self._prepare(body, render_chat(body.messages), "messages", TURN_STOPS)
        request_id, name = new_id("chatcmpl"), self.cfg.model.name
        if body.stream:
            async def events() -> AsyncIterator[str]:
                opening = chat_delta({"role": "assistant", "content": ""}, None)
                yield _sse(completion_body(request_id, name, [opening], None, chunk=True, chat=True))
                generated = 0
                async for _, delta in self._merged([prepared]):
                    if delta.text:
                        chunk = chat_delta({"content": delta.text}, None)
                        yield _sse(completion_body(request_id, name, [chunk], None, chunk=True, chat=True))
                    if delta.finish_reason:
                        closing = chat_delta({}, delta.finish_reason)
                        yield _sse(completion_body(request_id, name, [closing], None, chunk=True, chat=True))
                        generated = delta.completion_tokens
                if body.include_usage:
                    counts = usage(len(prepared[0]), generated)
                    yield _sse(completion_body(request_id, name, [], counts, chunk=True, chat=True))
            return self._event_stream(events())
        done = await self.engine.complete(*prepared)
        return completion_body(request_id, name, [chat_choice(done.text, done.finish_reason)],
                               usage(len(prepared[0]), done.completion_tokens), chat=True)

    def _event_stream(self, events: AsyncIterator[str]) -> StreamingResponse:
        async def with_end() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            except Exception as error:  # headers are sent: report in the stream, then end it
                log.exception("stream failed")
                self.metrics.error(500)
                yield _sse(ApiError(500, f"internal error: {error}", kind="server_error").body())
            yield _sse("[DONE]")

        return StreamingResponse(with_end(), media_type="text/event-stream")

    async def _merged(self, prepared: list[tuple[list[int], SamplingParams]]) -> AsyncIterator[tuple[int, Delta]]:
        """Deltas of several engine streams as they come (at most one per ``http.stream_interval_s``
        each), tagged with the prompt's index. Closing this iterator (a client that disconnected)
        cancels every stream, freeing their slots."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, ids: list[int], params: SamplingParams) -> None:
            try:
                async for delta in self.engine.stream(ids, params, self.cfg.http.stream_interval_s):
                    queue.put_nowait((index, delta))
            except Exception as error:
                queue.put_nowait((index, error))

        tasks = [asyncio.create_task(pump(i, ids, params)) for i, (ids, params) in enumerate(prepared)]
        finished = 0
        try:
            while finished < len(tasks):
                index, delta = await queue.get()
                if isinstance(delta, Exception):
                    raise delta
                yield index, delta
                finished += delta.finish_reason is not None
        finally:
            for task in tasks:
                task.cancel()


def config_from_args(args: dict[str, Any] | ServeConfig) -> ServeConfig:
    """``{"config": PATH, "overrides": [...]}`` (a Serve config file's ``args``), a config mapping, or a
    ServeConfig."""
    if isinstance(args, ServeConfig):
        return args
    if "config" in args:
        return load_serve_config(args["config"], list(args.get("overrides", [])))
    return build_serve_config(dict(args), "application args")


def pinned_to_this_machine(cfg: ServeConfig) -> ServeConfig:
    """Resolve what replicas would resolve differently in their own working directory: a relative
    model folder, and the default MLflow store (./mlruns under the cwd)."""
    model = cfg.model
    if model.source.startswith(MODEL_URI_PREFIX):
        tracking_uri = resolve_tracking_uri(TrackingConfig(tracking_uri=model.tracking_uri))
        return cfg.model_copy(update={"model": model.model_copy(update={"tracking_uri": tracking_uri})})
    return cfg.model_copy(update={"model": model.model_copy(update={"source": str(Path(model.source).resolve())})})


def build_app(args: dict[str, Any] | ServeConfig) -> Application:
    """The Serve application for a serve config (see ``config_from_args``)."""
    cfg = pinned_to_this_machine(config_from_args(args))
    deployment = cfg.deployment
    options: dict[str, Any] = {"max_ongoing_requests": deployment.max_ongoing_requests,
                               "ray_actor_options": deployment.ray_actor_options.model_dump()}
    if deployment.autoscaling_config is not None:
        options["autoscaling_config"] = deployment.autoscaling_config.model_dump()
    else:
        options["num_replicas"] = deployment.num_replicas or 1
    return OpenAIServer.options(**options).bind(cfg.model_dump(mode="json"))


def run_app(cfg: ServeConfig) -> str:
    """Start Serve's proxy on the config's host and port, deploy, wait until the replicas are up and
    return the base URL. Serve keeps the host and port of its first start in a cluster, so the URL is
    read back from Serve (a cluster already serving elsewhere says where), not from the config."""
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.http.route_prefix)
    http = serve.context._get_global_client().get_serve_details()["http_options"]
    if (http["host"], http["port"]) != (cfg.http.host, cfg.http.port):
        log.warning("Serve already listened on %s:%s in this cluster; http.host/port of the config are not applied",
                    http["host"], http["port"])
    return f"http://{http['host']}:{http['port']}{cfg.http.route_prefix.rstrip('/')}"
