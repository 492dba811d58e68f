"""`qwen2-align <command>`: the one entry point the Makefile calls.

Pipeline stages take `--recipe FILE [--set key=value ...]`; the recipe is validated before
anything runs. Errors a user can fix (recipes, data, unreachable servers) print one line, no
traceback, and exit with status 2.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

from alignment.checkpoint import init_checkpoint
from alignment.data import DataError
from alignment.generation import GenerationError, GenerationSpec, make_generator
from alignment.generation.policy_server import serve
from alignment.model import PRESETS
from alignment.recipe_loader import RecipeError
from alignment.stages import StageError
from alignment.tokenizer import TokenizerError
from alignment.upcycle import MOE_SHAPE, upcycle
from data_synthesis.annotate_app import Annotate

from . import stage_table
from .demo import run_demo
from .demo.tiny_world import TinyWorld, write_world
from .eval import models_override
from .hub import HubError, push, push_data
from .plan import render_plan


def _add_init(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--initializer-range", type=float, default=None, help="std of the random weights")


def _run_init(a: argparse.Namespace) -> int:
    overrides = {} if a.initializer_range is None else {"initializer_range": a.initializer_range}
    path = init_checkpoint(a.preset, a.out, seed=a.seed, dtype=a.dtype, **overrides)
    print(f"wrote {a.preset} checkpoint to {path}")
    return 0


def _add_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or Hub id")
    p.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g = p.add_argument_group("long context", "for this run only: the checkpoint on disk is not changed")
    g.add_argument("--dca-chunk-size", type=int, help="Dual Chunk Attention chunk size C, at most the trained length")
    g.add_argument("--dca-local-size", type=int, help="DCA local window w (blocks are C - w tokens)")
    g.add_argument("--yarn-factor", type=float, help="YaRN factor s over the trained length (static YaRN without DCA)")
    g.add_argument("--trained-length", type=int,
                   help="the length the model was trained at, for YaRN and DCA, when config.json does not record it "
                        "(Qwen2-7B base: 32768, though its max_position_embeddings is 131072)")


def _run_chat(a: argparse.Namespace) -> int:
    spec = GenerationSpec(backend=a.backend, model=a.model, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                          dca_chunk_size=a.dca_chunk_size, dca_local_size=a.dca_local_size, yarn_factor=a.yarn_factor,
                          trained_length=a.trained_length)
    try:
        gen = make_generator(spec)
    except ValueError as e:  # e.g. YaRN / DCA asked for on a checkpoint that does not record its trained length
        print(f"qwen2-align chat: {e}", file=sys.stderr)
        return 2
    with gen:
        replies = gen.generate([[{"role": "user", "content": p}] for p in a.prompt], spec.sampling(seed=0))
    for prompt, reply in zip(a.prompt, replies):
        print(f"user: {prompt}\nassistant: {reply[0].text!r}\n")
    return 0


def _add_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipes", default="recipes/tiny", help="a directory of recipes (or one recipe file)")


def _run_check(a: argparse.Namespace) -> int:
    target = Path(a.recipes)
    stages = [stage_table.load_recipe(target).stage] if target.is_file() else stage_table.check_recipe_dir(target)
    if not stages:
        print(f"{target}: no recipes found", file=sys.stderr)
        return 2
    print(f"{target}: {len(stages)} recipes valid ({', '.join(stages)})")
    return 0


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="a trainer recipe (sft, rm, dpo, online-dpo)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the model is sharded over")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one GPU in GiB, for the verdict")


def _run_plan(a: argparse.Namespace) -> int:
    recipe = stage_table.load_recipe(a.recipe)
    if not hasattr(recipe, "training"):
        print(f"qwen2-align: {a.recipe}: plan needs a trainer recipe (sft, rm, dpo, online-dpo)", file=sys.stderr)
        return 2
    print(render_plan(recipe, a.gpus, Path(a.recipe).parent, a.gpu_memory))
    return 0


def _add_serve_policy(p: argparse.ArgumentParser) -> None:
    _add_recipe_arguments(p, "online-dpo")
    p.add_argument("--host", default=None, help="address to listen on (default: the host of generation.base_url)")


def _run_serve_policy(a: argparse.Namespace) -> int:
    """The recipe's policy (`model`) in a vLLM engine at generation.base_url, for trainers on other GPUs."""
    recipe = stage_table.load_recipe(a.recipe, stage="online-dpo", overrides=a.set)
    url = urlparse(recipe.generation.base_url)
    spec = replace(recipe.generation, backend="vllm", model=recipe.model)
    serve(spec, a.host or url.hostname, url.port or 80, Path(recipe.run_dir) / "served-policy")
    return 0


