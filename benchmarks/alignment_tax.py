"""The alignment tax of online DPO: AdamW vs OnDARE vs OnTIES at equal steps on the tiny setting.

    python benchmarks/alignment_tax.py [--set key=value ...]

Starts from runs/tiny/{init,sft,rm,dpo} (made with the tiny recipes where missing, as `make demo` makes them)
and runs recipes/tiny/online-dpo.yaml once per optimizer, changing only `merging.method`: none (TRL's AdamW),
ondare, onties; same seed, prompts, learning rate and steps (`--set` changes all three runs alike). For each:

- reward gain: the stage's held-out reward after the last episode minus before the first;
- tax on the SFT data: the change of the per-token NLL of held-out demonstrations (the answers SFT taught),
  the starting policy's vs the final one's;
- task accuracy: of 50 fresh questions answered greedily, replies in the answer format and correct ones.

Ratio columns divide each optimizer's reward gain and NLL drift by AdamW's. The result file records the
CPU model and the commit.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("none", "ondare", "onties")
NAMES = {"none": "AdamW", "ondare": "OnDARE", "onties": "OnTIES"}


def ensure_tiny_models() -> None:
    """runs/tiny/{init,sft,rm,dpo} and the arithmetic data, as `make demo` makes them."""
    from alignment.checkpoint import init_checkpoint
    from qwen2_align.demo.arithmetic import write_arithmetic_sets
    from qwen2_align.stage_table import load_recipe, run

    root = Path("runs/tiny")
    if not (root / "init" / "config.json").exists():
        init_checkpoint("tiny", root / "init", seed=0)
    if not (root / "data" / "math_problems.jsonl").exists():
        write_arithmetic_sets(root / "data", n_demonstrations=2000, n_preferences=1200, seed=0)
    for stage in ("sft", "rm", "dpo"):
        run(stage, load_recipe(f"recipes/tiny/{stage}.yaml"))


def heldout_nll(model_dir: str, rows: list[dict]) -> float:
    """Mean negative log-likelihood per answer token of held-out demonstrations (the assistant turns)."""
    from alignment.tokenizer import load_tokenizer
    from alignment.train.common import load_frozen_model
    from alignment.train.dpo import completion_logprobs
    from qwen2_align.stage_table import load_recipe

    recipe = load_recipe("recipes/tiny/online-dpo.yaml")
    tokenizer = load_tokenizer(model_dir)
    prompts = [r["messages"][:-1] for r in rows]
    answers = [r["messages"][-1:] for r in rows]
    total = sum(completion_logprobs(load_frozen_model(model_dir, recipe), tokenizer, prompts, answers))
    tokens = 0
    for prompt, answer in zip(prompts, answers):
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        tokens += len(tokenizer(full, add_special_tokens=False)["input_ids"]) \
            - len(tokenizer(head, add_special_tokens=False)["input_ids"])
    return -total / tokens


def measure(model_dir: str, rows: list[dict]) -> dict:
    from qwen2_align.demo.arithmetic import answer_quality

    quality = answer_quality(model_dir, n=50, seed=7)
    return {"heldout_nll": heldout_nll(model_dir, rows), "in_format": quality["in_format"] / 50,
            "correct": quality["correct"] / 50}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for all three runs (e.g. episodes=2)")
    parser.add_argument("--out", default="runs/tiny/alignment-tax", help="where the three runs go")
    args = parser.parse_args()

    from benchmarks.common import write_result
    from qwen2_align.demo.arithmetic import arithmetic_sets
    from qwen2_align.stage_table import load_recipe, run

    ensure_tiny_models()
    heldout = arithmetic_sets(200, 0, seed=99)[0]
    base_recipe = load_recipe("recipes/tiny/online-dpo.yaml", overrides=args.set)
    start = measure(base_recipe.model, heldout)
    results = {}
    for method in METHODS:
        overrides = [*args.set, f"run_dir={args.out}/{method}", f"merging.method={method}"]
        manifest = run("online-dpo", load_recipe("recipes/tiny/online-dpo.yaml", overrides=overrides))
        metrics = manifest["metrics"]
        final = measure(manifest["run_dir"], heldout)
        results[method] = {
            "reward_start": metrics["eval_reward_mean_start"], "reward_end": metrics["eval_reward_mean_end"],
            "reward_gain": metrics["eval_reward_mean_end"] - metrics["eval_reward_mean_start"],
            "win_rate_vs_reference_end": metrics["win_rate_vs_reference_end"],
            "kl_to_reference_end": metrics["kl_to_reference_end"], "pairs_trained": metrics["pairs_trained"],
            "nll_drift": final["heldout_nll"] - start["heldout_nll"], **final}
    adamw = results["none"]
    ratio = lambda a, b: a / b if b else math.nan  # noqa: E731
    print(f"\nalignment tax, tiny setting: {base_recipe.episodes} episodes x {base_recipe.prompts_per_episode} prompts "
          f"x {base_recipe.samples_per_prompt} samples, lr {base_recipe.training['learning_rate']}, "
          f"p {base_recipe.merging.reserve_rate}, alpha {base_recipe.merging.alpha}")
    print(f"start policy: held-out NLL {start['heldout_nll']:.4f}/token, in format {start['in_format']:.0%}, "
          f"correct {start['correct']:.0%}")
    header = (f"{'optimizer':<9} {'reward gain':>11} {'x AdamW':>8} {'win vs ref':>10} {'KL to ref':>9} "
              f"{'NLL drift':>10} {'x AdamW':>8} {'in format':>9} {'correct':>8}")
    print(header)
    print("-" * len(header))
    for method, r in results.items():
        print(f"{NAMES[method]:<9} {r['reward_gain']:>+11.4f} {ratio(r['reward_gain'], adamw['reward_gain']):>8.2f} "
              f"{r['win_rate_vs_reference_end']:>10.2f} {r['kl_to_reference_end']:>9.3f} {r['nll_drift']:>+10.4f} "
              f"{ratio(r['nll_drift'], adamw['nll_drift']):>8.2f} {r['in_format']:>9.0%} {r['correct']:>8.0%}")
    path = write_result("alignment-tax-tiny", {"overrides": args.set, "start": start, "results": results,
                                               "recipe": "recipes/tiny/online-dpo.yaml"})
    print(f"result: {path}")


if __name__ == "__main__":
    main()
