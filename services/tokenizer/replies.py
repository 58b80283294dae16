"""What the tokenizer deployment answers: typed structs the ingress reads (``wire`` carries them
through Redis; an ingress of an earlier version gets them over Ray).

Their own module, apart from the deployment, so that the ingress imports them without
transformers (and the torch it brings), which only the tokenizer replicas need.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.errors import InvalidParameterError

# Most prompts the tokenizer deployment encodes as one native batch, and the most one call carries.
MAX_PROMPTS_PER_CALL = 32


@dataclass(frozen=True)
class Encoded:
    token_ids: tuple[int, ...] = ()
    error: InvalidParameterError | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_context_length: int
    vocab_size: int
    is_default: bool
