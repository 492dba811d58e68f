"""What every trainer stage shares: the recipe's common keys and the steps of
recipe -> data -> model -> trainer -> artifacts, on the run lifecycle of `alignment.stages.Run`.

    class SFTStage(TrainerStage):                     # TrainerStage.run: Run.start, then
        def train(self, run, data):                   #   data = load_training_data(recipe, kind, run)
            trainer = TRLTrainer(model=load_trained_model(recipe), args=recipe.args, ...)
            metrics = fit(trainer, recipe, run.started)  # resumes from the last checkpoint
            save_model(trainer, recipe, run.run_dir)  # LoRA merged, in the starting checkpoint's dtype
            return trainer, metrics                   #   write_run_artifacts: metrics, curves, manifest

The recipe's `training:` section maps key for key onto the stage's TRL config class and is built
into it once, when the recipe is (`recipe.args`), so TRL's own checks fail before a model loads.

Precision: the recipe's `dtype` is the compute precision (`auto` measures on CPU, see
`alignment.precision`). The trained weights and the optimizer state stay in float32 and bf16
runs through autocast, as in transformers' Trainer (an AdamW step of ~7e-6 is below bf16's
spacing near |w| = 0.02). Only under DeepSpeed, which keeps its own fp32 master copy, and with
LoRA, whose frozen base needs none, is the model loaded in the compute dtype.

Sharded training (FSDP2, DeepSpeed ZeRO-3): the model is saved through `trainer.save_model`, which
gathers the whole weights, and the held-out scores after training come from the trainer's own models,
sharded as they trained, each process scoring an equal share of the rows (`score_with_trainer`): an
evaluation fits wherever its training fits.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal
from unittest.mock import patch

import datasets.arrow_dataset
import datasets.fingerprint
import torch
from accelerate.utils import gather_object, patch_environment
from matplotlib.figure import Figure
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from transformers import PretrainedConfig, PreTrainedTokenizerBase, TokenizersBackend, TrainerCallback
from transformers.integrations import deepspeed as hf_deepspeed

from ..atomic import atomic_write_text
from ..checkpoint import DTYPES, causal_lm_class
from ..data import DataError, DataInput, RowKind, as_sources, read_rows, to_jsonl, trl_dataset
from ..model import Qwen2ForCausalLM
from ..precision import resolve_dtype
from ..recipe_loader import check_keys
from ..stages import Run, Stage, StageError
from ..tokenizer import load_tokenizer


@dataclass
class LoraSpec:
    """Optional LoRA adapters through peft; None trains all weights."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


# `training:` keys that TRL accepts but that have their one home elsewhere (or none in a file).
REFUSED_TRAINING_KEYS = {
    "output_dir": "the output directory is the recipe's run_dir",
    "seed": "use the recipe's top-level seed",
    "bf16": "the precision is the recipe's dtype (auto, float32, bfloat16, float16)",
    "fp16": "the precision is the recipe's dtype (auto, float32, bfloat16, float16)",
    "hub_token": "a token does not belong in a recipe (it would be saved with the run); set HF_TOKEN or run "
                 "`hf auth login`",
}


@dataclass
class TrainRecipe:
    """Keys every trainer stage's recipe has. `training:` holds the TRL config's fields (every TRL option, such
    as `push_to_hub`, under its TRL name); `args` is that config, built once from them."""

    stage: str
    run_dir: str
    model: str  # checkpoint directory or Hub id to start from
    inputs: dict[str, DataInput] = field(default_factory=dict)  # train (required), eval, replay (sft only)
    seed: int = 0
    eval_fraction: float = 0.0  # held out from train when no eval input is given
    # Compute precision; weights and optimizer state stay float32 (see the module docstring).
    # auto: bf16 on a GPU that has it; on CPU, whichever a matmul probe finds faster.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    training: dict[str, Any] = field(default_factory=dict)  # the TRL config's fields
    lora: LoraSpec | None = None

    trl_config_class: ClassVar[type]  # the TRL config `training:` maps onto

    def __post_init__(self) -> None:
        if "replay" in self.inputs and self.stage != "sft":  # pretraining text mixed into D (see `Qwen2SFTTrainer`)
            raise ValueError(f"inputs.replay: only the sft stage replays pretraining text, not {self.stage}; "
                             "remove inputs.replay")
        self.args = self.trl_arguments()

    def compute_precision(self) -> str:
        """The compute dtype's name on this machine (`auto` resolved)."""
        return resolve_dtype(self.dtype)[0]

    def trl_defaults(self) -> dict[str, Any]:
        """TRL config values the stage sets unless `training:` does."""
        return {}

    def trl_arguments(self):
        """`training:` checked key by key against the TRL config class, then the config built (its
        `__post_init__` checks run), writing into the run dir with the recipe's seed and precision.
        Without an accelerator, `use_cpu` is set so bf16 (autocast) is allowed on CPU."""
        for key, reason in REFUSED_TRAINING_KEYS.items():
            if key in self.training:
                raise ValueError(f"training.{key}: {reason}")
        self.training = check_keys(self.trl_config_class, self.training, "", prefix="training.")
        dtype = self.compute_precision()
        values = {"report_to": "none", **self.trl_defaults(), **self.training,
                  "bf16": dtype == "bfloat16", "fp16": dtype == "float16"}
        if not (torch.cuda.is_available() or "use_cpu" in values):
            values["use_cpu"] = True
        try:
            return self.trl_config_class(output_dir=str(self.run_dir), seed=self.seed, **values)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise ValueError(f"training: {str(e).strip().splitlines()[0]}") from None


