"""Our Qwen2 backbone: weight-for-weight compatible with Hugging Face `qwen2` checkpoints."""

from .config import Qwen2Config
from .dca import enable_long_context
from .modeling import Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen2Model, Qwen2PreTrainedModel
from .presets import PRESETS, preset_config

__all__ = [
    "PRESETS",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "Qwen2ForSequenceClassification",
    "Qwen2Model",
    "Qwen2PreTrainedModel",
    "enable_long_context",
    "preset_config",
]
