"""Publish on the Hugging Face Hub: a run's model (`push`) or an assembled data set (`push_data`).

The model upload folder holds exactly what stock transformers and vLLM need, plus a model card built
from the run's manifest and the manifests of the runs it started from (base model, data sets
and their row counts, recipe, evaluation results, license). The data set upload folder holds the
`assemble` run's D and P as parquet splits and a card with its recipes, counts and lineage. The
token is never read here: `huggingface_hub` takes it from HF_TOKEN or the login cache, and nothing
we write mentions it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from huggingface_hub import HfApi, constants

from alignment.atomic import atomic_dir
from alignment.data import load_jsonl

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


def _upload(folder: Path, repo: str, repo_type: str, private: bool) -> None:
    """Create the repo if needed and upload the folder; the token is huggingface_hub's to find."""
    api = HfApi()
    try:
        api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, repo_type=repo_type, folder_path=str(folder),
                          commit_message=f"Upload {repo_type} from qwen2-align")
    except Exception as e:  # noqa: BLE001 - network, auth and server errors all end the push in one line
        reason = str(e).splitlines()[0] if str(e) else ""
        raise HubError(f"push to {repo} at {constants.ENDPOINT} failed: {type(e).__name__}: {reason}") from None


def push(run_dir: str | Path, repo: str, private: bool = False, dry_run: bool = False, out: str | Path | None = None,
         license: str = "apache-2.0") -> Path:
    """Upload a run to `repo`; with `dry_run`, only write the folder (default run_dir/hub-upload)."""
    folder = build_upload_folder(run_dir, out or Path(run_dir) / "hub-upload", repo, license)
    if not dry_run:
        _upload(folder, repo, "model", private)
    return folder


# --- data sets ---------------------------------------------------------------------------------------------------

DATA_SPLITS = ("demonstrations", "preferences")  # an assemble run's outputs, one config each
ROWS_PER_FILE = 200_000


def split_schema(split: str) -> pa.Schema:
    """One parquet schema per split: messages as list<struct<role, content>>, meta as a JSON string."""
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    content = [("messages", messages)] if split == "demonstrations" else [(k, messages) for k in
                                                                          ("prompt", "chosen", "rejected")]
    return pa.schema([("id", pa.string()), *content, ("source", pa.string()), ("meta", pa.string())])


def encode_row(row: dict) -> dict:
    """A D or P row as its parquet split stores it: meta as a JSON string (its keys differ between stages and
    parquet takes one schema per split), messages as {role, content} structs."""
    for name in ("messages", "prompt", "chosen", "rejected"):
        for message in row.get(name, []):
            if set(message) != {"role", "content"}:
                raise HubError(f"row {row['id']!r}: {name}: a message with keys {sorted(message)}; only role and "
                               "content are published")
    return {**row, "meta": json.dumps(row["meta"], ensure_ascii=False)}


def decode_row(row: dict) -> dict:
    """A published row as the assemble run wrote it: `meta` parsed back from JSON."""
    return {**row, "meta": json.loads(row["meta"])}


def _write_split(rows: list[dict], split: str, data_dir: Path) -> list[str]:
    """The split's parquet files, ROWS_PER_FILE rows each, named as the Hub names shards."""
    chunks = [rows[i : i + ROWS_PER_FILE] for i in range(0, len(rows), ROWS_PER_FILE)]
    names = [f"{split}-{i:05d}-of-{len(chunks):05d}.parquet" for i in range(len(chunks))]
    for chunk, name in zip(chunks, names):
        table = pa.Table.from_pylist([encode_row(r) for r in chunk], schema=split_schema(split))
        pq.write_table(table, data_dir / name)
    return names


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _sample(row: dict, limit: int = 300) -> dict:
    """A row for the card: long message texts cut to `limit` characters."""
    cut = lambda t: t if len(t) <= limit else t[:limit] + "..."  # noqa: E731
    return {k: [{**m, "content": cut(m["content"])} for m in v] if k in ("messages", "prompt", "chosen", "rejected")
            else v for k, v in row.items()}


