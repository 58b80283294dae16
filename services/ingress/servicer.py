"""The ingress deployment: Ray Serve's gRPC proxy calls the method named like the RPC.

It authenticates, validates, tokenizes (tokenizer deployment), fixes request id
and seed, applies the tenant's rate limits and enqueues durably in Redis. The text
comes back through Redis too: the detokenizer stage writes it to the request's text
stream, and this replica's one reader (``TextFanout``) feeds every open call. No Ray
call carries tokens or text. Everything after "accepted" survives the loss of this
replica: the request lives in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from ray.serve.grpc_util import RayServegRPCContext

from services.config import IngressConfig
from services.errors import ModelNotFoundError, QueueUnavailableError, RequestNotFoundError, TokenlineError
from services.ingress import convert
from services.ingress.api_keys import Tenant
from services.ingress.auth import Authenticator, PermissionDeniedError
from services.ingress.ratelimit import RateLimiter
from services.ingress.rpc_metrics import counted_stream, counted_unary
from services.ingress.status import RpcError, abort, rpc_error_for
from services.ingress.text_fanout import TextFanout
from services.messages import MAX_SEED, GenerationRequest, StreamRequest, TextDelta
from services.metrics.ingress import IngressMetrics
from services.proto.tokenline.v1 import generation_pb2 as pb
from services.queue import QueueClient
from services.queue.keys import QueueKeys
from services.tokenizer.prompt import Prompt
from services.tokenizer.service import Encoded, ModelInfo

logger = logging.getLogger(__name__)

ANONYMOUS = Tenant(name="anonymous", key_id="", models=(), requests_per_minute=0, tokens_per_minute=0)


@contextlib.contextmanager
def _status_on_error(grpc_context: RayServegRPCContext) -> Iterator[None]:
    """Turn a typed error into the RPC's status code (INVALID_ARGUMENT, NOT_FOUND, ...)."""
    try:
        yield
    except TokenlineError as error:
        raise abort(grpc_context, rpc_error_for(error)) from error


_Message = TypeVar("_Message", bound=Message)


def _parse(message_type: type[_Message], raw: bytes, grpc_context: RayServegRPCContext) -> _Message:
    with _status_on_error(grpc_context):
        return convert.parse_message(message_type, raw)


