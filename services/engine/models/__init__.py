"""Our own forward code for Hugging Face checkpoints of the Llama family.

``load_model(model_dir, device, dtype)`` returns the model and its
:class:`ModelSpec`; the engine's model runner calls ``model(input_ids,
positions, batch, kv_caches)`` and ``model.compute_logits(hidden_rows)``.
"""

from services.engine.models.llama import LlamaFamilyModel
from services.engine.models.loader import SUPPORTED_DTYPES, load_model
from services.engine.models.rope import RopeSpec
from services.engine.models.spec import SUPPORTED_ARCHITECTURES, ModelSpec

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_DTYPES",
    "LlamaFamilyModel",
    "ModelSpec",
    "RopeSpec",
    "load_model",
]
