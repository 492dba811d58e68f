"""`make demo`: every stage of the pipeline on the tiny world, each with its recipe in `recipes/tiny/`, then a
report (`qwen2_align.demo.report`) of what each stage bought.

    world -> pretrain (the base model, cached) -> generate, instag -> select -> evolve -> responses -> annotate
    (the base model as judge), rejection, execution (code, constraints), repurpose (literature, role-play),
    constitution, decontam -> assemble -> sft (with replayed pretraining text) -> rm -> dpo -> online-dpo (OnDARE;
    and again with AdamW, to compare) -> eval -> push dry-runs

The base model is the teacher of every synthesis stage: the tiny world taught it the stages' own prompts
(`qwen2_align.demo.tiny_world.CHAT_SKILLS`). The pretrain run is cached under `runs/tiny/base` and reused while the
corpus and its recipe are the same (a changed one is trained again). The other stages belong to one demo run:
a demo killed midway resumes where it stopped (every stage resumes), and a demo started after a finished one,
or on another base model, starts those stages afresh, so the report always shows what this code does.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from alignment.atomic import atomic_write_text
from alignment.model.presets import PRESETS
from alignment.recipe_loader import read_yaml
from alignment.stages import RunDirTaken
from alignment.upcycle import MOE_SHAPE, upcycle

from .. import stage_table
from ..hub import push, push_data
from .report import write_report
from .tiny_world import TinyWorld, write_world


@dataclass(frozen=True)
class DemoStep:
    name: str  # the run's name: its run dir runs/tiny/<name>
    stage: str
    recipe: str = ""  # recipes/tiny/<recipe>.yaml; "" = the step's name
    overrides: tuple[str, ...] = ()  # `--set` overrides the step adds to its recipe

    @property
    def recipe_path(self) -> str:
        return f"recipes/tiny/{self.recipe or self.name}.yaml"


# Online DPO twice from the same DPO model, once with OnDARE (the recipe) and once with plain AdamW at the same
# learning rate and steps: the report puts the reward each gained beside the alignment tax each paid.
ADAMW_TWIN = DemoStep("online-dpo-adamw", "online-dpo", "online-dpo",
                      ("merging.method=none", "run_dir=runs/tiny/online-dpo-adamw"))
STEPS = (*(DemoStep(name, name.removesuffix("-if").removesuffix("-roleplay")) for name in (
    "generate", "instag", "select", "evolve", "responses", "annotate", "rejection", "execution", "execution-if",
    "repurpose", "repurpose-roleplay", "constitution", "decontam", "assemble", "sft", "rm", "dpo", "online-dpo")),
    ADAMW_TWIN, DemoStep("eval", "eval"))
# `make demo MOE=1`: the base model upcycled into the tiny MoE (the `tiny-moe` preset's shape) and taken through
# the same trainers on the same D and P; eval puts it beside the dense models.
MOE_BASE = "runs/tiny/moe-base"
MOE_STEPS = (
    DemoStep("moe-sft", "sft", "sft", (f"model={MOE_BASE}", "run_dir=runs/tiny/moe-sft")),
    DemoStep("moe-rm", "rm", "rm", ("model=runs/tiny/moe-sft", "run_dir=runs/tiny/moe-rm")),
    DemoStep("moe-dpo", "dpo", "dpo", ("model=runs/tiny/moe-sft", "run_dir=runs/tiny/moe-dpo")),
    DemoStep("moe-online-dpo", "online-dpo", "online-dpo",
             ("model=runs/tiny/moe-dpo", "reference=runs/tiny/moe-dpo", "reward_model=runs/tiny/moe-rm",
              f"merging.base_model={MOE_BASE}", "run_dir=runs/tiny/moe-online-dpo")))
MOE_MODELS = {"moe-base": MOE_BASE, **{step.name: f"runs/tiny/{step.name}" for step in MOE_STEPS if step.stage != "rm"}}
PUSH_REPO = "your-org/qwen2-tiny-demo"  # where the dry-runs would upload; nothing leaves the machine
RUNS = Path("runs/tiny")  # where the tiny recipes read and write, relative to the checkout


def demo_steps(moe: bool = False) -> tuple[DemoStep, ...]:
    """The demo's steps; with `moe`, the MoE's trainers instead of the AdamW twin (to keep within 15 minutes),
    and eval scores the MoE models beside the dense ones."""
    if not moe:
        return STEPS
    models = [m for m in read_yaml(STEPS[-1].recipe_path)["models"] if m["name"] != ADAMW_TWIN.name]
    models += [{"name": name, "path": path} for name, path in MOE_MODELS.items()]
    dense = [step for step in STEPS[:-1] if step != ADAMW_TWIN]
    return (*dense, *MOE_STEPS, replace(STEPS[-1], overrides=(f"models={json.dumps(models)}",)))


def _upcycle(base: str) -> None:
    """The MoE of `tiny-moe`'s shape upcycled from the base model (seconds; redone whenever it is missing)."""
    if not Path(MOE_BASE, "config.json").exists():
        shape = PRESETS["tiny-moe"]
        upcycle(base, MOE_BASE, *(shape[key] for key in MOE_SHAPE), norm_topk_prob=shape["norm_topk_prob"],
                router_aux_loss_coef=shape["router_aux_loss_coef"])


