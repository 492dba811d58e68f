"""The demo's report, `runs/<name>/report/`: what each stage kept and bought, read from the runs' own files.

    report.md               the summary table, held-out metrics per model, rows per stage, times, the plots
    summary.json            the same numbers, for scripts and tests
    metrics_by_stage.png    held-out metric per model (base, sft, dpo, online-dpo)
    rows_by_stage.png       rows in, out and quarantined per synthesis stage
    stage_times.png         seconds per stage
    reward_by_episode.png   online DPO: sample reward, accuracy and held-out reward per episode
    curves-<stage>.png      training curves (pretrain, sft, rm, dpo, online-dpo); ontology.png: InsTag's tags

Nothing here computes a metric: the numbers are the manifests' and the eval run's, so the report cannot
disagree with the runs it describes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from alignment.atomic import atomic_write_text
from alignment.precision import cpu_model

HEADLINE = (("arithmetic_accuracy", "held-out arithmetic accuracy", True),
            ("code_pass@1", "held-out code pass@1", True),
            ("constraint_following_rate", "held-out constraint following", True),
            ("principle_following_rate", "held-out principle following", True),
            ("reward_mean", "reward-model score", True),
            ("perplexity", "perplexity on base text (alignment tax)", False),
            ("passkey@1x", "pass key at the trained length", True),
            ("passkey@4x", "pass key at 4x, plain RoPE", True),
            ("passkey@4x_dca_yarn", "pass key at 4x, DCA + YaRN", True))
TRAINERS = ("sft", "rm", "dpo", "online-dpo")  # stages that train a model (pretrain runs before the steps)
ONLINE = {"online-dpo": "OnDARE", "online-dpo-adamw": "AdamW"}  # online DPO's two optimizers, same start and steps


def _manifest(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def stage_rows(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Rows in, outputs by name and quarantined, per data stage, from its manifest."""
    rows = {}
    for name in names:
        counts = _manifest(root / name).get("counts", {})
        if "outputs" in counts:
            rows[name] = {"in": counts["rows_in"], "outputs": counts["outputs"],
                          "quarantined": counts["quarantined_on_read"] + counts["quarantined_by_stage"]}
    return rows


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_metrics_by_stage(metrics: dict[str, dict], path: Path) -> None:
    shown = [(key, title) for key, title, _ in HEADLINE if any(key in m for m in metrics.values())]
    fig = Figure(figsize=(3.2 * len(shown), 3.0))
    axes = fig.subplots(1, len(shown), squeeze=False)
    models = list(metrics)
    for ax, (key, title) in zip(axes[0], shown):
        values = [metrics[m].get(key, float("nan")) for m in models]
        bars = ax.bar(range(len(models)), values, color=[f"C{i}" for i in range(len(models))])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_rows(rows: dict[str, dict], path: Path) -> None:
    names = list(rows)
    kept = [sum(v for k, v in rows[n]["outputs"].items() if k in ("demonstrations", "preferences", "tagged",
                                                                     "selected", "evolved", "responses", "clean",
                                                                     "completions")) for n in names]
    fig = Figure(figsize=(max(6, 0.7 * len(names)), 3.4))
    ax = fig.subplots()
    x = range(len(names))
    ax.bar([i - 0.27 for i in x], [rows[n]["in"] for n in names], 0.27, label="rows in")
    ax.bar(x, kept, 0.27, label="rows out (D, P or the next stage's input)")
    ax.bar([i + 0.27 for i in x], [rows[n]["quarantined"] for n in names], 0.27, label="quarantined")
    ax.set_xticks(list(x), names, rotation=35, ha="right", fontsize=8)
    ax.set_yscale("symlog")
    ax.set_ylim(0, 3 * max([rows[n]["in"] for n in names] + kept))
    ax.legend(fontsize=7)
    ax.set_title("rows per synthesis stage", fontsize=9)
    _save(fig, path)