@dataclass
class TrainingData:
    kind: RowKind
    train: list[dict]
    eval: list[dict]
    counts: dict[str, int]
    replay: list[dict] = field(default_factory=list)  # text rows trained on alongside train (SFT's inputs.replay)

    def train_dataset(self):
        """The training rows as the dataset type TRL expects for them."""
        return trl_dataset(self.train, self.kind)

    def eval_dataset(self):
        return trl_dataset(self.eval, self.kind) if self.eval else None

    def replay_dataset(self) -> datasets.Dataset | None:
        """The replay rows as TRL's plain text dataset (`text`), or None without replay."""
        return datasets.Dataset.from_dict({"text": [r["text"] for r in self.replay]}) if self.replay else None


def load_training_data(recipe: TrainRecipe, kind: RowKind, run: Run) -> TrainingData:
    """Train and eval rows: `inputs.eval` if given, else a seeded `eval_fraction` of train; and the text rows of
    `inputs.replay`, if given.

    Bad rows go to run_dir/quarantine.jsonl; the counts go into the manifest."""
    kinds: dict[str, RowKind] = {"train": kind, "eval": kind, "replay": "text"}
    try:
        read = {n: read_rows(recipe.inputs[n], k) for n, k in kinds.items() if recipe.inputs.get(n)}
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
        held_out = int(round(len(train) * recipe.eval_fraction))
        if recipe.eval_fraction > 0 and len(train) > 1:  # at least one row: the TRL config evaluates
            held_out = max(held_out, 1)
        held = set(order[:held_out])
        evaluation = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    if not train:
        sources = " + ".join(str(source) for source in as_sources(recipe.inputs["train"]))
        raise StageError(f"{recipe.stage}: {sources}: no valid training rows "
                         f"({len(quarantined)} quarantined, see {run.run_dir / 'quarantine.jsonl'})")
    counts = {"rows_in": sum(r.read for r in read.values()), "quarantined": len(quarantined),
              "merged_into_pairs": sum(r.merged for r in read.values()), "train": len(train), "eval": len(evaluation)}
    replay = read["replay"].rows if "replay" in read else []
    if "replay" in read:  # in the manifest even when none is left
        counts["replay"] = len(replay)
    return TrainingData(kind, train, evaluation, counts, replay)


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


def peft_config(recipe: TrainRecipe):
    if recipe.lora is None:
        return None
    lora = recipe.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      task_type="SEQ_CLS" if recipe.stage == "rm" else "CAUSAL_LM")


