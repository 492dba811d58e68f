"""One synthesis stage in-process and on Ray with 1 and 2 workers, same machine, same recipe, same bytes.

    python benchmarks/ray_executor.py [--rows 2000] [--shard-size 64] [--new-tokens 16] [--rounds 2]
                                      [--executors local,ray-1,ray-2]

`generate` over `--rows` prompts on a randomly initialised tiny model (4 layers, 128 wide). Rows:
- `local`: the in-process executor (the default);
- `ray-1`: one Ray worker holding both CPUs (`cpus_per_worker: 2`), so the ratio to `local` is Ray's overhead:
  the worker's process and imports, its model load, shipping shards and outcomes;
- `ray-2`: two workers of one CPU each.
Ray itself is started once, first, and timed apart (`ray_start_s`): on a cluster it is already up (`ray start`,
then `executor.address: auto`). The rows run in turn, `--rounds` times; the ratios are of each row's best time.
Every run must write the bytes of `local`; the script says so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--executors", default="local,ray-1,ray-2", help="the rows to run, local first")
    a = ap.parse_args()

    import ray
    import yaml

    from alignment.checkpoint import init_checkpoint
    from benchmarks.common import write_result
    from qwen2_align.stage_table import load_recipe, run

    folder = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    model = init_checkpoint("tiny", folder / "model", seed=0)
    prompts = folder / "prompts.jsonl"
    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"Tell me about {i}."}], "source": "bench",
             "meta": {}} for i in range(a.rows)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    executors = {"local": {"kind": "local"}, "ray-1": {"kind": "ray", "workers": 1, "cpus_per_worker": 2},
                 "ray-2": {"kind": "ray", "workers": 2, "cpus_per_worker": 1}}
    executors = {name: executors[name] for name in a.executors.split(",")}
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray_start_s = time.perf_counter() - started
    results: dict[str, dict] = {}
    for round_number in range(a.rounds):  # alternating, so a slow minute of the machine does not land on one row
        for name, executor in executors.items():
            run_dir = folder / f"{name}-{round_number}"
            recipe = folder / f"{name}-{round_number}.yaml"
            recipe.write_text(yaml.safe_dump({
                "stage": "generate", "run_dir": str(run_dir), "seed": 0, "shard_size": a.shard_size,
                "inputs": {"prompts": str(prompts)}, "executor": executor,
                "generation": {"backend": "transformers", "model": str(model), "dtype": "float32", "n": 1,
                               "temperature": 1.0, "top_k": 50, "max_new_tokens": a.new_tokens, "batch_size": 64}}))
            started = time.perf_counter()
            manifest = run("generate", load_recipe(recipe))
            seconds = time.perf_counter() - started
            same = (run_dir / "completions.jsonl").read_bytes() == \
                (folder / "local-0" / "completions.jsonl").read_bytes()
            print(f"round {round_number}, {name}: {seconds:.1f} s, same bytes as local: {same}", flush=True)
            row = results.setdefault(name, {"seconds": [], "same_bytes_as_local": True, "executor": []})
            row["seconds"].append(round(seconds, 2))
            row["same_bytes_as_local"] &= same
            row["executor"].append(manifest["executor"])
    ray.shutdown()
    shutil.rmtree(folder)

    for row in results.values():
        row["best_s"] = min(row["seconds"])
    local = results["local"]["best_s"]
    ratios = {f"{name}/local": round(results[name]["best_s"] / local, 3) for name in results if name != "local"}
    overhead = results["ray-1"]["best_s"] / local - 1
    print(f"ray start (apart): {ray_start_s:.1f} s")
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}x the time")
    print(f"Ray overhead with 1 worker: {100 * overhead:+.1f}% of the in-process time, best of {a.rounds} rounds each "
          f"({100 * ((results['ray-1']['best_s'] + ray_start_s) / local - 1):+.1f}% counting Ray's start)")
    path = write_result(f"ray-executor-{a.rows}x{a.new_tokens}",
                        {"args": vars(a), "ray_start_s": round(ray_start_s, 2), "results": results, "ratios": ratios,
                         "overhead_1_worker": round(overhead, 4)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