def plot_times(seconds: dict[str, float], path: Path) -> None:
    names = list(seconds)
    fig = Figure(figsize=(7, 0.22 * len(names) + 1))
    ax = fig.subplots()
    ax.barh(range(len(names)), [seconds[n] for n in names], color="C0")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("time per stage (this demo run)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def plot_episodes(runs: dict[str, list[dict]], path: Path) -> None:
    """One panel per online DPO run (OnDARE, AdamW): its rewards and accuracies per episode."""
    fig = Figure(figsize=(5.5 * len(runs), 3.2))
    for ax, (label, episodes) in zip(fig.subplots(1, len(runs), squeeze=False)[0], runs.items()):
        keys = [k for k in ("sample_reward_mean", "sample_accuracy", "eval_reward_mean", "eval_accuracy",
                            "win_rate_vs_reference") if any(k in e for e in episodes)]
        for key in keys:
            points = [(e["episode"], e[key]) for e in episodes if key in e]
            ax.plot(*zip(*points), marker="o", label=key)
        ax.set_xlabel("episode")
        ax.set_title(f"online DPO ({label}): reward per episode", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _save(fig, path)


def dense_vs_moe(metrics: dict[str, dict]) -> dict[str, dict[str, list]]:
    """Per model stage the MoE went through: each headline metric as [dense, MoE] (`make demo MOE=1`)."""
    return {stage: {key: [metrics[stage].get(key), metrics[f"moe-{stage}"].get(key)]
                    for key, _, _ in HEADLINE if key in metrics[stage]}
            for stage in ("base", "sft", "dpo", "online-dpo") if stage in metrics and f"moe-{stage}" in metrics}


def merging_comparison(metrics: dict[str, dict], runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per online DPO run: the held-out reward it gained over its episodes and the tax it paid (base-text
    perplexity over the DPO model's it started from, and over the base model's)."""
    rows = {}
    for name, label in ONLINE.items():
        episodes = [e for e in runs.get(label, []) if "eval_reward_mean" in e]
        if not episodes or name not in metrics:
            continue
        first, last = episodes[0], episodes[-1]
        row = {"optimizer": label, "reward_gained": last["eval_reward_mean"] - first["eval_reward_mean"],
               "sampled_accuracy_gained": last.get("eval_accuracy", 0.0) - first.get("eval_accuracy", 0.0)}
        perplexity = metrics[name].get("perplexity")
        if perplexity and metrics.get("dpo", {}).get("perplexity"):
            row["tax_vs_dpo"] = perplexity / metrics["dpo"]["perplexity"]
        if perplexity and metrics.get("base", {}).get("perplexity"):
            row["tax_vs_base"] = perplexity / metrics["base"]["perplexity"]
        rows[name] = row
    return rows


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_report(root: str | Path, steps: tuple, seconds: dict[str, float], total_seconds: float) -> dict:
    """Write `root/report/` from the runs under `root`, print the one-screen summary, return the summary."""
    root = Path(root)
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    eval_dir = root / "eval"
    metrics = json.loads((eval_dir / "metrics.json").read_text()) if (eval_dir / "metrics.json").exists() else {}
    metrics = {m: {k: v for k, v in values.items() if k != "counts" and "/" not in k} for m, values in metrics.items()}
    data_steps = [s.name for s in steps if s.stage not in TRAINERS and s.stage != "eval"]
    rows = stage_rows(root, data_steps)
    online = {label: json.loads((root / name / "metrics.json").read_text())["episodes"]
              for name, label in ONLINE.items() if (root / name / "metrics.json").exists()}
    episodes = online.get("OnDARE", [])
    base = _manifest(root / "base")
    trained = {"pretrain": base} | {s.name: _manifest(root / s.name) for s in steps if s.stage in TRAINERS}

    if metrics:
        plot_metrics_by_stage(metrics, out / "metrics_by_stage.png")
    if rows:
        plot_rows(rows, out / "rows_by_stage.png")
    plot_times(seconds, out / "stage_times.png")
    if online:
        plot_episodes(online, out / "reward_by_episode.png")
    for name, run_dir in (("pretrain", root / "base"), *((n, root / n) for n in list(trained)[1:])):
        if (run_dir / "curves.png").exists():
            shutil.copy2(run_dir / "curves.png", out / f"curves-{name}.png")
    if (root / "instag" / "ontology.png").exists():
        shutil.copy2(root / "instag" / "ontology.png", out / "ontology.png")

    accuracy = {m: values.get("arithmetic_accuracy") for m, values in metrics.items()}
    summary = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "precision": trained["sft"].get("precision", {}),
               "metrics": metrics, "arithmetic_accuracy": accuracy, "rows": rows, "seconds": seconds,
               "total_seconds": total_seconds, "pretrain_cached_from_s": base.get("duration_s"),
               "episodes": episodes, "merging": merging_comparison(metrics, online),
               "dense_vs_moe": dense_vs_moe(metrics),
               "train_metrics": {k: m.get("metrics", {}) for k, m in trained.items() if m}}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "report.md", render_markdown(summary, root))
    print(render_screen(summary, out))
    return summary


def render_markdown(summary: dict, root: Path) -> str:
    metrics, rows, seconds = summary["metrics"], summary["rows"], summary["seconds"]
    models = list(metrics)
    lines = [f"# The tiny demo: `{root}`", "",
             f"Every stage of the pipeline on the tiny world, {summary['total_seconds'] / 60:.1f} min in all on "
             f"{summary['machine']} (training compute: {summary['precision'].get('compute', '?')}). Held-out "
             "metrics come from the `eval` run (`eval/metrics.json`, its replies in `eval/samples/`).", "",
             "## Held-out metrics per model", "",
             "| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for key, title, _ in HEADLINE:
        if any(key in metrics[m] for m in models):
            lines.append(f"| {title} | " + " | ".join(_fmt(metrics[m].get(key, "")) for m in models) + " |")
    lines += ["", "![metrics](metrics_by_stage.png)", "", "## Rows per synthesis stage", "",
              "| stage | rows in | out | quarantined |", "|---|---|---|---|"]
    for name, row in rows.items():
        out = ", ".join(f"{k} {v}" for k, v in row["outputs"].items())
        lines.append(f"| {name} | {row['in']} | {out} | {row['quarantined']} |")
    lines += ["", "![rows](rows_by_stage.png)", "", "## Training", ""]
    for name, values in summary["train_metrics"].items():
        shown = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not k.startswith("eval_steps")}
        lines.append(f"- **{name}**: " + ", ".join(f"{k} {_fmt(v)}" for k, v in list(shown.items())[:8]))
        lines.append(f"  ![curves](curves-{name}.png)")
    if summary["merging"]:
        lines += ["", "## Online DPO: OnDARE vs AdamW", "",
                  "The same online DPO from the same DPO model, at the same learning rate and steps; the merging "
                  "optimizer is what differs. Reward gained: held-out reward-model score, last episode minus the "
                  "first; tax: base-text perplexity over the DPO model's (and the base model's).", "",
                  "| run | optimizer | reward gained | sampled accuracy gained | tax vs DPO | tax vs base |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {row['optimizer']} | {_fmt(row['reward_gained'])} | "
                  f"{_fmt(row['sampled_accuracy_gained'])} | {_fmt(row.get('tax_vs_dpo', ''))} | "
                  f"{_fmt(row.get('tax_vs_base', ''))} |" for name, row in summary["merging"].items()]
    if summary["dense_vs_moe"]:
        keys = [(key, title) for key, title, _ in HEADLINE if any(key in v for v in summary["dense_vs_moe"].values())]
        lines += ["", "## Dense vs MoE (`make demo MOE=1`)", "",
                  "The MoE is the base model upcycled into the `tiny-moe` shape (8 experts of 96, 2 active, a shared "
                  "expert), then trained by the same recipes on the same D and P. Each cell: dense / MoE.", "",
                  "| model | " + " | ".join(title for _, title in keys) + " |", "|---|" + "---|" * len(keys)]
        for stage, values in summary["dense_vs_moe"].items():
            lines.append(f"| {stage} | " + " | ".join(" / ".join(_fmt(v) for v in values.get(key, ["", ""]))
                                                       for key, _ in keys) + " |")
    if summary["episodes"]:
        lines += ["", "## Online DPO per episode", "", "![reward](reward_by_episode.png)"]
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {s:.1f} |" for name, s in seconds.items()]
    if summary.get("pretrain_cached_from_s") and seconds.get("pretrain", 0) < 0.5 * summary["pretrain_cached_from_s"]:
        lines.append(f"\nThe base model came from the cache (it trained in {summary['pretrain_cached_from_s']:.0f} s).")
    lines += ["", "![times](stage_times.png)", "", "## The tag ontology (instag)", "", "![ontology](ontology.png)", ""]
    return "\n".join(lines)


def render_screen(summary: dict, out: Path) -> str:
    """The one-screen summary printed at the end of the demo."""
    metrics, seconds = summary["metrics"], summary["seconds"]
    models = list(metrics)
    lines = ["", "=" * 78, f"demo finished in {summary['total_seconds'] / 60:.1f} min on {summary['machine']}",
             f"report: {out / 'report.md'}",
             "-" * 78, f"{'held-out':<34}" + "".join(f"{m:>11}" for m in models)]
    for key, title, _ in HEADLINE:
        if any(key in metrics[m] for m in models):
            lines.append(f"{title[:34]:<34}" + "".join(f"{metrics[m].get(key, float('nan')):>11.3f}" for m in models))
    lines.append("-" * 78)
    for name, row in summary["rows"].items():
        out_rows = ", ".join(f"{k} {v}" for k, v in row["outputs"].items() if v)
        lines.append(f"{name:<19}{row['in']:>5} in -> {out_rows or 'nothing'}; quarantined {row['quarantined']}"[:78])
    for name, row in summary["merging"].items():
        lines.append(f"{name + ' (' + row['optimizer'] + ')':<34}reward {row['reward_gained']:+.3f}, "
                     f"tax vs DPO {row.get('tax_vs_dpo', float('nan')):.3f}x, "
                     f"vs base {row.get('tax_vs_base', float('nan')):.3f}x")
    lines.append("-" * 78)
    slowest = sorted(seconds.items(), key=lambda kv: -kv[1])[:6]
    lines.append("slowest: " + ", ".join(f"{n} {s:.0f}s" for n, s in slowest))
    lines.append("=" * 78)
    return "\n".join(lines)
