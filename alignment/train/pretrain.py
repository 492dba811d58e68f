"""Pretraining a tiny base model from scratch on text rows: the demo's base model, cached by its recipe and corpus.

recipe -> corpus (text rows) -> tokenizer (Qwen2's, or cut down to the corpus) -> a random model of the preset's
shape -> TRL's SFTTrainer on packed text (plain next-token loss on every token) -> `run_dir`, a checkpoint with its
tokenizer that every later stage loads like any other. The run's fingerprint (recipe + corpus sha256) is the cache
key: rerunning the same recipe on the same corpus is a no-op, so later demos reuse the model.

`vocabulary: corpus` keeps only the tokens the corpus uses (`alignment.tokenizer.reduced_tokenizer`): the corpus
tokenises exactly as with Qwen2's tokenizer and any text still tokenises, into smaller pieces, but a 4-layer,
128-wide model no longer spends nearly all its compute on 151,936 rows of LM head (`benchmarks/tiny_vocab.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..checkpoint import init_checkpoint
from ..model.presets import PRESETS
from ..stages import Run, StageError
from ..tokenizer import qwen2_tokenizer, reduced_tokenizer
from .common import TrainingData
from .sft import Qwen2SFTTrainer, SFTRecipe, SFTStage


@dataclass
class PretrainRecipe(SFTRecipe):
    """A base model from scratch: `training:` maps onto trl.SFTConfig, the inputs are text rows, and the model is a
    random one of `preset`'s shape (`model` is not used)."""

    model: str = ""
    preset: str = "tiny"
    vocabulary: Literal["full", "corpus"] = "full"  # corpus: only the tokens the corpus uses (see the module)
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's config fields

    def __post_init__(self) -> None:
        if self.model:
            raise ValueError("model: pretraining starts from a random model of `preset`; leave model out")
        if self.preset not in PRESETS:
            raise ValueError(f"preset: unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        super().__post_init__()


class PretrainStage(SFTStage):
    name = "pretrain"
    recipe_class = PretrainRecipe

    def start_model(self, run: Run, data: TrainingData) -> str:
        """A random model of the preset's shape, with the corpus's tokenizer, written once to run_dir/init."""
        recipe = self.recipe
        if any("text" not in row for row in data.train):
            raise StageError(f"{recipe.stage}: inputs.train: pretraining reads text rows ({{id, text}}), not messages")
        init = run.run_dir / "init"
        if not (init / "config.json").exists():
            texts = [row["text"] for row in data.train + data.eval]
            tokenizer = reduced_tokenizer(texts) if recipe.vocabulary == "corpus" else qwen2_tokenizer()
            init_checkpoint(recipe.preset, init, seed=recipe.seed, tokenizer=tokenizer if recipe.vocabulary == "corpus"
                            else None, **recipe.config)
        return str(init)

    def train(self, run: Run, data: TrainingData, start: str) -> tuple[Qwen2SFTTrainer, dict[str, Any]]:
        trainer, metrics = super().train(run, data, start)
        return trainer, metrics | {"vocabulary_rows": len(trainer.processing_class)}
