"""Publish a run's model on the Hugging Face Hub: weights, tokenizer, generation config, model card.

The upload folder holds exactly what stock transformers and vLLM need, plus a model card built
from the run's manifest and the manifests of the runs it started from (base model, data sets
and their row counts, recipe, evaluation results, license). The token is never read here:
`huggingface_hub` takes it from HF_TOKEN or the login cache, and nothing we write mentions it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_dir

# What a checkpoint needs to load and chat; checkpoints, optimizer states and logs stay behind.
UPLOAD_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "added_tokens.json")


class HubError(RuntimeError):
    """A one-line reason the push did not happen."""


def _manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    if not path.exists():
        raise HubError(f"{run_dir}: no manifest.json; push a finished run directory")
    return json.loads(path.read_text())


def lineage(run_dir: Path) -> list[dict[str, Any]]:
    """This run's manifest, then those of the local runs it started from (newest first)."""
    chain, seen = [], set()
    current: Path | None = run_dir
    while current is not None and (current / "manifest.json").exists() and current.resolve() not in seen:
        seen.add(current.resolve())
        manifest = json.loads((current / "manifest.json").read_text())
        chain.append(manifest)
        parent = manifest.get("recipe", {}).get("model")
        current = Path(parent) if parent and Path(parent).is_dir() else None
    return chain


def model_card(run_dir: Path, repo: str, license: str) -> str:
    chain = lineage(run_dir)
    if not chain:
        raise HubError(f"{run_dir}: no manifest.json; push a finished run directory")
    base = chain[-1].get("recipe", {}).get("model", "unknown")
    hub_datasets = sorted({source["source"] for m in chain for i in m.get("inputs", {}).values()
                           for source in i.get("mixture", [i]) if source.get("hub")})
    meta = {"license": license, "library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["qwen2", "qwen2-align", "trl"] + [m["stage"] for m in chain]}
    if not Path(str(base)).exists():
        meta["base_model"] = base
    if hub_datasets:
        meta["datasets"] = hub_datasets
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {repo.split('/')[-1]}", "",
             f"Aligned with [qwen2-align](https://github.com/) from `{base}` through: "
             + " -> ".join(m["stage"] for m in reversed(chain)) + ".", "", "## Data", "",
             "| stage | input | source | rows | quarantined | used for training | held out |", "|---|---|---|---|---|---|---|"]
    for m in reversed(chain):
        counts = m.get("counts", {})
        for name, info in m.get("inputs", {}).items():
            lines.append(f"| {m['stage']} | {name} | `{info['source']}` | {info.get('rows', counts.get('rows_in', ''))} "
                         f"| {counts.get('quarantined', '')} | {counts.get('train', '')} | {counts.get('eval', '')} |")
    lines += ["", "## Evaluation", "", "| stage | metric | value |", "|---|---|---|"]
    for m in reversed(chain):
        for key, value in (m.get("metrics") or {}).items():
            if isinstance(value, (int, float)):
                lines.append(f"| {m['stage']} | {key} | {value:.4g} |")
    lines += ["", "## Recipes", ""]
    for m in reversed(chain):
        lines += [f"### {m['stage']}", "", "```yaml", yaml.safe_dump(m.get("recipe", {}), sort_keys=False).strip(),
                  "```", ""]
    lines += ["## Environment", "", "```json", json.dumps(chain[0].get("packages", {}), indent=1), "```", ""]
    return "\n".join(lines)


def build_upload_folder(run_dir: str | Path, out: str | Path, repo: str, license: str = "apache-2.0") -> Path:
    """Write the exact folder that `push` uploads."""
    run_dir = Path(run_dir)
    _manifest(run_dir)
    with atomic_dir(out) as tmp:
        copied = [p for pattern in UPLOAD_PATTERNS for p in run_dir.glob(pattern)]
        if not any(p.suffix == ".safetensors" for p in copied):
            raise HubError(f"{run_dir}: no safetensors weights to upload")
        for p in copied:
            shutil.copy2(p, tmp / p.name)
        (tmp / "README.md").write_text(model_card(run_dir, repo, license), encoding="utf-8")
    return Path(out)


def push(run_dir: str | Path, repo: str, private: bool = False, dry_run: bool = False, out: str | Path | None = None,
         license: str = "apache-2.0") -> Path:
    """Upload a run to `repo`; with `dry_run`, only write the folder (default run_dir/hub-upload)."""
    folder = build_upload_folder(run_dir, out or Path(run_dir) / "hub-upload", repo, license)
    if dry_run:
        return folder
    from huggingface_hub import HfApi, constants

    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="Upload model from qwen2-align")
    except Exception as e:  # noqa: BLE001 - network, auth and server errors all end the push in one line
        reason = str(e).splitlines()[0] if str(e) else ""
        raise HubError(f"push to {repo} at {constants.ENDPOINT} failed: {type(e).__name__}: {reason}") from None
    return folder