def data_card(manifest: dict[str, Any], repo: str, license: str, rows: dict[str, list[dict]]) -> str:
    """The data set card: configs, license, how to read meta, counts per source, test sets, lineage, recipes and
    samples."""
    splits = [s for s in DATA_SPLITS if rows[s]]
    meta = {"license": license, "language": ["en"], "tags": ["qwen2-align", "synthetic", "sft", "dpo"],
            "configs": [{"config_name": s, "data_files": [{"split": "train", "path": f"data/{s}-*.parquet"}]}
                        for s in splits]}
    name = repo.split("/")[-1]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", "",
             "Demonstrations (SFT) and preferences (DPO) synthesised and assembled with "
             "[qwen2-align](https://github.com/): merged from the synthesis runs below, deduplicated by content, "
             "decontaminated against the test sets below (13-gram / LCS rule of the Qwen2 report).", "",
             "## Loading", "", "```python", "import json", "from datasets import load_dataset", ""]
    lines += [f'{s} = load_dataset("{repo}", "{s}", split="train")' for s in splits]
    lines += ["meta = json.loads(" + splits[0] + '[0]["meta"])  # meta is a JSON string: its keys differ by stage',
              "```", "",
              "Columns: `id` (`RUN/ID`: the synthesis run's name and the row's id there), `messages` (demonstrations) "
              "or `prompt`, `chosen`, `rejected` (preferences), lists of `{role, content}` in TRL's conversational "
              "format; `source`; `meta`, a JSON string (parquet keeps one schema per split, and each stage writes "
              "its own meta keys). `meta.lineage` is the assembly's (source run, stage, fingerprint, parent id), "
              "with the synthesis stage's lineage (stage, model, seed, parent row) under `previous`.", "",
              "## Rows", ""]
    lines += _table(["split", "rows"], [[s, len(rows[s])] for s in DATA_SPLITS])
    lines += ["", "## Sources", ""]
    source_rows = [[f"`{run}`", info["stage"], output, *(c[k] for k in ("rows_in", "kept", "duplicates", "contaminated",
                                                                         "quarantined"))]
                   for run, info in manifest["sources"].items() for output, c in info["outputs"].items()]
    lines += _table(["run", "stage", "split", "rows in", "kept", "duplicates", "contaminated", "quarantined"],
                    source_rows)
    lines += ["", f"Duplicates dropped: {manifest['duplicates']} (first occurrence in recipe order kept).", "",
              "## Decontamination", ""]
    lines += _table(["test set", "source", "test rows", "contaminated (13-gram)", "contaminated (LCS)"],
                    [[n, f"`{t['test_file']}`", t["test_rows"], t["contaminated_train_rows"]["ngram"],
                      t["contaminated_train_rows"]["lcs"]] for n, t in manifest["test_sets"].items()])
    lines += ["", "## Lineage", ""]
    for split, summary in manifest["lineage"].items():
        for key in ("by_stage", "by_model", "by_seed"):
            lines += [f"{split}, {key.replace('by_', 'rows per ')}:", ""]
            lines += _table([key.removeprefix("by_"), "rows"], [[f"`{k}`", v] for k, v in summary[key].items()])
            lines.append("")
    recipes = [("assemble", manifest["recipe"])] + [(f"{info['stage']} (`{run}`)", info["recipe"])
                                                    for run, info in manifest["sources"].items()]
    lines += ["## Recipes", ""]
    for title, recipe in recipes:
        lines += [f"### {title}", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```", ""]
    lines += ["## Samples", ""]
    for s in splits:
        lines += [f"### {s}", "", "```json", *(json.dumps(_sample(r), ensure_ascii=False) for r in rows[s][:2]),
                  "```", ""]
    lines += ["## License", "", f"`{license}`. The rows were generated by the models named in the lineage; "
              "their licenses may add terms.", ""]
    return "\n".join(lines)


def build_data_folder(run_dir: str | Path, out: str | Path, repo: str, license: str = "apache-2.0") -> Path:
    """Write the exact folder that `push_data` uploads: data/<split>-NNNNN-of-NNNNN.parquet and README.md."""
    run_dir = Path(run_dir)
    manifest = _manifest(run_dir)
    if manifest.get("stage") != "assemble":
        raise HubError(f"{run_dir}: a {manifest.get('stage')} run; push-data publishes an assemble run")
    rows = {split: load_jsonl(run_dir / f"{split}.jsonl") for split in DATA_SPLITS}
    if not any(rows.values()):
        raise HubError(f"{run_dir}: no demonstrations or preferences to publish")
    with atomic_dir(out) as tmp:
        (tmp / "data").mkdir()
        for split in DATA_SPLITS:
            if rows[split]:
                _write_split(rows[split], split, tmp / "data")
        (tmp / "README.md").write_text(data_card(manifest, repo, license, rows), encoding="utf-8")
    return Path(out)


def push_data(run_dir: str | Path, repo: str, private: bool = False, dry_run: bool = False,
              out: str | Path | None = None, license: str = "apache-2.0") -> Path:
    """Upload an assemble run to the data set repo `repo`; with `dry_run`, only write the folder (default
    run_dir/hub-data)."""
    folder = build_data_folder(run_dir, out or Path(run_dir) / "hub-data", repo, license)
    if not dry_run:
        _upload(folder, repo, "dataset", private)
    return folder