def _world(settings: dict) -> None:
    write_world(TinyWorld(**settings), RUNS / "world")


def _pretrain(overrides: list[str]) -> dict:
    """The cached base model: a finished run of this recipe and corpus is reused, any other is replaced."""
    recipe = stage_table.load_recipe("recipes/tiny/pretrain.yaml", overrides=overrides)
    try:
        return stage_table.run("pretrain", recipe)
    except RunDirTaken:
        print(f"demo: {recipe.run_dir} was trained on another corpus or recipe: training the base model again")
    shutil.rmtree(recipe.run_dir)
    return stage_table.run("pretrain", stage_table.load_recipe("recipes/tiny/pretrain.yaml", overrides=overrides))


def _start_fresh_or_resume(base_fingerprint: str, moe: bool) -> dict:
    """The demo's state: resume an unfinished demo on the same base model (dense or MoE alike), else clear the
    stage run dirs."""
    state_path = RUNS / "demo.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("finished", True) or state.get("base") != base_fingerprint or state.get("moe", False) != moe:
        for name in {step.name for step in (*STEPS, *MOE_STEPS)} | {"push", Path(MOE_BASE).name}:
            shutil.rmtree(RUNS / name, ignore_errors=True)
        state = {"base": base_fingerprint, "moe": moe, "finished": False, "seconds": {}}
        atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
    else:
        print(f"demo: resuming the unfinished demo in {RUNS} (finished stages are kept)")
    return state


def run_demo(overrides: dict[str, list[str]] | None = None, world: dict | None = None, moe: bool = False) -> dict:
    """Run the demo under `runs/tiny` of the current directory (with `moe`, the MoE's chain too). `overrides` maps
    a step name (or "pretrain") to `--set` overrides and `world` sets `TinyWorld` fields: the shortened demo of the
    test suite uses both. Returns the report's summary."""
    overrides = overrides or {}
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    _world(world or {})
    seconds["world"] = time.perf_counter() - clock
    clock = time.perf_counter()
    base = _pretrain(overrides.get("pretrain", []))
    seconds["pretrain"] = time.perf_counter() - clock
    state = _start_fresh_or_resume(base["fingerprint"], moe)
    state_path = RUNS / "demo.json"
    steps = demo_steps(moe)
    if moe:
        clock = time.perf_counter()
        _upcycle(base["run_dir"])
        seconds["upcycle"] = time.perf_counter() - clock
    for step in steps:
        recipe = stage_table.load_recipe(step.recipe_path, stage=step.stage,
                                         overrides=[*step.overrides, *overrides.get(step.name, [])])
        print(f"\n== demo: {step.name} ({step.recipe_path}) ==", flush=True)
        clock = time.perf_counter()
        stage_table.run(step.stage, recipe)
        state["seconds"][step.name] = state["seconds"].get(step.name, 0.0) + time.perf_counter() - clock
        atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
    clock = time.perf_counter()
    push_dry_runs()
    state["seconds"]["push"] = time.perf_counter() - clock
    state["seconds"] = seconds | state["seconds"]
    summary = write_report(RUNS, steps, state["seconds"], time.perf_counter() - started)
    state["finished"] = True
    atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
    return summary


def push_dry_runs() -> dict[str, Path]:
    """What `push` and `push-data` would upload: the final model with its card, and the assembled D and P."""
    return {"model": push(RUNS / "online-dpo", PUSH_REPO, dry_run=True, out=RUNS / "push" / "model"),
            "data": push_data(RUNS / "assemble", f"{PUSH_REPO}-data", dry_run=True, out=RUNS / "push" / "data")}
