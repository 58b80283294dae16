"""The committed gRPC stubs match the proto, and the contract behaves as documented."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.proto.tokenline.v1 import generation_pb2, generation_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMITTED_STUBS = REPO_ROOT / "services" / "proto"


def _files_under(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_committed_stubs_are_what_the_generator_writes(tmp_path: Path) -> None:
    out = tmp_path / "proto"
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "protos" / "generate_stubs.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    regenerated, committed = _files_under(out), _files_under(COMMITTED_STUBS)
    assert sorted(regenerated) == sorted(committed), "run `make stubs` and commit services/proto"
    stale = [name for name in regenerated if regenerated[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `make stubs` and commit services/proto"


def test_service_has_every_rpc_with_its_streaming_shape() -> None:
    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    shapes = {
        method.name: (method.input_type.name, method.output_type.name, method.server_streaming)
        for method in service.methods
    }
    assert shapes == {
        "Generate": ("GenerateRequest", "GenerateResponse", False),
        "GenerateStream": ("GenerateRequest", "GenerateStreamResponse", True),
        "Tokenize": ("TokenizeRequest", "TokenizeResponse", False),
        "Cancel": ("CancelRequest", "CancelResponse", False),
        "ListModels": ("ListModelsRequest", "ListModelsResponse", False),
        "Resume": ("ResumeRequest", "GenerateStreamResponse", True),
    }
    assert not any(method.client_streaming for method in service.methods)


def test_unset_sampling_fields_differ_from_zero() -> None:
    params = generation_pb2.SamplingParams(temperature=0.0, seed=0)
    assert params.HasField("temperature") and params.temperature == 0.0
    assert params.HasField("seed")
    for name in ("top_p", "top_k", "min_p", "max_tokens", "ignore_eos", "logprobs", "repetition_penalty"):
        assert not params.HasField(name), name
    decoded = generation_pb2.SamplingParams.FromString(params.SerializeToString())
    assert decoded.HasField("temperature") and not decoded.HasField("top_p")


def test_prompt_is_one_of_text_token_ids_or_chat() -> None:
    request = generation_pb2.GenerateRequest(text="hello")
    assert request.WhichOneof("prompt") == "text"
    request.chat.messages.add(role="user", content="hi")
    assert request.WhichOneof("prompt") == "chat"
    assert request.text == ""
    request.token_ids.ids.extend([1, 2, 3])
    assert request.WhichOneof("prompt") == "token_ids"
    assert not request.HasField("chat")


def test_finish_reason_zero_means_not_finished() -> None:
    assert (
        generation_pb2.GenerateStreamResponse().finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED == 0
    )
    assert dict(generation_pb2.FinishReason.items()) == {
        "FINISH_REASON_UNSPECIFIED": 0,
        "FINISH_REASON_STOP": 1,
        "FINISH_REASON_LENGTH": 2,
        "FINISH_REASON_ABORT": 3,
    }


def test_messages_pickle_by_their_importable_module() -> None:
    # Ray moves request messages between processes with pickle.
    request = generation_pb2.GenerateRequest(request_id="r1", text="hi", sampling={"seed": 7})
    assert type(request).__module__ == "services.proto.tokenline.v1.generation_pb2"
    assert pickle.loads(pickle.dumps(request)) == request


class _TokenizeOnly(generation_pb2_grpc.GenerationServicer):
    def Tokenize(
        self, request: generation_pb2.TokenizeRequest, context: Any
    ) -> generation_pb2.TokenizeResponse:
        ids = list(request.text.encode())
        return generation_pb2.TokenizeResponse(token_ids=ids, count=len(ids))


@pytest.fixture
def loopback_stub() -> Iterator[generation_pb2_grpc.GenerationStub]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    generation_pb2_grpc.add_GenerationServicer_to_server(_TokenizeOnly(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield generation_pb2_grpc.GenerationStub(channel)
    finally:
        server.stop(grace=None)


def test_stubs_carry_calls_over_a_real_channel(loopback_stub: generation_pb2_grpc.GenerationStub) -> None:
    reply = loopback_stub.Tokenize(generation_pb2.TokenizeRequest(text="hé"), timeout=10)
    assert list(reply.token_ids) == list("hé".encode()) and reply.count == 3
    with pytest.raises(grpc.RpcError) as error:
        list(loopback_stub.Resume(generation_pb2.ResumeRequest(request_id="r1", from_token=4), timeout=10))
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
