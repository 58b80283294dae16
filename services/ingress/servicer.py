"""The ingress deployment: Ray Serve's gRPC proxy calls the method named like the RPC.

It validates, tokenizes (tokenizer deployment), fixes request id and seed,
enqueues durably in Redis, and streams text back through the detokenizer
deployment. Everything after "accepted" survives the loss of this replica: the
request lives in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
from ray.serve.grpc_util import RayServegRPCContext

from services.config import AppConfig
from services.errors import ModelNotFoundError, TokenlineError
from services.ingress import convert
from services.ingress.status import RpcError, abort, rpc_error_for
from services.messages import MAX_SEED, GenerationRequest, StreamRequest, TextDelta
from services.proto.tokenline.v1 import generation_pb2 as pb
from services.queue import QueueClient
from services.tokenizer.prompt import Prompt
from services.tokenizer.service import Encoded, ModelInfo

logger = logging.getLogger(__name__)


class IngressService:
    def __init__(
        self, config: AppConfig, redis_url: str, tokenizer: Any, detokenizer: Any, engines: dict[str, Any]
    ) -> None:
        self._config = config
        self._queue = QueueClient(redis_url, config.queue)
        self._tokenizer = tokenizer  # DeploymentHandle[TokenizerService]
        self._detokenizer = detokenizer  # DeploymentHandle[DetokenizerService]
        self._engines = engines  # model name -> DeploymentHandle[EngineReplica]; deployed with us
        self._models: dict[str, ModelInfo] = {}
        self._seeds = random.SystemRandom()

    # ---- RPCs -----------------------------------------------------------------------------
    async def Generate(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> pb.GenerateResponse:
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

    async def GenerateStream(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async for delta in self._generate(request, grpc_context):
            yield convert.stream_response(delta)

    async def Tokenize(
        self, request: pb.TokenizeRequest, grpc_context: RayServegRPCContext
    ) -> pb.TokenizeResponse:
        try:
            model = await self._model_name(request.model)
            encoded = await self._encode(model, convert.parse_prompt(request))
        except TokenlineError as error:
            raise abort(grpc_context, rpc_error_for(error)) from error
        return pb.TokenizeResponse(token_ids=encoded, count=len(encoded))

    async def Cancel(self, request: pb.CancelRequest, grpc_context: RayServegRPCContext) -> pb.CancelResponse:
        try:
            model = await self._model_name(request.model)
            found = await self._queue.cancel(model, request.request_id)
        except TokenlineError as error:
            raise abort(grpc_context, rpc_error_for(error)) from error
        return pb.CancelResponse(found=found)

    async def ListModels(
        self, request: pb.ListModelsRequest, grpc_context: RayServegRPCContext
    ) -> pb.ListModelsResponse:
        models = await self._model_infos()
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name=m.name,
                    max_context_length=m.max_context_length,
                    vocab_size=m.vocab_size,
                    is_default=m.is_default,
                )
                for m in models.values()
            ]
        )

    async def Resume(
        self, request: pb.ResumeRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """The rest of an accepted request's stream, from token ``from_token``: for a client
        whose stream broke (an ingress replica died, a connection dropped)."""
        try:
            stream = await self._queue.stream_request(request.request_id)
        except TokenlineError as error:
            raise abort(grpc_context, rpc_error_for(error)) from error
        if stream is None:
            raise abort(
                grpc_context,
                RpcError(
                    grpc.StatusCode.NOT_FOUND, f"request_id: no request {request.request_id!r} is known"
                ),
            )
        async for delta in self._follow(replace(stream, from_token=request.from_token), grpc_context):
            yield convert.stream_response(delta)

    # ---- the path of one request ----------------------------------------------------------
    async def _generate(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[TextDelta]:
        try:
            accepted = await self._accept(request)
        except TokenlineError as error:
            raise abort(grpc_context, rpc_error_for(error)) from error
        stream = StreamRequest(
            accepted.request_id, accepted.model, len(accepted.prompt_token_ids), accepted.params.stop
        )
        async for delta in self._follow(stream, grpc_context):
            yield delta

    async def _follow(
        self, stream: StreamRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[TextDelta]:
        """Relay the detokenizer's deltas; a stream that ends early cancels the request."""
        finished = False
        try:
            async for delta in self._detokenizer.stream.options(stream=True).remote(stream):
                if delta.error:
                    raise abort(
                        grpc_context, RpcError(grpc.StatusCode.ABORTED, f"request failed: {delta.error}")
                    )
                finished = delta.finish_reason is not None
                yield delta
        finally:
            if not finished:  # client went away, deadline passed or this replica is stopping
                await asyncio.shield(self._queue.cancel(stream.model, stream.request_id))

    async def _accept(self, request: pb.GenerateRequest) -> GenerationRequest:
        parsed = convert.parse_generate(request)
        model = await self._model_name(parsed.model)
        prompt_ids = await self._encode(model, parsed.prompt)
        info = (await self._model_infos())[model]
        room = info.max_context_length - len(prompt_ids)
        params = parsed.params
        if not parsed.max_tokens_set:
            default = self._config.model(model).default_max_tokens  # type: ignore[union-attr]
            params = params.with_max_tokens(max(1, min(default, room)))
        if params.seed is None:
            params = replace(params, seed=self._seeds.randint(0, MAX_SEED))
        accepted = GenerationRequest(
            request_id=parsed.request_id or uuid.uuid4().hex,
            model=model,
            prompt_token_ids=tuple(prompt_ids),
            params=params,
            priority=parsed.priority,
        )
        result = await self._queue.enqueue(accepted)
        logger.info(
            "request accepted",
            extra={
                "request_id": accepted.request_id,
                "model": model,
                "prompt_tokens": len(prompt_ids),
                "duplicate": result.duplicate,
            },
        )
        return accepted

    async def _encode(self, model: str, prompt: Prompt) -> list[int]:
        encoded: Encoded = await self._tokenizer.encode.remote((model, prompt))
        if encoded.error is not None:
            raise encoded.error
        return list(encoded.token_ids)

    async def _model_name(self, requested: str) -> str:
        config = self._config.model(requested)
        if config is None:
            raise ModelNotFoundError(requested)
        return config.name

    async def _model_infos(self) -> dict[str, ModelInfo]:
        if not self._models:
            infos: list[ModelInfo] = await self._tokenizer.models.remote()
            self._models = {info.name: info for info in infos}
        return self._models
