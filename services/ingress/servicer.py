"""The ingress deployment: its own gRPC server (or one of Ray Serve's) calls the method named
like the RPC.

It authenticates, validates, tokenizes (a call to the tokenizer replicas through Redis,
``services/queue/tokenize_calls.py``), fixes request id and seed, applies the tenant's rate
limits and enqueues durably in Redis. The text
comes back through Redis too: the detokenizer stage writes it to the request's text
stream, and this replica's one reader (``TextFanout``) feeds every open call. No Ray
call carries tokens or text. Everything after "accepted" survives the loss of this
replica: the request lives in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from services.config import IngressConfig
from services.edge_config import GrpcServerSettings
from services.errors import QueueUnavailableError, RequestNotFoundError
from services.ingress import convert
from services.ingress.api_keys import Tenant
from services.ingress.auth import Authenticator, PermissionDeniedError
from services.ingress.grpc_server import IngressGrpcServer, application_stays
from services.ingress.health import IngressHealth
from services.ingress.ratelimit import RateLimiter
from services.ingress.rpc_metrics import counted_stream, counted_unary
from services.ingress.served_models import ServedModels
from services.ingress.status import CallContext, RpcError, abort, parse_request, status_on_error
from services.ingress.text_fanout import TextFanout
from services.ingress.tokenize_batcher import TokenizeBatcher
from services.messages import MAX_SEED, GenerationRequest, StreamRequest, TextDelta
from services.metrics.ingress import IngressMetrics
from services.proto.tokenline.v1 import generation_pb2 as pb
from services.queue import QueueClient
from services.queue.keys import QueueKeys
from services.queue.served_variants import LiveVariants
from services.queue.tokenize_calls import TokenizeCaller
from services.serve_logs import route_to_serve_logs
from services.tokenizer import wire
from services.tokenizer.prompt import Prompt
from services.tokenizer.replies import MAX_PROMPTS_PER_CALL, Encoded

logger = logging.getLogger(__name__)

ANONYMOUS = Tenant(name="anonymous", key_id="", models=(), requests_per_minute=0, tokens_per_minute=0)


class IngressService:
    def __init__(
        self,
        config: IngressConfig,
        redis_url: str,
        tokenizer: Any,
        detokenizer: Any,
        engines: dict[str, Any],
        variant_watcher: Any = None,
        server: GrpcServerSettings | None = None,
    ) -> None:
        route_to_serve_logs()  # our records in this replica's Serve log
        self._config = config
        self._queue = QueueClient(redis_url, config.queue)
        self._auth = Authenticator(redis_url, config.queue.key_prefix, cache_ttl_s=config.auth.cache_ttl_s)
        self._limits = RateLimiter(redis_url, config.queue.key_prefix)
        # The detokenizer and engines are deployed with us; nothing calls them on the request path.
        self._detokenizer = detokenizer
        self._engines = engines
        self._variant_watcher = variant_watcher
        live = config.live_variants
        prefix = config.queue.key_prefix
        variants = LiveVariants(redis_url, prefix, live.cache_ttl_s) if live.enabled else None
        self._served = ServedModels(config, variants, tokenizer)
        replica = f"ingress-{uuid.uuid4().hex}"
        self._tokenizer_calls = TokenizeCaller(redis_url, config.queue, replica)
        self._tokenize = TokenizeBatcher(
            self._call_tokenizer, config.tokenizer_calls_in_flight, MAX_PROMPTS_PER_CALL
        )
        wake_key = QueueKeys(config.queue.key_prefix).wake(replica)
        queue = config.queue
        self._texts = TextFanout(self._queue, wake_key, queue.reader_outage_s, queue.busy_pause_s)
        self._seeds = random.SystemRandom()
        self._health = IngressHealth()
        self.metrics = IngressMetrics()
        # grpc_ingress 'replica': this replica serves the port itself. The port is bound here, so
        # a port held by another program fails the replica's start; Serve constructs us on the
        # event loop that runs our calls, which the server then shares.
        self._server = IngressGrpcServer(self, server) if server is not None else None
        self._server_started = (
            asyncio.get_running_loop().create_task(self._server.start()) if self._server is not None else None
        )

    # ---- lifecycle (Ray Serve calls these) ------------------------------------------------
    def check_health(self) -> None:
        started = self._server_started
        if started is not None and started.done() and started.exception() is not None:
            raise RuntimeError("the ingress gRPC server did not start") from started.exception()

    async def __del__(self) -> None:
        """Serve's graceful stop: our streams are not Serve requests, so the drain happens here."""
        self._health.set_serving(False)
        if self._server is not None:
            await self._server.stop(hand_over=await application_stays())
        await self._texts.aclose()
        await self._tokenizer_calls.aclose()

    # ---- RPCs -----------------------------------------------------------------------------
    @counted_unary
    async def Generate(self, raw: bytes, grpc_context: CallContext) -> pb.GenerateResponse:
        request = parse_request(pb.GenerateRequest, raw, grpc_context)
        text: list[str] = []
        token_ids: list[int] = []
        logprobs: list[float] = []
        top_logprobs: list[pb.TopLogprobs] = []
        last = TextDelta(request_id="")
        async for delta in self._generate(request, grpc_context):
            text.append(delta.text)
            token_ids.extend(delta.token_ids)
            logprobs.extend(delta.logprobs)
            top_logprobs.extend(convert.top_logprobs_proto(delta.top_logprobs))
            last = delta
        return pb.GenerateResponse(
            request_id=last.request_id,
            text="".join(text),
            token_ids=token_ids,
            finish_reason=convert.finish_reason_proto(last.finish_reason),
            matched_stop=last.matched_stop,
            usage=convert.usage_proto(last.usage),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )

    @counted_stream
    async def GenerateStream(
        self, raw: bytes, grpc_context: CallContext
    ) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        request = parse_request(pb.GenerateRequest, raw, grpc_context)
        async for delta in self._generate(request, grpc_context):
            yield convert.stream_response(delta)

    @counted_stream
    async def Resume(
        self, raw: bytes, grpc_context: CallContext
    ) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        """The rest of an accepted request's stream, from token ``from_token``: for a client
        whose stream broke (an ingress replica died, a connection dropped)."""
        request = parse_request(pb.ResumeRequest, raw, grpc_context)
        with status_on_error(grpc_context):
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
    async def Tokenize(self, raw: bytes, grpc_context: CallContext) -> pb.TokenizeResponse:
        request = parse_request(pb.TokenizeRequest, raw, grpc_context)
        with status_on_error(grpc_context):
            model = await self._served.resolve(request.model)
            await self._authenticate(grpc_context, model)
            encoded = await self._encode(model, convert.parse_prompt(request))
        return pb.TokenizeResponse(token_ids=encoded, count=len(encoded))

    @counted_unary
    async def Cancel(self, raw: bytes, grpc_context: CallContext) -> pb.CancelResponse:
        request = parse_request(pb.CancelRequest, raw, grpc_context)
        with status_on_error(grpc_context):
            model = await self._served.resolve(request.model)
            await self._authenticate(grpc_context, model)
            convert.check_request_id(request.request_id)
            found = await self._queue.cancel(model, request.request_id)
        return pb.CancelResponse(found=found)

    @counted_unary
    async def ListModels(self, raw: bytes, grpc_context: CallContext) -> pb.ListModelsResponse:
        # No fields, but corrupt bytes are still refused.
        parse_request(pb.ListModelsRequest, raw, grpc_context)
        with status_on_error(grpc_context):
            tenant = await self._authenticate(grpc_context, None)
            models = await self._served.listing()
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name=m.name,
                    max_context_length=m.max_context_length,
                    vocab_size=m.vocab_size,
                    is_default=m.is_default,
                    **variant_fields,  # type: ignore[arg-type]
                )
                for m, variant_fields in models
                if tenant.allows(m.name)
            ]
        )

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: CallContext
    ) -> health_pb2.HealthCheckResponse:
        return await self._health.Check(request, grpc_context)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context: CallContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        async for status in self._health.Watch(request, grpc_context):
            yield status

    # ---- the path of one request ----------------------------------------------------------
    async def _generate(
        self, request: pb.GenerateRequest, grpc_context: CallContext
    ) -> AsyncIterator[TextDelta]:
        received = time.monotonic()
        with status_on_error(grpc_context):
            accepted = await self._accept(request, grpc_context)
        stream = StreamRequest(
            accepted.request_id, accepted.model, len(accepted.prompt_token_ids), accepted.params.stop
        )
        timer = self.metrics.request_timer(accepted.model, accepted.tenant, received)
        async for delta in self._follow(stream, grpc_context):
            timer.message(delta.finish_reason)
            yield delta

    async def _accept(self, request: pb.GenerateRequest, grpc_context: CallContext) -> GenerationRequest:
        parsed = convert.parse_generate(request)
        model = await self._served.resolve(parsed.model)
        tenant = await self._authenticate(grpc_context, model)
        await self._queue.ensure_room(model)  # before tokenizing: refusing must stay cheap under overload
        prompt_ids = await self._encode(model, parsed.prompt)
        params = parsed.params
        if not parsed.max_tokens_set:
            room = (await self._served.info(model)).max_context_length - len(prompt_ids)
            params = params.with_max_tokens(max(1, min(await self._served.default_max_tokens(model), room)))
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

    async def _follow(self, stream: StreamRequest, grpc_context: CallContext) -> AsyncIterator[TextDelta]:
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

    async def _authenticate(self, grpc_context: CallContext, model: str | None) -> Tenant:
        if not self._config.auth.enabled:
            return ANONYMOUS
        return await self._auth.authenticate(grpc_context.invocation_metadata(), model)

    async def _call_tokenizer(self, prompts: list[tuple[str, Prompt]]) -> list[Encoded]:
        """One call to the tokenizer replicas, through Redis (``services/queue/tokenize_calls.py``)."""
        return wire.decode_reply(await self._tokenizer_calls.call(wire.encode_call(prompts)))

    async def _encode(self, model: str, prompt: Prompt) -> list[int]:
        asked = time.monotonic()
        encoded = await self._tokenize.encode(model, prompt)
        self.metrics.tokenized(model, time.monotonic() - asked)
        if encoded.error is not None:
            raise encoded.error
        return list(encoded.token_ids)