def _add_upload_arguments(p: argparse.ArgumentParser, run: str, repo: str, folder: str) -> None:
    """The arguments `push` and `push-data` share; `run`, `repo` and `folder` are their help texts' examples."""
    p.add_argument("--run", required=True, help=f"a finished {run}")
    p.add_argument("--repo", required=True, help=f"Hub {repo}")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="only write the folder that would be uploaded")
    p.add_argument("--out", default=None, help=f"where to write that folder (default RUN/{folder})")
    p.add_argument("--license", default="apache-2.0")


def _add_recipe_arguments(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--recipe", required=True, help=f"recipe YAML, e.g. recipes/tiny/{stage}.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (dotted for nested keys); repeatable")


def _add_world(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/tiny/world", help="directory for the corpus and the evaluation sets")
    p.add_argument("--seed", type=int, default=0)


def _run_world(a: argparse.Namespace) -> int:
    for name, path in write_world(TinyWorld(seed=a.seed), a.out).items():
        print(f"{name}: {path}")
    return 0


def _add_annotators(p: argparse.ArgumentParser) -> None:
    _add_recipe_arguments(p, "annotate")
    p.add_argument("--add", action="append", default=[], metavar="NAME",
                   help="add an annotator, or give one a new token (printed once, stored hashed); repeatable")
    p.add_argument("--revoke", action="append", default=[], metavar="NAME",
                   help="stop an annotator's token and sessions (their answers stay); repeatable")


def _run_annotators(a: argparse.Namespace) -> int:
    recipe = stage_table.load_recipe(a.recipe, stage="annotate", overrides=a.set)
    Annotate(recipe).annotators(a.add, a.revoke)
    return 0


def _add_push(p: argparse.ArgumentParser) -> None:
    _add_upload_arguments(p, "run directory (e.g. runs/tiny/dpo)", "repository id, e.g. my-org/qwen2-7b-aligned",
                          "hub-upload")


def _uploader(upload: Callable[..., Path], target: str) -> Callable[[argparse.Namespace], int]:
    """The runner of `push` (a model) or `push-data` (a data set): `upload` writes the folder, then uploads it
    unless --dry-run."""
    def run(a: argparse.Namespace) -> int:
        folder = upload(a.run, a.repo, private=a.private, dry_run=a.dry_run, out=a.out, license=a.license)
        files = ", ".join(sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()))
        print(f"{'would upload' if a.dry_run else 'uploaded'} {folder} to {target}{a.repo}: {files}")
        return 0
    return run


def _add_push_data(p: argparse.ArgumentParser) -> None:
    _add_upload_arguments(p, "assemble run (e.g. runs/tiny/assemble)", "data set id, e.g. my-org/qwen2-7b-sft-data",
                          "hub-data")




def _add_upcycle(p: argparse.ArgumentParser) -> None:
    moe_presets = sorted(k for k, v in PRESETS.items() if "num_experts" in v)
    p.add_argument("--dense", required=True, help="dense qwen2 checkpoint directory")
    p.add_argument("--out", required=True, help="MoE checkpoint directory to write")
    p.add_argument("--preset", choices=moe_presets, help="take experts, top-k and widths from this MoE preset")
    p.add_argument("--num-experts", type=int, help="routed experts per layer")
    p.add_argument("--top-k", type=int, help="experts active per token")
    p.add_argument("--expert-size", type=int, help="width H_E of each routed expert")
    p.add_argument("--shared-size", type=int, help="width H_S of the shared expert")
    p.add_argument("--reinit-fraction", type=float, default=0.5, help="share of each expert's weights re-drawn")
    p.add_argument("--norm-topk-prob", action="store_true", help="renormalise the top-k routing weights")
    p.add_argument("--seed", type=int, default=0)


def _run_upcycle(a: argparse.Namespace) -> int:
    preset = PRESETS[a.preset] if a.preset else {}
    flags = dict(zip(MOE_SHAPE, (a.num_experts, a.top_k, a.expert_size, a.shared_size)))
    shape = {k: preset.get(k) if v is None else v for k, v in flags.items()}
    names = ("--num-experts", "--top-k", "--expert-size", "--shared-size")
    missing = [flag for flag, k in zip(names, MOE_SHAPE) if shape[k] is None]
    if missing:
        print(f"qwen2-align upcycle: give --preset or {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        path = upcycle(
            a.dense, a.out, *shape.values(), reinit_fraction=a.reinit_fraction, seed=a.seed,
            norm_topk_prob=a.norm_topk_prob or preset.get("norm_topk_prob", False),
            router_aux_loss_coef=preset.get("router_aux_loss_coef", 0.001),
        )
    except ValueError as e:
        print(f"qwen2-align upcycle: {e}", file=sys.stderr)
        return 2
    print(f"wrote the MoE upcycled from {a.dense} to {path}")
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--moe", action="store_true", help="also upcycle the base model into the tiny MoE and train it")


def _run_demo(a: argparse.Namespace) -> int:
    """Every stage on the tiny world, then the report (qwen2_align/demo)."""
    _run_check(argparse.Namespace(recipes="recipes/tiny"))
    run_demo(moe=a.moe)
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None] | None, Callable[[argparse.Namespace], int]]
# Tools around the stages.
COMMANDS: dict[str, Command] = {
    "init": ("write a randomly initialised checkpoint of a preset shape, with tokenizer", _add_init, _run_init),
    "chat": ("generate replies from a checkpoint for a few prompts", _add_chat, _run_chat),
    "check": ("validate recipes without running anything", _add_check, _run_check),
    "upcycle": ("turn a dense checkpoint into an MoE (replicate, shuffle, cut, re-initialise)",
                _add_upcycle, _run_upcycle),
    "serve-policy": ("serve an online-DPO recipe's policy from vLLM at its generation.base_url, taking new "
                     "weights from the trainers (generation.backend: vllm-server)", _add_serve_policy,
                     _run_serve_policy),
    "plan": ("parameter count and memory per GPU for a recipe", _add_plan, _run_plan),
    "world": ("write the demo's tiny world: the pretraining corpus and the held-out evaluation sets", _add_world,
              _run_world),
    "annotators": ("sign-in tokens of the people who rank responses in annotate's web app", _add_annotators,
                   _run_annotators),
    "push": ("push a run's model, tokenizer and model card to the Hugging Face Hub", _add_push, _uploader(push, "")),
    "push-data": ("push an assemble run's D and P as a Hub data set (parquet splits, card)", _add_push_data,
                  _uploader(push_data, "the data set ")),
    "demo": ("the whole pipeline on the tiny default (--moe: and on its upcycled MoE)", _add_demo, _run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen2-align",
        description="Qwen2 post-training pipeline: data synthesis, SFT, reward model, offline and online DPO.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, entry in stage_table.STAGES.items():
        p = sub.add_parser(name, help=entry.help, description=entry.help)
        actions = getattr(entry.stage, "actions", {})
        if actions:
            p.add_argument("action", nargs="?", choices=list(actions),
                           help="; ".join(f"{n}: {text}" for n, text in actions.items()) + " (default: run the stage)")
        _add_recipe_arguments(p, name)
        if name == "eval":
            p.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                           help="evaluate this checkpoint instead of the recipe's models; repeatable")
    for name, (text, add, _) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        if add:
            add(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    # What the imports built is never garbage: frozen, it is not rescanned by every collection the trainers ask for
    # (accelerate collects before training; ~0.3 s each with torch, transformers and TRL loaded). Unfrozen at the
    # end, so that the interpreter's last collection frees it (nanobind extensions report leaks otherwise); a
    # caller that froze its heap already (the tests) keeps it frozen.
    freezing = gc.get_freeze_count() == 0
    if freezing:
        gc.freeze()
    try:
        return _run_command(argv)
    finally:
        if freezing:
            gc.unfreeze()


def _run_command(argv: list[str] | None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    name = args.command
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if name in stage_table.STAGES:
            overrides = list(args.set)
            if getattr(args, "model", None):
                overrides.append(models_override(args.model))
            recipe = stage_table.load_recipe(args.recipe, stage=name, overrides=overrides)
            stage_table.run(name, recipe, getattr(args, "action", None))
            return 0
        return COMMANDS[name][2](args)
    except (RecipeError, DataError, StageError, GenerationError, HubError, TokenizerError) as e:
        print(f"qwen2-align: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
