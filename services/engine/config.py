"""Engine configuration: a small validated dataclass with one default per knob.

These defaults are the only ones: the application's ``EngineSettings``
(services/config.py) takes each of its defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from services.errors import InvalidParameterError

if TYPE_CHECKING:
    import torch

# torch is imported where a dtype or device is built, not here: every Serve replica unpickles
# the application config, which holds this module, and only the engines need torch (importing
# it costs ~3 s of CPU per replica start).
_DTYPES = ("float32", "bfloat16", "float16")
Backend = Literal["native", "vllm"]
BACKENDS: tuple[Backend, ...] = ("native", "vllm")


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs to run one model on one device.

    ``max_num_batched_tokens`` is the per-step token budget shared by the decodes of
    all running sequences and the prefill chunks of new ones (chunked prefill).
    ``backend`` picks the engine that runs it: ours (``native``) or vLLM's
    (``vllm``, services/engine/vllm_backend.py); see services/engine/backend.py.
    """

    model: str
    backend: Backend = "native"
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    kv_cache_memory_gib: float = 0.5
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_gib when set
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    seed: int = 0  # seeds requests that come without one

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidParameterError("model", self.model, "a checkpoint directory is required")
        if self.backend not in BACKENDS:
            raise InvalidParameterError("backend", self.backend, f"must be one of {list(BACKENDS)}")
        if self.dtype not in _DTYPES:
            raise InvalidParameterError("dtype", self.dtype, f"must be one of {sorted(_DTYPES)}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise InvalidParameterError("device", self.device, "must be 'cpu' or 'cuda[:N]'")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise InvalidParameterError("block_size", self.block_size, "must be a power of two")
        if self.kv_cache_memory_gib <= 0:
            raise InvalidParameterError("kv_cache_memory_gib", self.kv_cache_memory_gib, "must be > 0")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise InvalidParameterError("num_kv_blocks", self.num_kv_blocks, "must be >= 1")
        if self.max_num_seqs < 1:
            raise InvalidParameterError("max_num_seqs", self.max_num_seqs, "must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InvalidParameterError(
                "max_num_batched_tokens",
                self.max_num_batched_tokens,
                f"must be >= max_num_seqs ({self.max_num_seqs}) so every running sequence can decode",
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidParameterError("max_model_len", self.max_model_len, "must be >= 2")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype

    @property
    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device)
