"""The steps every trainer stage takes, in order: recipe -> data -> model -> trainer -> artifacts.

    run = start_training(recipe)                      # run dir, fingerprint; `run.done` if finished
    data = load_training_data(recipe, kind, run)      # train / eval rows, quarantine, counts
    model = load_trained_model(recipe)                # fp32 master weights (see below)
    trainer = TRLTrainer(model=model, args=trl_config(recipe, Config), train_dataset=data.train_dataset(), ...)
    metrics = train(trainer, recipe)                  # resumes from the last checkpoint
    save_model(trainer, recipe, run)                  # LoRA merged, in the starting checkpoint's dtype
    write_run_artifacts(trainer, recipe, run, data.counts, metrics)   # metrics, curves, manifest

Precision: the recipe's `dtype` is the compute precision (`auto` measures on CPU, see
`alignment.precision`). The trained weights and the optimizer state stay in float32 and bf16
runs through autocast, as in transformers' Trainer: an AdamW step of ~7e-6 is below bf16's
spacing near |w| = 0.02 (~1.2e-4), so weights trained in bf16 would mostly never move. Only
under DeepSpeed, which keeps its own fp32 master copy, and with LoRA, whose frozen base needs
none, is the model loaded in the compute dtype.

Sharded training (FSDP2, DeepSpeed ZeRO-3): the model is saved through `trainer.save_model`, which
gathers the whole weights, and what is evaluated after training (DPO's held-out margins, the reward
model's pair accuracy) is scored by whole models loaded afresh on each process's device, each
process scoring its share of the rows (`score_in_shares`).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TokenizersBackend

from ..atomic import atomic_write_text
from ..checkpoint import DTYPES, causal_lm_class
from ..data import DataError, RowKind, as_sources, read_rows, to_jsonl, trl_dataset
from ..model import Qwen2ForCausalLM
from ..precision import resolve_dtype
from ..stages import RunStart, StageError, begin_run, write_manifest
from ..tokenizer import load_tokenizer
from .recipes import TrainRecipe


def start_training(recipe: TrainRecipe) -> RunStart:
    return begin_run(recipe.stage, recipe, [n for n in ("train", "eval") if n == "train" or recipe.inputs.get(n)])


@dataclass
class TrainingData:
    kind: RowKind
    train: list[dict]
    eval: list[dict]
    counts: dict[str, int]

    def train_dataset(self):
        """The training rows as the dataset type TRL expects for them."""
        return trl_dataset(self.train, self.kind)

    def eval_dataset(self):
        return trl_dataset(self.eval, self.kind) if self.eval else None


def load_training_data(recipe: TrainRecipe, kind: RowKind, run: RunStart) -> TrainingData:
    """Train and eval rows: `inputs.eval` if given, else a seeded `eval_fraction` of train.

    Bad rows go to run_dir/quarantine.jsonl; the counts go into the manifest."""
    try:
        read = {n: read_rows(recipe.inputs[n], kind) for n in ("train", "eval") if recipe.inputs.get(n)}
    except DataError as e:
        raise StageError(f"{recipe.stage}: {e}") from None
    quarantined = [q.record() for r in read.values() for q in r.quarantined]
    atomic_write_text(run.run_dir / "quarantine.jsonl", to_jsonl(quarantined))
    train = read["train"].rows
    if "eval" in read:
        evaluation = read["eval"].rows
    else:
        order = list(range(len(train)))
        random.Random(recipe.seed).shuffle(order)
        held = set(order[: int(round(len(train) * recipe.eval_fraction))])
        evaluation = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    if not train:
        sources = " + ".join(str(source) for source in as_sources(recipe.inputs["train"]))
        raise StageError(f"{recipe.stage}: {sources}: no valid training rows "
                         f"({len(quarantined)} quarantined, see {run.run_dir / 'quarantine.jsonl'})")
    counts = {"rows_in": sum(r.read for r in read.values()), "quarantined": len(quarantined),
              "merged_into_pairs": sum(r.merged for r in read.values()), "train": len(train), "eval": len(evaluation)}
    return TrainingData(kind, train, evaluation, counts)


def load_trainer_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer (`load_tokenizer`) for TRL's trainers, without the Python copies of
    the vocabulary and merges that tokenizers-backed classes such as Qwen2Tokenizer keep after building
    their Rust tokenizer from them, and never read again.

    Why: TRL tokenises through `Dataset.map` with the tokenizer in `fn_kwargs`, and `datasets`
    fingerprints each map by pickling its arguments in pure Python: for Qwen2's 151,643 tokens and
    151,387 merges that was ~2 s a map (train and eval: most of a trainer's start). The Rust tokenizer,
    which encodes, decodes and is saved, is left as it is: tokenisation and saved files do not change."""
    tokenizer = load_tokenizer(path)
    if isinstance(tokenizer, TokenizersBackend):  # Python-backed tokenizers may use theirs
        for construction_input in ("_vocab", "_merges"):
            vars(tokenizer).pop(construction_input, None)
    return tokenizer