class IngressService:
    def __init__(
        self, config: IngressConfig, redis_url: str, tokenizer: Any, detokenizer: Any, engines: dict[str, Any]
    ) -> None:
        self._config = config
        self._queue = QueueClient(redis_url, config.queue)
        self._auth = Authenticator(redis_url, config.queue.key_prefix, cache_ttl_s=config.auth.cache_ttl_s)
        self._limits = RateLimiter(redis_url, config.queue.key_prefix)
        self._tokenizer = tokenizer  # DeploymentHandle[TokenizerService]
        # The detokenizer and engines are deployed with us; nothing calls them on the request path.
        self._detokenizer = detokenizer
        self._engines = engines
        wake_key = QueueKeys(config.queue.key_prefix).wake(f"ingress-{uuid.uuid4().hex}")
        self._texts = TextFanout(self._queue, wake_key, config.queue.reader_outage_s)
        self._models: dict[str, ModelInfo] = {}
        self._seeds = random.SystemRandom()
        self.metrics = IngressMetrics()

    # ---- RPCs -----------------------------------------------------------------------------
    @counted_unary
    async def Generate(self, raw: bytes, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        request = _parse(pb.GenerateRequest, raw, grpc_context)
        text: list[str] = []
        token_ids: list[int] = []
        logprobs: list[float] = []
        last = TextDelta(request_id="")
        async for delta in self._generate(request, grpc_context):
            text.append(delta.text)
            token_ids.extend(delta.token_ids)
            logprobs.extend(delta.logprobs)
            last = delta
        return pb.GenerateResponse(
            request_id=last.request_id,
            text="".join(text),
            token_ids=token_ids,
            finish_reason=convert.finish_reason_proto(last.finish_reason),
            matched_stop=last.matched_stop,
            usage=convert.usage_proto(last.usage),
            logprobs=logprobs,
        )

    @counted_stream
    async def GenerateStream(
        self, raw: bytes, grpc_context: RayServegRPCContext
    ) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        request = _parse(pb.GenerateRequest, raw, grpc_context)
        async for delta in self._generate(request, grpc_context):
            yield convert.stream_response(delta)

    @counted_stream
    async def Resume(
        self, raw: bytes, grpc_context: RayServegRPCContext
    ) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        """The rest of an accepted request's stream, from token ``from_token``: for a client
        whose stream broke (an ingress replica died, a connection dropped)."""
        request = _parse(pb.ResumeRequest, raw, grpc_context)
        with _status_on_error(grpc_context):
            tenant = await self._authenticate(grpc_context, None)  # before the lookup: no probing of ids
            convert.check_request_id(request.request_id)
            stream = await self._queue.stream_request(request.request_id)
            if stream is None:
                raise RequestNotFoundError(request.request_id)
            if not tenant.allows(stream.model):
                raise PermissionDeniedError(tenant.name, stream.model)
        async for delta in self._follow(replace(stream, from_token=request.from_token), grpc_context):
            yield convert.stream_response(delta)

    @counted_unary
    async def Tokenize(self, raw: bytes, grpc_context: RayServegRPCContext) -> pb.TokenizeResponse:
        request = _parse(pb.TokenizeRequest, raw, grpc_context)
        with _status_on_error(grpc_context):
            model = self._model_name(request.model)
            await self._authenticate(grpc_context, model)
            encoded = await self._encode(model, convert.parse_prompt(request))
        return pb.TokenizeResponse(token_ids=encoded, count=len(encoded))

    @counted_unary
    async def Cancel(self, raw: bytes, grpc_context: RayServegRPCContext) -> pb.CancelResponse:
        request = _parse(pb.CancelRequest, raw, grpc_context)
        with _status_on_error(grpc_context):
            model = self._model_name(request.model)
            await self._authenticate(grpc_context, model)
            convert.check_request_id(request.request_id)
            found = await self._queue.cancel(model, request.request_id)
        return pb.CancelResponse(found=found)

    @counted_unary
    async def ListModels(self, raw: bytes, grpc_context: RayServegRPCContext) -> pb.ListModelsResponse:
        _parse(pb.ListModelsRequest, raw, grpc_context)  # no fields, but corrupt bytes are still refused
        with _status_on_error(grpc_context):
            tenant = await self._authenticate(grpc_context, None)
            models = await self._model_infos()
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name=m.name,
                    max_context_length=m.max_context_length,
                    vocab_size=m.vocab_size,
                    is_default=m.is_default,
                    **self._config.variant_fields(m.name),  # type: ignore[arg-type]
                )
                for m in models.values()
                if tenant.allows(m.name)
            ]
        )

    # ---- the path of one request ----------------------------------------------------------
    async def _generate(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[TextDelta]:
        received = time.monotonic()
        with _status_on_error(grpc_context):
            accepted = await self._accept(request, grpc_context)
        stream = StreamRequest(
            accepted.request_id, accepted.model, len(accepted.prompt_token_ids), accepted.params.stop
        )
        timer = self.metrics.request_timer(accepted.model, accepted.tenant, received)
        async for delta in self._follow(stream, grpc_context):
            timer.message(delta.finish_reason)
            yield delta

    async def _accept(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> GenerationRequest:
        parsed = convert.parse_generate(request)
        model = self._model_name(parsed.model)
        tenant = await self._authenticate(grpc_context, model)
        await self._queue.ensure_room(model)  # before tokenizing: refusing must stay cheap under overload
        prompt_ids = await self._encode(model, parsed.prompt)
        params = parsed.params
        if not parsed.max_tokens_set:
            room = (await self._model_infos())[model].max_context_length - len(prompt_ids)
            params = params.with_max_tokens(max(1, min(self._default_max_tokens(model), room)))
        if params.seed is None:
            params = replace(params, seed=self._seeds.randint(0, MAX_SEED))
        await self._limits.admit(tenant, len(prompt_ids) + params.max_tokens)
        accepted = GenerationRequest(
            request_id=parsed.request_id or uuid.uuid4().hex,
            model=model,
            prompt_token_ids=tuple(prompt_ids),
            params=params,
            priority=parsed.priority,
            arrival_time=time.time(),  # wall clock: the engine that claims it may run on another node
            tenant=tenant.name,
        )
        result = await self._queue.enqueue(accepted)
        if not result.duplicate:
            self.metrics.accepted(model, tenant.name, len(prompt_ids))
        logger.info(
            "request accepted",
            extra={
                "request_id": accepted.request_id,
                "model": model,
                "tenant": tenant.name,
                "prompt_tokens": len(prompt_ids),
                "duplicate": result.duplicate,
            },
        )
        return accepted

    async def _follow(
        self, stream: StreamRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[TextDelta]:
        """Relay the request's text deltas; a stream that ends early cancels the request."""
        finished = False  # True also when the client is told to resume
        next_index = stream.from_token
        try:
            async for delta in self._texts.follow(stream.request_id, stream.from_token):
                if delta.error:
                    error = RpcError(grpc.StatusCode.ABORTED, f"request failed: {delta.error}")
                    raise abort(grpc_context, error)
                finished = delta.finish_reason is not None
                next_index = delta.token_index + len(delta.token_ids)
                yield delta
        except QueueUnavailableError as outage:
            # The request is safe in Redis and runs on once Redis is back: say where to resume,
            # and leave it running for that.
            finished = True
            details = f"{outage}; resume request_id={stream.request_id} from_token={next_index}"
            raise abort(grpc_context, RpcError(grpc.StatusCode.UNAVAILABLE, details)) from outage
        finally:
            if not finished:  # client went away, deadline passed or this replica is stopping
                await asyncio.shield(self._cancel_quietly(stream))

    # ---- helpers --------------------------------------------------------------------------
    async def _cancel_quietly(self, stream: StreamRequest) -> None:
        """Best effort: with Redis away the engine runs to max_tokens and nobody reads the rest."""
        try:
            await self._queue.cancel(stream.model, stream.request_id)
        except QueueUnavailableError:
            logger.warning("could not cancel an abandoned stream", extra={"request_id": stream.request_id})

    async def _authenticate(self, grpc_context: RayServegRPCContext, model: str | None) -> Tenant:
        if not self._config.auth.enabled:
            return ANONYMOUS
        return await self._auth.authenticate(grpc_context.invocation_metadata(), model)

    async def _encode(self, model: str, prompt: Prompt) -> list[int]:
        encoded: Encoded = await self._tokenizer.encode.remote((model, prompt))
        if encoded.error is not None:
            raise encoded.error
        return list(encoded.token_ids)

    def _model_name(self, requested: str) -> str:
        name = self._config.model_name(requested)
        if name is None:
            raise ModelNotFoundError(requested)
        return name

    def _default_max_tokens(self, model: str) -> int:
        return self._config.default_max_tokens[model]

    async def _model_infos(self) -> dict[str, ModelInfo]:
        if not self._models:
            infos: list[ModelInfo] = await self._tokenizer.models.remote()
            self._models = {info.name: info for info in infos}
        return self._models
