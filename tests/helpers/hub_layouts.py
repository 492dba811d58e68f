"""Local folders laid out like the Hub data sets users train on, with synthetic rows, so the
data and trainer tests read real `datasets` layouts without the network.

- ultrachat_200k: `data/<split>-00000-of-00001.parquet` (splits train_sft, test_sft); columns
  prompt, prompt_id, messages (a whole conversation, one or two exchanges); no id.
- ultrafeedback_binarized: `<split>/<file>.parquet` (splits train_prefs, test_prefs); columns
  prompt, prompt_id, chosen and rejected (whole conversations: the user turn and a reply),
  messages (= chosen), score_chosen, score_rejected; no id.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import datasets

ULTRACHAT_SPLITS = {"train_sft": 40, "test_sft": 10}
ULTRAFEEDBACK_SPLITS = {"train_prefs": 40, "test_prefs": 10}


def _prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def ultrachat_rows(split: str, count: int) -> list[dict]:
    """Rows as ultrachat_200k has them; every third conversation has a second exchange."""
    rows = []
    for i in range(count):
        prompt = f"[{split}] How do I plant tree number {i}?"
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": f"Dig a hole for tree {i}, then water it."}]
        if i % 3 == 0:
            messages += [{"role": "user", "content": f"And how deep for tree {i}?"},
                         {"role": "assistant", "content": f"{i + 20} centimetres."}]
        rows.append({"prompt": prompt, "prompt_id": _prompt_id(prompt), "messages": messages})
    return rows


def ultrafeedback_rows(split: str, count: int) -> list[dict]:
    """Rows as ultrafeedback_binarized has them: chosen and rejected repeat the user turn."""
    rows = []
    for i in range(count):
        prompt = f"[{split}] What is {i} + {i}?"
        chosen = [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{2 * i}."}]
        rejected = [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"Perhaps {2 * i + 1}."}]
        rows.append({"prompt": prompt, "prompt_id": _prompt_id(prompt), "chosen": chosen, "rejected": rejected,
                     "messages": chosen, "score_chosen": 8.5, "score_rejected": float(i % 5)})
    return rows


def write_hub_folder(root: Path, splits: dict[str, list[dict]],
                     layout: Literal["sharded", "split_folders"] = "sharded") -> Path:
    """One parquet file per split: `data/<split>-00000-of-00001.parquet` (how the Hub stores
    converted data sets) or `<split>/<split>.parquet`."""
    for split, rows in splits.items():
        path = (root / "data" / f"{split}-00000-of-00001.parquet" if layout == "sharded"
                else root / split / f"{split}.parquet")
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return root


def ultrachat_folder(root: Path) -> Path:
    return write_hub_folder(root, {s: ultrachat_rows(s, n) for s, n in ULTRACHAT_SPLITS.items()})


def ultrafeedback_folder(root: Path) -> Path:
    return write_hub_folder(root, {s: ultrafeedback_rows(s, n) for s, n in ULTRAFEEDBACK_SPLITS.items()},
                            layout="split_folders")
