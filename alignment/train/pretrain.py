"""Pretraining a tiny base model from scratch on text rows: the demo's base model, cached by its recipe and corpus.

recipe -> corpus (text rows) -> tokenizer (Qwen2's, or cut down to the corpus) -> a random model of the preset's
shape -> TRL's SFTTrainer on packed text (plain next-token loss on every token) -> `run_dir`, a checkpoint with its
tokenizer that every later stage loads like any other. The stage runtime's fingerprint (recipe + corpus sha256)
is the cache key: rerunning the same recipe on the same corpus is a no-op, so later demos reuse the model.

`vocabulary: corpus` keeps only the tokens the corpus uses (`alignment.tokenizer.reduced_tokenizer`): the corpus
tokenises exactly as with Qwen2's tokenizer and any text still tokenises, into smaller pieces, but a 4-layer,
128-wide model no longer spends nearly all its compute on 151,936 rows of LM head
(`benchmarks/tiny_vocab.py` measures the difference).
"""

from __future__ import annotations

from dataclasses import fields

from ..checkpoint import init_checkpoint
from ..stages import StageError
from ..tokenizer import qwen2_tokenizer, reduced_tokenizer
from .common import load_training_data, save_model, start_training, train, write_run_artifacts
from .recipes import PretrainRecipe, SFTRecipe
from .sft import build_sft_trainer


def run_pretrain(recipe: PretrainRecipe) -> dict:
    run = start_training(recipe)
    if run.done:
        return run.done
    data = load_training_data(recipe, "demonstration", run)
    if any("text" not in row for row in data.train):
        raise StageError(f"{recipe.stage}: inputs.train: pretraining reads text rows ({{id, text}}), not messages")
    texts = [row["text"] for row in data.train + data.eval]
    tokenizer = reduced_tokenizer(texts) if recipe.vocabulary == "corpus" else qwen2_tokenizer()
    init = run.run_dir / "init"
    if not (init / "config.json").exists():
        init_checkpoint(recipe.preset, init, seed=recipe.seed, tokenizer=tokenizer if recipe.vocabulary == "corpus"
                        else None, **recipe.config)
    start = SFTRecipe(**{f.name: getattr(recipe, f.name) for f in fields(SFTRecipe)} | {"model": str(init)})
    trainer = build_sft_trainer(start, data)
    metrics = train(trainer, start)
    metrics["train_tokens_per_s"] = trainer._total_train_tokens / max(metrics["train_runtime_s"], 1e-9)
    metrics["vocabulary_rows"] = len(tokenizer)
    if data.eval:
        metrics |= {k: v for k, v in trainer.evaluate().items() if k.startswith("eval_")}
    save_model(trainer, start, run)
    return write_run_artifacts(trainer, start, run, data.counts, metrics)
