"""A small gRPC client: `tokenline generate`, tests and load tests use it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import grpc

from services.proto.tokenline.v1 import generation_pb2 as pb
from services.proto.tokenline.v1 import generation_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class GenerateOptions:
    target: str = "127.0.0.1:50051"
    model: str = ""
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    chat: bool = False
    api_key: str | None = None
    timeout_s: float = 120.0
    tls: bool = False  # TLS to the server; the CA below, else the system's roots
    ca_file: str | None = None


def channel_credentials(ca_file: str | None) -> grpc.ChannelCredentials:
    """TLS credentials that trust ``ca_file`` (PEM), or the system's roots when None."""
    roots = Path(ca_file).read_bytes() if ca_file else None
    return grpc.ssl_channel_credentials(root_certificates=roots)


class TokenlineClient:
    def __init__(
        self, target: str, api_key: str | None = None, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        self._channel = (
            grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
        )
        self.stub = pb_grpc.GenerationStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TokenlineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, request: pb.GenerateRequest, timeout_s: float = 120.0) -> pb.GenerateResponse:
        response: pb.GenerateResponse = self.stub.Generate(
            request, timeout=timeout_s, metadata=self._metadata
        )
        return response

    def tokenize(self, request: pb.TokenizeRequest, timeout_s: float = 30.0) -> pb.TokenizeResponse:
        response: pb.TokenizeResponse = self.stub.Tokenize(
            request, timeout=timeout_s, metadata=self._metadata
        )
        return response

    def cancel(self, request_id: str, model: str = "", timeout_s: float = 30.0) -> bool:
        request = pb.CancelRequest(request_id=request_id, model=model)
        response: pb.CancelResponse = self.stub.Cancel(request, timeout=timeout_s, metadata=self._metadata)
        return response.found

    def list_models(self, timeout_s: float = 30.0) -> list[pb.ModelInfo]:
        response: pb.ListModelsResponse = self.stub.ListModels(
            pb.ListModelsRequest(), timeout=timeout_s, metadata=self._metadata
        )
        return list(response.models)

    def resume(
        self, request_id: str, from_token: int, timeout_s: float = 120.0
    ) -> Iterator[pb.GenerateStreamResponse]:
        request = pb.ResumeRequest(request_id=request_id, from_token=from_token)
        responses: Iterator[pb.GenerateStreamResponse] = self.stub.Resume(
            request, timeout=timeout_s, metadata=self._metadata
        )
        return responses

    def stream(
        self, request: pb.GenerateRequest, timeout_s: float = 120.0
    ) -> Iterator[pb.GenerateStreamResponse]:
        responses: Iterator[pb.GenerateStreamResponse] = self.stub.GenerateStream(
            request, timeout=timeout_s, metadata=self._metadata
        )
        return responses


def build_request(prompt: str, options: GenerateOptions) -> pb.GenerateRequest:
    sampling = pb.SamplingParams()
    if options.max_tokens is not None:
        sampling.max_tokens = options.max_tokens
    if options.temperature is not None:
        sampling.temperature = options.temperature
    if options.seed is not None:
        sampling.seed = options.seed
    request = pb.GenerateRequest(model=options.model, sampling=sampling)
    if options.chat:
        request.chat.messages.add(role="user", content=prompt)
    else:
        request.text = prompt
    return request


def generate_to_stdout(prompt: str, options: GenerateOptions, out: TextIO) -> int:
    request = build_request(prompt, options)
    credentials = channel_credentials(options.ca_file) if options.tls or options.ca_file else None
    with TokenlineClient(options.target, options.api_key, credentials) as client:
        try:
            if options.stream:
                for message in client.stream(request, options.timeout_s):
                    out.write(message.text)
                    out.flush()
                out.write("\n")
            else:
                out.write(client.generate(request, options.timeout_s).text + "\n")
        except grpc.RpcError as error:
            out.write(f"error: {error.code().name}: {error.details()}\n")
            return 1
    return 0
