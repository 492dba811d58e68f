"""`qwen2-align <stage>`: the one entry point the Makefile calls.

Every stage of the pipeline is listed in `--help`; stages whose work has not landed yet say
so and exit with status 2, so scripts never mistake them for success.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

# name -> one-line help, in pipeline order. Stages with a handler in _HANDLERS are built.
STAGES: dict[str, str] = {
    "init": "write a randomly initialised checkpoint of a preset shape, with tokenizer",
    "chat": "generate replies from a checkpoint for a few prompts",
    "upcycle": "turn a dense checkpoint into an MoE (replicate, shuffle, cut, re-initialise)",
    "instag": "InsTag: tag instructions and normalise the tag ontology",
    "select": "select instructions by tag diversity and complexity",
    "evolve": "instruction evolution (Evol-Instruct / Tree-Instruct)",
    "responses": "sample several responses per instruction from several models",
    "annotate": "ranking web app: annotators order responses (SQLite)",
    "rejection": "rejection sampling for math: correct paths to D, correct vs wrong to P",
    "execution": "execution feedback: code and instruction-following checked in a sandbox",
    "repurpose": "data repurposing: literature and role-play into instructions",
    "constitution": "constitutional feedback: responses that follow or violate principles",
    "decontam": "decontamination against test sets (13-gram, LCS)",
    "sft": "supervised fine-tuning on D (TRL SFTTrainer)",
    "rm": "reward model on P (TRL RewardTrainer)",
    "dpo": "offline DPO on P (TRL DPOTrainer)",
    "online-dpo": "online DPO with the online merging optimizer (OnDARE / OnTIES)",
    "plan": "parameter count and memory per GPU for a recipe",
    "push": "push a run's model, tokenizer and model card to the Hugging Face Hub",
    "demo": "the whole pipeline on the tiny default",
}


def _add_init(p: argparse.ArgumentParser) -> None:
    from .model import PRESETS

    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--initializer-range", type=float, default=None, help="std of the random weights")


def _run_init(a: argparse.Namespace) -> int:
    from .checkpoint import init_checkpoint

    overrides = {} if a.initializer_range is None else {"initializer_range": a.initializer_range}
    path = init_checkpoint(a.preset, a.out, seed=a.seed, dtype=a.dtype, **overrides)
    print(f"wrote {a.preset} checkpoint to {path}")
    return 0


def _add_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or Hub id")
    p.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample with the checkpoint's settings (default greedy)")


def _run_chat(a: argparse.Namespace) -> int:
    from .checkpoint import load_model_and_tokenizer
    from .generation import generate_chat

    model, tok = load_model_and_tokenizer(a.model)
    model.eval()
    convs = [[{"role": "user", "content": p}] for p in a.prompt]
    for prompt, reply in zip(a.prompt, generate_chat(model, tok, convs, a.max_new_tokens, do_sample=a.sample)):
        print(f"user: {prompt}\nassistant: {reply!r}\n")
    return 0


_MOE_SHAPE = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")


def _add_upcycle(p: argparse.ArgumentParser) -> None:
    from .model import PRESETS

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
    from .model import PRESETS
    from .upcycle import upcycle

    preset = PRESETS[a.preset] if a.preset else {}
    flags = dict(zip(_MOE_SHAPE, (a.num_experts, a.top_k, a.expert_size, a.shared_size)))
    shape = {k: preset.get(k) if v is None else v for k, v in flags.items()}
    names = ("--num-experts", "--top-k", "--expert-size", "--shared-size")
    missing = [flag for flag, k in zip(names, _MOE_SHAPE) if shape[k] is None]
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
    p.add_argument("--out", default="runs/demo", help="run directory")


def _run_demo(a: argparse.Namespace) -> int:
    """Today: build the tiny model and chat with it. Later stages extend this."""
    from pathlib import Path

    model_dir = Path(a.out) / "init"
    _run_init(argparse.Namespace(preset="tiny", out=str(model_dir), seed=0, dtype="float32", initializer_range=None))
    prompts = ["What is 2 + 3?", "Name a colour.", "Say hello in French.", "写一首关于春天的诗。"]
    return _run_chat(argparse.Namespace(model=str(model_dir), prompt=prompts, max_new_tokens=16, sample=False))


_HANDLERS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "init": (_add_init, _run_init),
    "chat": (_add_chat, _run_chat),
    "upcycle": (_add_upcycle, _run_upcycle),
    "demo": (_add_demo, _run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen2-align",
        description="Qwen2 post-training pipeline: data synthesis, SFT, reward model, offline and online DPO.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for name, text in STAGES.items():
        built = name in _HANDLERS
        p = sub.add_parser(name, help=text if built else f"{text} [not built yet]", description=text)
        if built:
            _HANDLERS[name][0](p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.stage not in _HANDLERS:
        print(f"qwen2-align: stage '{args.stage}' is not built yet", file=sys.stderr)
        return 2
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return _HANDLERS[args.stage][1](args)


if __name__ == "__main__":
    sys.exit(main())
