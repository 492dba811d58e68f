"""What every trainer stage shares: data splits with quarantine, TRL configs from recipes,
model loading, LoRA, resume, and the final save with metrics, curves and a manifest."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..checkpoint import DTYPES, causal_lm_class
from ..data import DataError, RowKind, read_rows, to_jsonl
from ..model import Qwen2ForCausalLM
from ..stages import RunStart, StageError, begin_run, write_manifest
from .recipes import TrainRecipe


def start_training(name: str, recipe: TrainRecipe) -> RunStart:
    return begin_run(name, recipe, [n for n in ("train", "eval") if n == "train" or recipe.inputs.get(n)])


def load_split(recipe: TrainRecipe, kind: RowKind, run_dir: Path) -> tuple[list[dict], list[dict], dict]:
    """Train and eval rows: `inputs.eval` if given, else a seeded `eval_fraction` of train.

    Bad rows go to run_dir/quarantine.jsonl; the counts are returned for the manifest."""
    try:
        read = {n: read_rows(recipe.inputs[n], kind) for n in ("train", "eval") if recipe.inputs.get(n)}
    except DataError as e:
        raise StageError(f"{recipe.stage}: {e}") from None
    quarantined = [q.record() for r in read.values() for q in r.quarantined]
    atomic_write_text(run_dir / "quarantine.jsonl", to_jsonl(quarantined))
    train = read["train"].rows
    if "eval" in read:
        evaluation = read["eval"].rows
    else:
        order = list(range(len(train)))
        random.Random(recipe.seed).shuffle(order)
        n_eval = int(round(len(train) * recipe.eval_fraction))
        held = set(order[:n_eval])
        evaluation = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    if not train:
        raise StageError(f"{recipe.stage}: {recipe.inputs['train']}: no valid training rows "
                         f"({len(quarantined)} quarantined, see {run_dir / 'quarantine.jsonl'})")
    counts = {"rows_in": sum(r.read for r in read.values()), "quarantined": len(quarantined),
              "train": len(train), "eval": len(evaluation)}
    return train, evaluation, counts


def conversations_dataset(rows: list[dict]):
    """D rows as TRL's conversational language-modelling dataset."""
    import datasets

    return datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])


def preference_dataset(rows: list[dict]):
    """P rows as TRL's conversational preference dataset."""
    import datasets

    return datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])


def trl_config(recipe: TrainRecipe, config_class: type, **overrides: Any):
    """The recipe's `training:` section as TRL's config, writing into the run dir.

    Without an accelerator, `use_cpu` is set so bf16 (autocast) is allowed on CPU."""
    values = {"report_to": "none", **recipe.training, **overrides}
    if not (torch.cuda.is_available() or "use_cpu" in values):
        values["use_cpu"] = True
    return config_class(output_dir=str(recipe.run_dir), seed=recipe.seed, **values)


def peft_config(recipe: TrainRecipe):
    if recipe.lora is None:
        return None
    from peft import LoraConfig

    lora = recipe.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      task_type="SEQ_CLS" if recipe.stage == "rm" else "CAUSAL_LM")


def load_model(path: str, recipe: TrainRecipe, model_class: type | None = None, **kwargs):
    """`model_class` defaults to our causal LM for the checkpoint's model_type (dense or MoE)."""
    return (model_class or causal_lm_class(path)).from_pretrained(path, dtype=DTYPES[recipe.dtype], **kwargs)


def use_native_lm_head(model) -> None:
    """Undo TRL's `add_fused_lm_head` on our model: TRL sets `forward` on the instance to run its
    own chunked LM head; our class's forward answers the same `fused_lm_head=True` call with our
    faster kernel (see `FusedLMHeadOutput`), so the instance attribute is removed."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if isinstance(base, Qwen2ForCausalLM) and "forward" in vars(base):
        del base.forward


def last_checkpoint(run_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None


def plot_history(history: list[dict], path: Path, title: str) -> Path | None:
    """One panel per logged metric against the step: loss, learning rate, eval metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for h in history for k, v in h.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")
                   and not k.startswith(("train_", "total_flos"))})
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        points = [(h["step"], h[key]) for h in history if key in h]
        ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def finish_training(trainer, recipe: TrainRecipe, start: RunStart, counts: dict, metrics: dict, started: float,
                    evaluate: Callable[[Path], dict] | None = None) -> dict:
    """Save the final model (LoRA merged) and tokenizer into the run dir; `evaluate(run_dir)` may
    then measure the saved model; last come metrics, curves and the manifest that marks the run done."""
    run_dir = start.run_dir
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):  # LoRA: the next stage expects a full checkpoint
        model = model.merge_and_unload()
    if trainer.accelerator.is_main_process:
        model.save_pretrained(run_dir)
        trainer.processing_class.save_pretrained(run_dir)
        if evaluate is not None:
            metrics = {**metrics, **evaluate(run_dir)}
        history = trainer.state.log_history
        atomic_write_text(run_dir / "metrics.json", json.dumps({"metrics": metrics, "log_history": history}, indent=2) + "\n")
        plot_history(history, run_dir / "curves.png", f"{recipe.stage}: {run_dir}")
        write_manifest(run_dir, {
            "stage": recipe.stage, "fingerprint": start.fingerprint, "run_dir": str(run_dir), "inputs": start.inputs,
            "recipe": recipe, "seed": recipe.seed, "counts": counts, "metrics": metrics,
            "steps": trainer.state.global_step, "duration_s": round(time.perf_counter() - started, 3),
        })
    trainer.accelerator.wait_for_everyone()
    return json.loads((run_dir / "manifest.json").read_text())