def compute_dtype(recipe: TrainRecipe) -> str:
    """The recipe's compute precision on this machine (`auto` resolved)."""
    return resolve_dtype(recipe.dtype)[0]


def trl_config(recipe: TrainRecipe, config_class: type, **overrides: Any):
    """The recipe's `training:` section as TRL's config (its `__post_init__` checks run), writing
    into the run dir with the recipe's seed and precision. Also called when a recipe is validated.

    Without an accelerator, `use_cpu` is set so bf16 (autocast) is allowed on CPU."""
    dtype = compute_dtype(recipe)
    values = {"report_to": "none", **recipe.training, **overrides,
              "bf16": dtype == "bfloat16", "fp16": dtype == "float16"}
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


def weights_dtype(recipe: TrainRecipe) -> str:
    """The dtype the trained model is loaded in: float32 master weights, except under DeepSpeed
    (its optimizer keeps the fp32 master copy) and with LoRA (the frozen base needs none; PEFT
    keeps the adapters in float32). FSDP2 keeps the float32 weights as its sharded master copy
    (accelerate would upcast bf16 ones) and its MixedPrecisionPolicy casts them for compute."""
    deepspeed = bool(recipe.training.get("deepspeed")) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "") == "true"
    return compute_dtype(recipe) if deepspeed or recipe.lora is not None else "float32"


def load_trained_model(recipe: TrainRecipe, model_class: type | None = None, **kwargs):
    """The model to train, in `weights_dtype`.

    `model_class` defaults to our causal LM for the checkpoint's model_type (dense or MoE)."""
    why = resolve_dtype(recipe.dtype)[1]
    weights = weights_dtype(recipe)
    print(f"{recipe.stage}: compute {why}; weights and optimizer state in {weights}")
    return (model_class or causal_lm_class(recipe.model)).from_pretrained(recipe.model, dtype=DTYPES[weights], **kwargs)


def load_frozen_model(path: str, recipe: TrainRecipe, device: torch.device | str | None = None):
    """A model that is only evaluated (the DPO reference), in the compute dtype, without gradients,
    on `device` (default: CPU)."""
    model = causal_lm_class(path).from_pretrained(path, dtype=DTYPES[compute_dtype(recipe)], device_map=device)
    return model.eval().requires_grad_(False)


@contextmanager
def whole_models(accelerator=None) -> Iterator[None]:
    """Within it, `from_pretrained` gives every process the whole model, as without sharding. Under
    FSDP's CPU-RAM-efficient loading transformers reads the weights on local rank 0 only: the others
    get zeros, which accelerate's `prepare` overwrites from rank 0 but TRL's `prepare_fsdp` (the DPO
    reference) does not. With the trainer's `accelerator` under ZeRO-3, the model is not partitioned
    as it is built (which takes all processes in step) and the LM-head kernel gathers nothing."""
    from accelerate.utils import patch_environment
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    deepspeed = accelerator.state.deepspeed_plugin if accelerator is not None else None
    with patch_environment(FSDP_CPU_RAM_EFFICIENT_LOADING="false"):
        if deepspeed is not None:
            unset_hf_deepspeed_config()
        try:
            yield
        finally:
            if deepspeed is not None:  # accelerate's plugin holds the config transformers refers to
                set_hf_deepspeed_config(deepspeed.dschf)


def score_in_shares(accelerator, rows: list, score: Callable[[list], list]) -> list:
    """`score(rows)`, each process scoring its contiguous share within `whole_models`; every process
    gets all the scores, in row order. `score` loads its model onto `accelerator.device`: the
    trainer's own models may be sharded, and one process scoring everything outlasts the
    collective timeout on a large model."""
    from accelerate.utils import gather_object

    with whole_models(accelerator), accelerator.split_between_processes(rows) as share:
        return gather_object(score(share))