def trainer_arguments(recipe: TrainRecipe, data: TrainingData, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What each of our TRL trainers is given besides its model(s): the recipe's TRL config, the data as TRL
    expects it, the tokenizer and the LoRA config."""
    return {"args": recipe.args, "train_dataset": data.train_dataset(), "eval_dataset": data.eval_dataset(),
            "processing_class": tokenizer, "peft_config": peft_config(recipe)}


def weights_dtype(recipe: TrainRecipe) -> str:
    """The dtype the trained model is loaded in: float32 master weights, except under DeepSpeed
    (its optimizer keeps the fp32 master copy) and with LoRA (the frozen base needs none; PEFT
    keeps the adapters in float32). FSDP2 keeps the float32 weights as its sharded master copy
    (accelerate would upcast bf16 ones) and its MixedPrecisionPolicy casts them for compute."""
    deepspeed = bool(recipe.training.get("deepspeed")) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "") == "true"
    return recipe.compute_precision() if deepspeed or recipe.lora is not None else "float32"


def load_trained_model(recipe: TrainRecipe, start: str, model_class: type | None = None, **kwargs):
    """The model to train from checkpoint `start`, in `weights_dtype`.

    `model_class` defaults to our causal LM for the checkpoint's model_type (dense or MoE)."""
    why = resolve_dtype(recipe.dtype)[1]
    weights = weights_dtype(recipe)
    print(f"{recipe.stage}: compute {why}; weights and optimizer state in {weights}")
    return (model_class or causal_lm_class(start)).from_pretrained(start, dtype=DTYPES[weights], **kwargs)


def load_frozen_model(path: str, recipe: TrainRecipe, device: torch.device | str | None = None,
                      model_class: type | None = None):
    """A model that is only evaluated (the DPO reference; `model_class` for another than our causal LM), in the
    compute dtype, without gradients, on `device` (default: CPU)."""
    model_class = model_class or causal_lm_class(path)
    model = model_class.from_pretrained(path, dtype=DTYPES[recipe.compute_precision()], device_map=device)
    return model.eval().requires_grad_(False)


def shards_frozen_models() -> bool:
    """Whether this launch shards the trainer (accelerate's FSDP or DeepSpeed over several processes), and so
    the models online DPO only evaluates too (`load_sharded_frozen`)."""
    sharded = os.environ.get("ACCELERATE_USE_FSDP") == "true" or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    return sharded and int(os.environ.get("WORLD_SIZE", "1")) > 1


def load_sharded_frozen(path: str, model_class: type, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A model that is only evaluated, sharded over the launched processes with torch's FSDP2 on `device`: one
    unit per decoder layer and one for the rest, so a forward gathers a layer at a time and a reward or reference
    model too large for one GPU fits where the trainer does. Only the main process reads the checkpoint (into its
    CPU memory); the others build the model on the meta device and receive their shards and buffers from it.
    Every process must then run the same forwards (`in_shares(..., equal_shares=True)`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    main = torch.distributed.get_rank() == 0
    with whole_models():
        if main:
            model = model_class.from_pretrained(path, dtype=dtype)
        else:
            with torch.device("meta"):
                model = model_class._from_config(model_class.config_class.from_pretrained(path), dtype=dtype)
    whole = model.state_dict() if main else {}
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()} if main else {}
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for name, buffer in model.named_buffers():  # not in the state dict: the rotary tables
            if main:
                buffer.copy_(buffers[name])
            torch.distributed.broadcast(buffer, src=0)
    return model.eval().requires_grad_(False)


@contextmanager
def unhashed_datasets() -> Iterator[None]:
    """Within it (around a TRL trainer's construction), `datasets` names each transform's result with a random
    fingerprint instead of pickling the transform and its arguments, the tokenizer among them (~0.4 s a trainer).
    Our trainers' datasets are in memory (`Dataset.from_list`), where a fingerprint names no cache file: nothing is
    lost. The names come from `datasets`' own generator, not the global random state training draws from."""
    def unhashed(fingerprint, transform, arguments) -> str:
        return datasets.fingerprint.generate_random_fingerprint()

    # `map` calls it by the name arrow_dataset imported, the other transforms through fingerprint's decorator
    with patch.object(datasets.arrow_dataset, "update_fingerprint", unhashed), \
            patch.object(datasets.fingerprint, "update_fingerprint", unhashed):
        yield


@contextmanager
def whole_models() -> Iterator[None]:
    """Within it, `from_pretrained` gives every process the whole model, as without sharding. Under
    FSDP's CPU-RAM-efficient loading transformers reads the weights on local rank 0 only: the others
    get zeros, which accelerate's `prepare` overwrites from rank 0 but TRL's `prepare_fsdp` (the DPO
    reference) does not. Under ZeRO-3 the model is not partitioned as it is built (which takes all
    processes in step, and refuses a device), and the LM-head kernel gathers nothing."""
    reference = hf_deepspeed._hf_deepspeed_config_weak_ref  # the config from_pretrained follows, if any
    active = reference() if reference is not None else None
    with patch_environment(FSDP_CPU_RAM_EFFICIENT_LOADING="false"):
        if active is not None:
            hf_deepspeed.unset_hf_deepspeed_config()
        try:
            yield
        finally:
            if active is not None:
                hf_deepspeed.set_hf_deepspeed_config(active)


def in_shares(state, items: list, work: Callable[[list], list], equal_shares: bool = False) -> list:
    """`work(items)` (one result per item) with each of `state`'s processes (accelerate's PartialState or
    Accelerator) doing its contiguous share; every process gets all the results, in order. `equal_shares`: the
    last share is padded with repeats, dropped after, so every process runs the same forwards (a sharded
    model's gathers go in step)."""
    with state.split_between_processes(items, apply_padding=equal_shares) as share:
        results = gather_object(work(share) if share else [])
    return results[: len(items)]


def whole_parameters(trainer) -> tuple[list[tuple[str, list[int]]], Iterator[tuple[str, torch.Tensor]]]:
    """The trained model's parameters by checkpoint name: their whole shapes, and an iterator giving each whole
    in turn (under FSDP2 and ZeRO-3 one gather per parameter, so every process must run the iterator to its
    end). With it a trainer hands its weights to a generation server without a checkpoint."""
    named = list(trainer.accelerator.unwrap_model(trainer.model).named_parameters())

    def shape(param: torch.Tensor) -> list[int]:
        return list(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps an empty local tensor

    def gathered() -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in named:
            if hasattr(param, "ds_id"):
                import deepspeed  # only under ZeRO-3, where it is installed

                with deepspeed.zero.GatheredParameters([param]):
                    yield name, param.data
            elif isinstance(param, DTensor):
                yield name, param.full_tensor()
            else:
                yield name, param.data

    return [(name, shape(param)) for name, param in named], gathered()


def score_with_trainer(trainer, rows: list, score: Callable[[list], list]) -> list:
    """`score(rows)` where `score` runs the trainer's own models (sharded under FSDP2 and ZeRO-3), in equal
    shares (`in_shares`)."""
    trainer.model.eval()
    return in_shares(trainer.accelerator, rows, score, equal_shares=True)


def use_native_lm_head(model) -> None:
    """Undo TRL's `add_fused_lm_head` on our model: TRL sets `forward` on the instance to run its
    own chunked LM head; our class's forward answers the same `fused_lm_head=True` call with our
    faster kernel (see `FusedLMHeadOutput`), so the instance attribute is removed."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if isinstance(base, Qwen2ForCausalLM) and "forward" in vars(base):
        del base.forward


class StartupClock(TrainerCallback):
    """Seconds from `started` to the first training step: what a run waits before it trains."""

    def __init__(self, started: float):
        self.started = started
        self.seconds: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.started


def fit(trainer, recipe: TrainRecipe, started: float) -> dict[str, Any]:
    """Train, resuming from `training.resume_from_checkpoint` if the recipe names one, else from the
    run dir's last checkpoint (a killed run goes on where it stopped). Returns the training metrics, with
    `startup_s` from `started` (a `time.perf_counter()`, such as the run's start) to the first step."""
    run_dir = Path(recipe.run_dir)
    resume = trainer.args.resume_from_checkpoint or last_complete_checkpoint(run_dir)
    clock = StartupClock(started)
    trainer.add_callback(clock)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.remove_callback(clock)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_loss": result.training_loss, "first_logged_loss": losses[0] if losses else None,
            "last_logged_loss": losses[-1] if losses else None, "train_runtime_s": result.metrics["train_runtime"],
            "startup_s": clock.seconds}


def last_complete_checkpoint(run_dir: Path) -> str | None:
    """The newest `checkpoint-N` in `run_dir` whose trainer_state.json (the Trainer writes it last, in place)
    reads as JSON: a run killed while saving leaves a newer checkpoint that is not complete."""
    steps = [(int(match[1]), path) for path in (run_dir.iterdir() if run_dir.is_dir() else [])
             if (match := re.fullmatch(r"checkpoint-(\d+)", path.name)) and path.is_dir()]
    for _, path in sorted(steps, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return str(path)
    return None


def saved_dtype(path: str) -> torch.dtype:
    """The dtype a checkpoint was saved in (its config's `dtype`), which the trained model keeps."""
    config = PretrainedConfig.get_config_dict(path)[0]
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(name, torch.float32)


def cast_checkpoint(path: Path, dtype: torch.dtype) -> None:
    """Rewrite a saved model's floating-point weights in `dtype`, one tensor at a time, and its
    config's `dtype`; nothing to do if its config says it is in `dtype` already."""
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


def save_model(trainer, recipe: TrainRecipe, out_dir: Path, start: str, model_class: type | None = None) -> None:
    """The final model and tokenizer into `out_dir`: a full checkpoint in the dtype of `start`, the checkpoint
    training began from.

    Every process calls `trainer.save_model`, which gathers the whole weights (FSDP2's full state
    dict, ZeRO-3's 16-bit weights) and writes them, as the trainer holds them, from the main process.
    The main process then casts them to `saved_dtype`; with LoRA the trainer writes the adapter
    (out_dir/adapter), which is merged into the starting weights (`model_class`, default our causal
    LM for the checkpoint) loaded in that dtype."""
    adapter = out_dir / "adapter"
    # No push to the Hub from here (TRL's `push_to_hub`): what the trainer writes is not final yet.
    trainer.save_model(str(adapter if recipe.lora is not None else out_dir), _internal_call=True)
    if trainer.accelerator.is_main_process:
        dtype = saved_dtype(start)
        written = adapter if recipe.lora is not None else out_dir
        if not any(written.glob("*.safetensors")):  # ZeRO-3 writes a DeepSpeed checkpoint instead, and says so once
            raise StageError(f"{recipe.stage}: {written}: the trainer saved no weights; under DeepSpeed ZeRO-3 set "
                             "`zero3_save_16bit_model: true` in the accelerate config (recipes/accelerate/zero3.yaml)")
        if recipe.lora is None:
            cast_checkpoint(out_dir, dtype)
        else:
            config = trainer.accelerator.unwrap_model(trainer.model).get_base_model().config
            with whole_models():
                base = (model_class or causal_lm_class(start)).from_pretrained(start, config=config, dtype=dtype)
            PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(out_dir)
            trainer.processing_class.save_pretrained(out_dir)
    trainer.accelerator.wait_for_everyone()


def plot_history(history: list[dict], path: Path, title: str) -> Path | None:
    """One panel per logged metric against the step: loss, learning rate, eval metrics."""
    keys = sorted({k for h in history for k, v in h.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")
                   and not k.startswith(("train_", "total_flos"))})
    if not keys:
        return None
    fig = Figure(figsize=(7, 2.2 * len(keys)))
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        points = [(h["step"], h[key]) for h in history if key in h]
        ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_run_artifacts(trainer, recipe: TrainRecipe, run: Run, start: str, counts: dict, metrics: dict) -> dict:
    """metrics.json, curves.png and, last, the manifest that marks the run done; returns the manifest."""
    run_dir = run.run_dir
    if trainer.accelerator.is_main_process:
        history = trainer.state.log_history
        atomic_write_text(run_dir / "metrics.json", json.dumps({"metrics": metrics, "log_history": history}, indent=2) + "\n")
        plot_history(history, run_dir / "curves.png", f"{recipe.stage}: {run_dir}")
        run.finish(counts, metrics=metrics, steps=trainer.state.global_step,
                   precision={"compute": recipe.compute_precision(), "weights": weights_dtype(recipe),
                              "saved": str(saved_dtype(start)).removeprefix("torch.")})
    trainer.accelerator.wait_for_everyone()
    return json.loads((run_dir / "manifest.json").read_text())


class TrainerStage(Stage):
    """A trainer stage: `run` starts the run (or hands back a finished one), reads the data, has `train`
    build the model and TRL's trainer, train and save, then writes the artifacts and the manifest."""

    recipe_class: ClassVar[type[TrainRecipe]]
    data_kind: ClassVar[RowKind]  # what a row of inputs.train is

    def start_model(self, run: Run, data: TrainingData) -> str:
        """The checkpoint training starts from."""
        return self.recipe.model

    def run(self) -> dict[str, Any]:
        recipe = self.recipe
        names = [n for n in ("train", "eval", "replay") if n == "train" or recipe.inputs.get(n)]
        run = Run.start(self.name, recipe, names)
        if run.done:
            return run.done
        data = load_training_data(recipe, self.data_kind, run)
        start = self.start_model(run, data)
        trainer, metrics = self.train(run, data, start)
        return write_run_artifacts(trainer, recipe, run, start, data.counts, metrics)

    @abstractmethod
    def train(self, run: Run, data: TrainingData, start: str) -> tuple[Any, dict[str, Any]]:
        """Build the model and TRL's trainer, train, save the model into the run dir; the trainer and metrics."""
