"""The Ray Serve application: a FastAPI ingress deployment in front of one engine per replica.

``build_app(args)`` is both the Python API and the ``import_path`` of a Serve config file
(``raytron.serve.app:build_app``); ``args`` is ``{"config": PATH, "overrides": [...]}`` or a
serve config mapping itself. ``run_app(cfg)`` starts Serve's proxy on ``http.host:http.port``
and deploys it.

Routes: ``GET /health`` (no key needed; engine occupancy and its record of steps by batch size),
``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``
answers server-sent events ending with ``data: [DONE]``), and vLLM's ``POST /tokenize``,
``POST /detokenize``, ``GET /tokenizer_info``. Every error is an OpenAI-style body with a 4xx/5xx code.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at
# runtime, and behind @serve.ingress string annotations no longer resolve (requests answered 422).
import asyncio
import hmac
import json
import logging
import os
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
from raytron.serve.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    TokenizeRequest, chat_choice, chat_delta, completion_body, models_body, new_id,
                                    parse_request, text_choice, usage)
from raytron.serve.engine import Delta, Engine, EngineLimits
from raytron.serve.logprob_shapes import chat_logprobs, legacy_logprobs
from raytron.serve.prepare import Choice, prepare_choices, prompt_ids, token_id_list
from raytron.serve.tokenizer_info import tokenizer_info
from raytron.serve.metrics import ServeMetrics
from raytron.serve.model_source import MODEL_URI_PREFIX, check_source, load_model
from raytron.serve.settings import ServeConfig, build_serve_config, load_serve_config
from raytron.serve.tp_group import TPGroup
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
        tp, limits = self.cfg.deployment.tensor_parallel, self.cfg.limits
        self.tp_group: TPGroup | None = None

        def start_ranks(folder: Path) -> torch.nn.Module:
            self.tp_group = TPGroup(folder, tp, limits.max_batch_size, limits.context, device, actor.num_cpus,
                                    actor.num_gpus)
            return self.tp_group.model

        loaded = load_model(self.cfg.model.source, self.cfg.model.tracking_uri, device,
                            weights=start_ranks if tp > 1 else None)
        model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.eos_id = loaded.eos_id
        self.chat = loaded.chat
        self.vocab_size = min(self.tokenizer.get_vocab_size(), model.cfg.vocab_size)
        context = limits.context or model.cfg.max_position_embeddings
        self.metrics = ServeMetrics(self.cfg.model.name, serve.get_replica_context().replica_id.unique_id, tp)
        self.engine = Engine(model, loaded.eos_id, self.tokenizer.decode,
                             EngineLimits(limits.max_batch_size, limits.max_tokens_in_flight, context), self.metrics,
                             self.vocab_size, loaded.end_ids)
        self.created = int(time.time())
        log.info("serving %s from %s (context %d, tensor_parallel %d)", self.cfg.model.name, loaded.origin, context,
                 tp)

    async def check_health(self) -> None:
        """Serve's health check: with tensor_parallel > 1 every rank must be alive, else Serve replaces
        the replica (and with it every rank)."""
        if self.tp_group is not None:
            alive, size = await self.tp_group.alive_ranks(), self.tp_group.size
            self.metrics.ranks_alive(alive)
            if alive < size:
                raise RuntimeError(f"{size - alive} of this replica's {size} tensor-parallel ranks are dead or stopped")

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        pids = [os.getpid()] if self.tp_group is None else self.tp_group.pids
        return {"status": "ok", "model": self.cfg.model.name,
                "tensor_parallel": self.cfg.deployment.tensor_parallel, "rank_pids": pids, **self.engine.stats()}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self._answer(request, None, lambda _: models_body(self.cfg.model.name, self.created))

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._answer(request, CompletionRequest, self._completion)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._answer(request, ChatCompletionRequest, self._chat_completion)

    @api.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        return await self._answer(request, TokenizeRequest, self._tokenize)

    @api.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        return await self._answer(request, DetokenizeRequest, self._detokenize)

    @api.get("/tokenizer_info")
    async def tokenizer_info(self, request: Request) -> Response:
        return await self._answer(request, None, lambda _: tokenizer_info(self.tokenizer, self.vocab_size,
                                                                          self.engine.limits.context, self.chat))

    def _tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt or messages", "prompt", "invalid_value")
        if body.messages is None:
            tokens = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False).ids
        else:
            tokens = self.chat.encode(self.tokenizer, body.messages, body.add_generation_prompt is not False,
                                      body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": self.engine.limits.context, "tokens": tokens, "token_strs": None}

    def _detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        return {"prompt": self.tokenizer.decode(list(token_id_list(body.tokens, self.vocab_size, "tokens")))}

    async def _answer(self, request: Request, schema: type | None, handle) -> Response:
        """Count, authorize, parse and validate; any ApiError becomes its OpenAI-style body."""
        self.metrics.request()
        try:
            self._authorize(request)
            body = None
            if schema is not None:
                body = parse_request(schema, await self._json(request))
                if getattr(body, "model", None) not in (None, self.cfg.model.name):
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

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _legacy_logprobs(self, delta: Delta, offset: int) -> tuple[dict[str, Any], int]:
        """A completion delta's logprobs in the legacy shape, and the text offset after its generated
        tokens; with echo the prompt's entries first (they carry text offsets from 0, the generated
        ones from ``offset``)."""
        shape = legacy_logprobs(delta.logprobs, self._token_text, offset)
        after = offset + sum(map(len, shape["tokens"]))
        if delta.prompt_logprobs is None:
            return shape, after
        prompt = legacy_logprobs(delta.prompt_logprobs, self._token_text)
        return {key: prompt[key] + shape[key] for key in shape}, after

    async def _completion(self, body: CompletionRequest) -> Response | dict:
        given = body.prompts()
        prompts = [prompt_ids(prompt, self.tokenizer, self.vocab_size, "prompt" if len(given) == 1 else f"prompt.{i}",
                              self.eos_id) for i, prompt in enumerate(given)]
        choices = prepare_choices(body, prompts, self.engine, self.cfg, self.vocab_size, "prompt")
        request_id, name = new_id("cmpl"), self.cfg.model.name
        prompt_tokens = sum(len(ids) for ids in prompts)
        echo, logprobs = bool(body.echo), body.logprobs
        if logprobs is not None:
            self.metrics.logprob_request()
        # with echo the text starts with the prompt's (as given, or decoded from its token ids)
        prompt_texts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in given]
        opening = {c.index: prompt_texts[c.index // body.choices_per_prompt] if echo else "" for c in choices}
        scoring = dict(logprobs=logprobs, echo=echo and logprobs is not None)
        if body.stream:
            async def events() -> AsyncIterator[str]:
                # a chunk's generated tokens' text offsets go on from the previous chunk's tokens (as
                # the whole reply counts them: a token's text may have gone out in an earlier chunk)
                generated, offsets = 0, {index: len(head) for index, head in opening.items()}
                async for index, delta in self._merged(choices, **scoring):
                    text = opening.pop(index, "") + delta.text
                    if text or delta.finish_reason or delta.logprobs:
                        lp = None
                        if logprobs is not None:
                            lp, offsets[index] = self._legacy_logprobs(delta, offsets[index])
                        yield _sse(completion_body(request_id, name, [text_choice(index, text, delta.finish_reason, lp)],
                                                   None, chunk=True))
                    generated += delta.completion_tokens if delta.finish_reason else 0
                if body.include_usage:
                    yield _sse(completion_body(request_id, name, [], usage(prompt_tokens, generated), chunk=True))
            return self._event_stream(events())
        done = await asyncio.gather(*(self.engine.complete(c.ids, c.params, **scoring) for c in choices))
        answers = []
        for choice, delta in zip(choices, done):
            head = opening[choice.index]
            lp = None if logprobs is None else self._legacy_logprobs(delta, len(head))[0]
            answers.append(text_choice(choice.index, head + delta.text, delta.finish_reason, lp))
        return completion_body(request_id, name, answers, usage(prompt_tokens, sum(d.completion_tokens for d in done)))

    async def _chat_completion(self, body: ChatCompletionRequest) -> Response | dict:
        prompt = prompt_ids(self.chat.encode(self.tokenizer, body.messages), self.tokenizer,
                            self.vocab_size, "messages", self.eos_id)
        choices = prepare_choices(body, [prompt], self.engine, self.cfg, self.vocab_size, "messages", self.chat.stops)
        request_id, name = new_id("chatcmpl"), self.cfg.model.name
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if logprobs is not None:
            self.metrics.logprob_request()
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs", "invalid_value")
        if body.stream:
            async def events() -> AsyncIterator[str]:
                for choice in choices:
                    opening = chat_delta(choice.index, {"role": "assistant", "content": ""}, None)
                    yield _sse(completion_body(request_id, name, [opening], None, chunk=True, chat=True))
                generated = 0
                async for index, delta in self._merged(choices, logprobs=logprobs):
                    lp = None if logprobs is None else chat_logprobs(delta.logprobs, self._token_text)
                    if delta.text or delta.logprobs:
                        chunk = chat_delta(index, {"content": delta.text}, None, lp)
                        yield _sse(completion_body(request_id, name, [chunk], None, chunk=True, chat=True))
                    if delta.finish_reason:
                        closing = chat_delta(index, {}, delta.finish_reason)
                        yield _sse(completion_body(request_id, name, [closing], None, chunk=True, chat=True))
                        generated += delta.completion_tokens
                if body.include_usage:
                    counts = usage(len(prompt), generated)
                    yield _sse(completion_body(request_id, name, [], counts, chunk=True, chat=True))
            return self._event_stream(events())
        done = await asyncio.gather(*(self.engine.complete(c.ids, c.params, logprobs) for c in choices))
        answers = [chat_choice(c.index, d.text, d.finish_reason,
                               None if logprobs is None else chat_logprobs(d.logprobs, self._token_text))
                   for c, d in zip(choices, done)]
        return completion_body(request_id, name, answers, usage(len(prompt), sum(d.completion_tokens for d in done)),
                               chat=True)

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

    async def _merged(self, choices: list[Choice], logprobs: int | None = None,
                      echo: bool = False) -> AsyncIterator[tuple[int, Delta]]:
        """Deltas of several engine streams as they come (at most one per ``http.stream_interval_s``
        each), tagged with the choice's index. Closing this iterator (a client that disconnected)
        cancels every stream, freeing their slots."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async for delta in self.engine.stream(choice.ids, choice.params, self.cfg.http.stream_interval_s,
                                                      logprobs, echo):
                    queue.put_nowait((choice.index, delta))
            except Exception as error:
                queue.put_nowait((choice.index, error))

        tasks = [asyncio.create_task(pump(choice)) for choice in choices]
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
    actor = deployment.ray_actor_options
    options: dict[str, Any] = {"max_ongoing_requests": deployment.max_ongoing_requests,
                               "ray_actor_options": actor.model_dump(),
                               "health_check_period_s": deployment.health_check_period_s}
    if deployment.tensor_parallel > 1:
        # one bundle per rank, all on one node: the replica takes bundle 0, its TPRank actors the others
        bundle = {key: amount for key, amount in (("CPU", actor.num_cpus), ("GPU", actor.num_gpus)) if amount > 0}
        options |= {"placement_group_bundles": [bundle] * deployment.tensor_parallel,
                    "placement_group_strategy": "STRICT_PACK"}
    if deployment.autoscaling_config is not None:
        options["autoscaling_config"] = deployment.autoscaling_config.model_dump()
    else:
        options["num_replicas"] = deployment.num_replicas or 1
    return OpenAIServer.options(**options).bind(cfg.model_dump(mode="json"))


def run_app(cfg: ServeConfig) -> str:
    """Check that the model source exists (ModelSourceError otherwise, before anything starts), start
    Serve's proxy on the config's host and port, deploy, wait until the replicas are up and return the
    base URL; a deploy that fails removes its app. Serve keeps the host and port of its first start in a cluster, so the URL is
    read back from Serve (a cluster already serving elsewhere says where), not from the config."""
    pinned = pinned_to_this_machine(cfg)
    check_source(pinned.model.source, pinned.model.tracking_uri)  # a missing model fails here, not in replicas
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    try:
        serve.run(build_app(pinned), name=cfg.app_name, route_prefix=cfg.http.route_prefix)
    except BaseException:
        # whatever failed the deploy, take the half-deployed app down: Serve's proxy would otherwise
        # keep accepting its requests and never answer them
        serve.delete(cfg.app_name)
        raise
    http = serve.context._get_global_client().get_serve_details()["http_options"]
    if (http["host"], http["port"]) != (cfg.http.host, cfg.http.port):
        log.warning("Serve already listened on %s:%s in this cluster; http.host/port of the config are not applied",
                    http["host"], http["port"])
    return f"http://{http['host']}:{http['port']}{cfg.http.route_prefix.rstrip('/')}"
