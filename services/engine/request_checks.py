"""The checks every engine backend makes before it admits a request, so that ours and vLLM's
refuse the same requests with the same typed errors naming the field."""

from __future__ import annotations

from collections.abc import Container, Sequence

from services.errors import InvalidParameterError
from services.messages import SamplingParams


def check_request(
    request_id: str,
    running: Container[str],
    prompt_ids: Sequence[int],
    params: SamplingParams,
    output_prefix: Sequence[int],
    *,
    vocab_size: int,
    max_model_len: int,
) -> None:
    if not isinstance(request_id, str) or not request_id:
        raise InvalidParameterError("request_id", request_id, "must be a non-empty string")
    if request_id in running:
        raise InvalidParameterError("request_id", request_id, "a request with this id is running")
    if not isinstance(params, SamplingParams):
        raise InvalidParameterError("params", type(params).__name__, "must be SamplingParams")
    if len(prompt_ids) == 0:
        raise InvalidParameterError("prompt", 0, "must hold at least one token")
    for field_name, ids in (("prompt", prompt_ids), ("output_prefix", output_prefix)):
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
                raise InvalidParameterError(
                    f"{field_name}.token_ids", token_id, f"token ids must be integers in [0, {vocab_size})"
                )
    total = len(prompt_ids) + len(output_prefix)
    if total >= max_model_len:
        raise InvalidParameterError(
            "prompt", total, f"prompt of {total} tokens leaves no room in a context of {max_model_len}"
        )
    if len(output_prefix) >= params.max_tokens:
        raise InvalidParameterError(
            "output_prefix", len(output_prefix), f"already holds max_tokens={params.max_tokens} tokens"
        )
