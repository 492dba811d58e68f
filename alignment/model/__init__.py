"""Our Qwen2 backbone: weight-for-weight compatible with Hugging Face `qwen2` and `qwen2_moe` checkpoints."""

from .config import Qwen2Config, Qwen2MoeConfig
from .dca import enable_long_context
from .modeling import (CAUSAL_LM_CLASSES, SEQUENCE_CLASSIFICATION_CLASSES, Qwen2ForCausalLM,
                       Qwen2ForSequenceClassification, Qwen2Model, Qwen2MoeForCausalLM,
                       Qwen2MoeForSequenceClassification, Qwen2PreTrainedModel)
from .presets import PRESETS, preset_config

__all__ = [
    "CAUSAL_LM_CLASSES",
    "PRESETS",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "Qwen2ForSequenceClassification",
    "Qwen2Model",
    "Qwen2MoeConfig",
    "Qwen2MoeForCausalLM",
    "Qwen2MoeForSequenceClassification",
    "Qwen2PreTrainedModel",
    "SEQUENCE_CLASSIFICATION_CLASSES",
    "enable_long_context",
    "preset_config",
]
