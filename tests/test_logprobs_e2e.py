"""Top-N logprobs over the whole stack: gRPC -> ingress -> Redis -> engine -> detokenizer ->
client, real Ray, real Redis, the real demo model; checked against the model's own
log-softmax computed here from the same checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from services.client import TokenlineClient
from services.messages import MAX_LOGPROBS
from services.proto.tokenline.v1 import generation_pb2 as pb
from services.tokenizer.tokenizer import PromptTokenizer
from tests.checkpoints import load_reference_model
from tests.serving_stack import Stack

PROMPT = "12+35="
OUTPUT_TOKENS = 8
TOP_N = 3


@pytest.fixture
def client(stack: Stack) -> Iterator[TokenlineClient]:
    with TokenlineClient(stack.target, stack.api_key) as c:
        yield c


def greedy_request(request_id: str = "", logprobs: int = TOP_N) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(
        temperature=0.0, max_tokens=OUTPUT_TOKENS, ignore_eos=True, logprobs=logprobs
    )
    return pb.GenerateRequest(request_id=request_id, text=PROMPT, sampling=sampling)


def alternatives_of(tops: list[pb.TopLogprobs]) -> list[list[tuple[int, float, str]]]:
    return [[(a.token_id, a.logprob, a.text) for a in top.alternatives] for top in tops]


def test_each_token_has_its_top_alternatives_as_the_model_ranks_them(
    client: TokenlineClient, demo_model_dir: Path
) -> None:
    response = client.generate(greedy_request())
    ids = list(response.token_ids)
    assert len(ids) == OUTPUT_TOKENS == len(response.logprobs) == len(response.top_logprobs)
    tokenizer = PromptTokenizer(demo_model_dir)
    for token, logprob, top in zip(
        ids, response.logprobs, alternatives_of(list(response.top_logprobs)), strict=True
    ):
        assert len(top) == TOP_N
        assert len({token_id for token_id, _, _ in top}) == TOP_N, "alternatives repeat a token"
        values = [value for _, value, _ in top]
        assert values == sorted(values, reverse=True)
        assert top[0][0] == token and top[0][1] == logprob, "greedy: the sampled token is the best one"
        assert all(text == tokenizer.decode([token_id]) for token_id, _, text in top)

    # The model's own next-token distributions at every output position, from the checkpoint.
    prompt_ids = list(client.tokenize(pb.TokenizeRequest(text=PROMPT)).token_ids)
    model = load_reference_model(demo_model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + ids])).logits[0]
    reference = torch.log_softmax(logits[len(prompt_ids) - 1 : -1].float(), dim=-1)
    for position, top in enumerate(alternatives_of(list(response.top_logprobs))):
        values, best = torch.topk(reference[position], TOP_N)
        assert [token_id for token_id, _, _ in top] == best.tolist(), f"output token {position}"
        assert [value for _, value, _ in top] == pytest.approx(values.tolist(), abs=1e-3)


def test_stream_and_resume_from_the_middle_keep_alternatives_with_their_tokens(
    client: TokenlineClient,
) -> None:
    unary = client.generate(greedy_request())
    streamed: list[int] = []
    streamed_tops: list[pb.TopLogprobs] = []
    for message in client.stream(greedy_request(request_id="logprobs-resume")):
        assert len(message.top_logprobs) == len(message.token_ids) == len(message.logprobs)
        streamed.extend(message.token_ids)
        streamed_tops.extend(message.top_logprobs)
    assert streamed == list(unary.token_ids)
    assert alternatives_of(streamed_tops) == alternatives_of(list(unary.top_logprobs))

    for from_token in (1, OUTPUT_TOKENS // 2, OUTPUT_TOKENS - 1):
        resumed: list[int] = []
        resumed_tops: list[pb.TopLogprobs] = []
        for message in client.resume("logprobs-resume", from_token):
            assert message.token_index == from_token + len(resumed)
            assert len(message.top_logprobs) == len(message.token_ids) == len(message.logprobs)
            resumed.extend(message.token_ids)
            resumed_tops.extend(message.top_logprobs)
        assert resumed == streamed[from_token:]
        assert alternatives_of(resumed_tops) == alternatives_of(streamed_tops[from_token:])


def test_logprobs_zero_gives_logprobs_without_alternatives(client: TokenlineClient) -> None:
    response = client.generate(greedy_request(logprobs=0))
    assert len(response.logprobs) == len(response.token_ids) == OUTPUT_TOKENS
    assert not response.top_logprobs


def test_more_alternatives_than_the_limit_is_invalid_argument_naming_the_field(
    client: TokenlineClient,
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        client.generate(greedy_request(logprobs=MAX_LOGPROBS + 1))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.logprobs" in (error.value.details() or "")