def use_native_lm_head(model) -> None:
    """Undo TRL's `add_fused_lm_head` on our model: TRL sets `forward` on the instance to run its
    own chunked LM head; our class's forward answers the same `fused_lm_head=True` call with our
    faster kernel (see `FusedLMHeadOutput`), so the instance attribute is removed."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if isinstance(base, Qwen2ForCausalLM) and "forward" in vars(base):
        del base.forward


def train(trainer, recipe: TrainRecipe) -> dict[str, Any]:
    """Train, resuming from `training.resume_from_checkpoint` if the recipe names one, else from the
    run dir's last checkpoint (a killed run goes on where it stopped). Returns the training metrics."""
    from transformers.trainer_utils import get_last_checkpoint

    run_dir = Path(recipe.run_dir)
    resume = trainer.args.resume_from_checkpoint or (get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None)
    result = trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_loss": result.training_loss, "first_logged_loss": losses[0] if losses else None,
            "last_logged_loss": losses[-1] if losses else None, "train_runtime_s": result.metrics["train_runtime"]}


def saved_dtype(path: str) -> torch.dtype:
    """The dtype a checkpoint was saved in (its config's `dtype`), which the trained model keeps."""
    from transformers import PretrainedConfig

    config = PretrainedConfig.get_config_dict(path)[0]
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(name, torch.float32)


def cast_checkpoint(path: Path, dtype: torch.dtype) -> None:
    """Rewrite a saved model's floating-point weights in `dtype`, one tensor at a time, and its
    config's `dtype`; nothing to do if its config says it is in `dtype` already."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if saved_dtype(str(path)) == dtype:
        return
    total_size = 0
    for file in sorted(path.glob("*.safetensors")):
        tensors = {}
        with safe_open(file, "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        tmp = file.with_name(f".{file.name}.tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, file)
    index = path / "model.safetensors.index.json"
    if index.exists():
        layout = json.loads(index.read_text())
        layout["metadata"]["total_size"] = total_size
        atomic_write_text(index, json.dumps(layout, indent=2, sort_keys=True) + "\n")
    config = json.loads((path / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    atomic_write_text(path / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_model(trainer, recipe: TrainRecipe, run: RunStart, model_class: type | None = None) -> None:
    """The final model and tokenizer into the run dir: a full checkpoint in the starting checkpoint's dtype.

    Every process calls `trainer.save_model`, which gathers the whole weights (FSDP2's full state
    dict, ZeRO-3's 16-bit weights) and writes them, as the trainer holds them, from the main process.
    The main process then casts them to `saved_dtype`; with LoRA the trainer writes the adapter
    (run_dir/adapter), which is merged into the starting weights (`model_class`, default our causal
    LM for the checkpoint) loaded in that dtype."""
    from peft import PeftModel

    adapter = run.run_dir / "adapter"
    # No push to the Hub from here (TRL's `push_to_hub`): what the trainer writes is not final yet.
    trainer.save_model(str(adapter if recipe.lora is not None else run.run_dir), _internal_call=True)
    if trainer.accelerator.is_main_process:
        dtype = saved_dtype(recipe.model)
        if recipe.lora is None:
            cast_checkpoint(run.run_dir, dtype)
        else:
            config = trainer.accelerator.unwrap_model(trainer.model).get_base_model().config
            with whole_models(trainer.accelerator):
                base = (model_class or causal_lm_class(recipe.model)).from_pretrained(
                    recipe.model, config=config, dtype=dtype)
            PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(run.run_dir)
            trainer.processing_class.save_pretrained(run.run_dir)
    trainer.accelerator.wait_for_everyone()


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


def write_run_artifacts(trainer, recipe: TrainRecipe, run: RunStart, counts: dict, metrics: dict) -> dict:
    """metrics.json, curves.png and, last, the manifest that marks the run done; returns the manifest."""
    run_dir = run.run_dir
    if trainer.accelerator.is_main_process:
        history = trainer.state.log_history
        atomic_write_text(run_dir / "metrics.json", json.dumps({"metrics": metrics, "log_history": history}, indent=2) + "\n")
        plot_history(history, run_dir / "curves.png", f"{recipe.stage}: {run_dir}")
        write_manifest(run_dir, {
            "stage": recipe.stage, "fingerprint": run.fingerprint, "run_dir": str(run_dir), "inputs": run.inputs,
            "recipe": recipe, "seed": recipe.seed, "counts": counts, "metrics": metrics,
            "precision": {"compute": compute_dtype(recipe), "weights": weights_dtype(recipe),
                          "saved": str(saved_dtype(recipe.model)).removeprefix("torch.")},
            "steps": trainer.state.global_step, "duration_s": round(run.elapsed(), 3),
        })
    trainer.accelerator.wait_for_everyone()
    return json.loads((run_dir / "manifest.json").read_text())
