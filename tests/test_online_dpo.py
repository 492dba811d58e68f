"""Online DPO end to end on tiny models built here (a real reward model with a random head, the real
generator and TRL's DPOTrainer with the merging optimizer), its pairing rule, its recipe checks, a run
killed with SIGKILL mid-episode that resumes to the same policy as an uninterrupted run, and the same run
on 2 processes under `accelerate launch` (gloo): DDP, FSDP2, and one rank killed."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from alignment.checkpoint import init_checkpoint, reward_model_class
from alignment.data import write_rows
from alignment.recipe_loader import RecipeError
from alignment.reward_model import RewardModel
from alignment.stages import Run
from alignment.tokenizer import load_tokenizer
from alignment.train.online_dpo import SHARDED, OnlineDPO, best_and_worst, episode_prompts
from qwen2_align.demo.arithmetic import math_problems
from qwen2_align.stage_table import load_recipe, run

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/tiny/online-dpo.yaml"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
TWO_PROCESSES = {"ddp": [*LAUNCH, str(ROOT / "recipes/accelerate/cpu-2proc.yaml"), "-m", "qwen2_align.cli"],
                 "fsdp2": [*LAUNCH, str(ROOT / "tests/helpers/cpu-2proc-fsdp2.yaml"),
                           str(ROOT / "tests/helpers/fsdp2_on_cpu.py")],
                 "zero3": [*LAUNCH, str(ROOT / "tests/helpers/cpu-2proc-zero3.yaml"),
                           str(ROOT / "tests/helpers/zero3_on_cpu.py")]}


def test_best_and_worst_pairs_the_extremes_and_drops_ties():
    assert best_and_worst([0.1, 0.9, -0.3, 0.5], ["a", "b", "c", "d"], 0.0) == (1, 2)
    assert best_and_worst([0.5, 0.9, 0.9, 0.1, 0.1], list("abcde"), 0.0) == (1, 3)  # ties to the earlier sample
    assert best_and_worst([0.2, 0.2, 0.2], ["a", "b", "c"], 0.0) is None  # a tie teaches nothing
    assert best_and_worst([0.2, 0.6], ["a", "b"], 0.5) is None  # under the margin
    assert best_and_worst([0.2, 0.6], ["same ", "same"], 0.0) is None  # one text, two rewards: not a pair


def _models(root: Path, preset: str) -> dict:
    """base, SFT (= the starting policy and the reference), a reward model, and arithmetic prompts."""
    base = init_checkpoint(preset, root / "base", seed=0)
    sft = init_checkpoint(preset, root / "sft", seed=1, initializer_range=0.3)
    tokenizer = load_tokenizer(str(sft))
    reward = reward_model_class(sft).from_pretrained(sft, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    reward.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    write_rows(root / "prompts.jsonl", math_problems(10, seed=3) + [{"id": "bad"}])
    return {"root": root, "base": str(base), "sft": str(sft), "rm": str(root / "rm"),
            "prompts": str(root / "prompts.jsonl")}


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> dict:
    return _models(tmp_path_factory.mktemp("online"), "tiny")


@pytest.fixture(scope="module")
def whole(tiny_setup) -> Path:
    """An uninterrupted run in this process."""
    run_dir = tiny_setup["root"] / "whole"
    run("online-dpo", load_recipe(RECIPE, overrides=_overrides(tiny_setup, run_dir)))
    return run_dir


def _overrides(setup: dict, run_dir: Path) -> list[str]:
    return [f"run_dir={run_dir}", f"model={setup['sft']}", f"reference={setup['sft']}", f"reward_model={setup['rm']}",
            f"inputs.prompts={setup['prompts']}", f"merging.base_model={setup['base']}", "episodes=2",
            "prompts_per_episode=4", "samples_per_prompt=3", "eval_prompts=2", "generation.max_new_tokens=6",
            "generation.temperature=1.0", "training.per_device_train_batch_size=2",
            "training.gradient_accumulation_steps=2", "training.learning_rate=1e-3",
            "merging.reserve_rate=0.5", "merging.alpha=0.01", "dtype=float32", "verifier=none",
            "min_reward_margin=0.0",
            # Adam's first step is lr * sign(g): where g is rounding noise (a sum in another order on 2 processes)
            # the sign is a coin; an eps above that noise makes the step continuous in g.
            "training.adam_epsilon=1e-3"]


def test_episode_prompts_are_a_seeded_draw_without_repeats():
    recipe = load_recipe(ROOT / "recipes/tiny/online-dpo.yaml", overrides=["prompts_per_episode=5"])
    rows = [{"id": str(i)} for i in range(8)]
    first = episode_prompts(rows, recipe, 1)
    assert len({r["id"] for r in first}) == 5 and first == episode_prompts(rows, recipe, 1)
    assert first != episode_prompts(rows, recipe, 2)
    assert len(episode_prompts(rows[:3], recipe, 1)) == 3


def test_recipe_checks_name_the_field(tmp_path):
    data = yaml.safe_load((ROOT / "recipes/tiny/online-dpo.yaml").read_text())
    path = tmp_path / "online-dpo.yaml"
    for change, expected in (({"samples_per_prompt": 1}, "samples_per_prompt: must be >= 2"),
                             ({"generation": {"backend": "openai"}}, "generation.backend: online DPO samples"),
                             ({"merging": {"method": "onties"}}, "merging.base_model: required with method"),
                             ({"merging": {"method": "ondare", "base_model": "b", "reserve_rate": 0}},
                              "merging.reserve_rate: must be in"),
                             ({"lora": {"r": 4}}, "merging.method: the merging optimizers merge whole weights")):
        path.write_text(yaml.safe_dump(data | change))
        with pytest.raises(RecipeError, match=expected) as e:
            load_recipe(path)
        assert "\n" not in str(e.value)


def test_online_dpo_runs_episodes_and_a_killed_run_resumes_to_the_same_policy(tiny_setup, whole):
    root = tiny_setup["root"]
    manifest = json.loads((whole / "manifest.json").read_text())
    assert manifest["counts"] == {"prompts_in": 11, "quarantined": 1, "train_prompts": 8, "eval_prompts": 2}
    start = json.loads((whole / "episode-000/metrics.json").read_text())
    assert start["kl_to_reference"] == 0.0  # the starting policy is the reference
    for episode in (1, 2):
        metrics = json.loads((whole / f"episode-{episode:03d}/metrics.json").read_text())
        samples = [json.loads(line) for line in (whole / f"episode-{episode:03d}/samples.jsonl").open()]
        pairs = [json.loads(line) for line in (whole / f"episode-{episode:03d}/pairs.jsonl").open()]
        assert len(samples) == 4 and all(len(s["responses"]) == len(s["rewards"]) == 3 for s in samples)
        assert metrics["pairs_kept"] == len(pairs) > 0 and metrics["pairs_kept"] + metrics["pairs_dropped"] == 4
        for pair in pairs:  # the best and the worst of the prompt's samples
            sample = next(s for s in samples if pair["id"] == f"{s['id']}-e{episode}")
            assert pair["meta"]["reward_chosen"] == max(sample["rewards"])
            assert pair["meta"]["reward_rejected"] == min(sample["rewards"])
        assert metrics["optimizer"] == "OnDAREAdamW" and metrics["train_steps"] == 1
        assert metrics["kl_to_reference"] != 0.0  # the policy moved
    assert not (whole / "episode-001/model").exists() and (whole / "episode-002/model").exists()
    assert (whole / "model.safetensors").read_bytes() == (whole / "episode-002/model/model.safetensors").read_bytes()
    assert (whole / "curves.png").exists()

    killed = root / "killed"
    command = [sys.executable, "-m", "qwen2_align.cli", "online-dpo", "--recipe", str(RECIPE)]
    command += [arg for o in _overrides(tiny_setup, killed) for arg in ("--set", o)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "episode-002/samples.jsonl").exists() and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)  # episode 2 sampled, its training under way
    process.wait()
    assert not (killed / "episode-002/metrics.json").exists() and not (killed / "manifest.json").exists()
    run("online-dpo", load_recipe(ROOT / "recipes/tiny/online-dpo.yaml", overrides=_overrides(tiny_setup, killed)))
    assert (killed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    for episode in (1, 2):
        timing = ("generation_tokens_per_s", "train_tokens_per_s", "trainer_startup_s")
        ours, theirs = (json.loads((d / f"episode-{episode:03d}/metrics.json").read_text()) for d in (killed, whole))
        untimed = lambda metrics: {k: v for k, v in metrics.items() if k not in timing}  # noqa: E731
        assert untimed(ours) == untimed(theirs)


def test_the_verifier_decides_and_the_reward_model_orders_within_a_verdict(tiny_setup, tmp_path):
    """reward = (final answer == meta.answer) + sigmoid(RM score) / 2; prompts without an answer are quarantined."""
    prompts = tmp_path / "prompts.jsonl"
    rows = math_problems(4, seed=5)
    write_rows(prompts, rows + [{"id": "no-answer", "messages": [{"role": "user", "content": "Hi"}]}])
    overrides = _overrides(tiny_setup, tmp_path / "run") + [f"inputs.prompts={prompts}", "verifier=math",
                                                             "eval_prompts=1"]
    recipe = load_recipe(RECIPE, overrides=overrides)
    online = OnlineDPO(recipe, Run.start("online-dpo", recipe, ["prompts"]))
    assert online.counts["quarantined"] == 1 and len(online.train_rows) + len(online.eval_rows) == 4
    row = rows[0]
    answer = int(row["meta"]["answer"])
    texts = [f"The sum is {answer}.", f"It is {answer + 1}.", f"{answer} or maybe {answer - 1}", "no number"]
    rewards = online.rewards([row] * 4, texts)
    scores = RewardModel(tiny_setup["rm"])([row["messages"] + [{"role": "assistant", "content": t}] for t in texts])
    assert [int(r) for r in rewards] == [1, 0, 0, 0]
    assert rewards == pytest.approx([v + 0.5 / (1 + math.exp(-s)) for v, s in zip((1, 0, 0, 0), scores)])

    verifier_only = load_recipe(RECIPE, overrides=overrides + ["reward_model=", f"run_dir={tmp_path / 'v'}"])
    alone = OnlineDPO(verifier_only, Run.start("online-dpo", verifier_only, ["prompts"]))
    assert alone.scorer is None and alone.rewards([row] * 4, texts) == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(RecipeError, match="reward_model: required without a verifier"):
        load_recipe(RECIPE, overrides=overrides + ["reward_model=", "verifier=none"])


@pytest.mark.slow
def test_vllm_reads_the_next_policy_in_place_and_runs_online_dpo(tiny_setup, tmp_path):
    """The generator that sampled from one checkpoint answers like another after `load_weights` (prompts whose
    prefixes it has cached included), and online DPO runs its episodes on the vLLM backend."""
    from alignment.generation import GenerationSpec, make_generator

    other = str(init_checkpoint("tiny", tmp_path / "other", seed=2, initializer_range=0.5))  # clear argmaxes
    prompts = ["What is 2 + 3?", "Name a colour.", "What is 2 + 3?"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    helper = ROOT / "tests/helpers/vllm_reload.py"
    proc = subprocess.run([sys.executable, str(helper), tiny_setup["sft"], other, json.dumps(prompts)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    before, after = json.loads(lines[-1][len("RESULT "):])
    expected = []
    for model in (tiny_setup["sft"], other):
        spec = GenerationSpec(model=model, dtype="float32", temperature=0.0, max_new_tokens=12)
        with make_generator(spec) as generator:
            expected.append([c[0].text for c in generator.generate([[{"role": "user", "content": p}] for p in prompts],
                                                                   spec.sampling(seed=0))])
    assert before == expected[0] and after == expected[1] and before != after

    command = [sys.executable, "-m", "qwen2_align.cli", "online-dpo", "--recipe", str(RECIPE)]
    overrides = _overrides(tiny_setup, tmp_path / "vllm") + ["generation.backend=vllm", "generation.max_model_len=256",
                                                             "generation.cpu_kvcache_gib=1"]
    proc = subprocess.run(command + [arg for o in overrides for arg in ("--set", o)], capture_output=True, text=True,
                          env=env, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for episode in (1, 2):
        metrics = json.loads((tmp_path / f"vllm/episode-{episode:03d}/metrics.json").read_text())
        assert metrics["samples"] == 12 and metrics["generation_tokens"] > 0


def _two_processes(launcher: str, setup: dict, run_dir: Path, wait: bool = True, extra: tuple[str, ...] = ()):
    """The run of `_overrides` on 2 processes: a micro-batch of 2 pairs on each instead of 2 accumulated
    micro-batches in one (the recipe's SFT term is a mean over each micro-batch's tokens, as TRL has it, so
    that is what one step of 4 pairs equals)."""
    overrides = _overrides(setup, run_dir) + ["training.gradient_accumulation_steps=1", *extra]
    command = [*TWO_PROCESSES[launcher], "online-dpo", "--recipe", str(RECIPE)]
    command += [arg for o in overrides for arg in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


def _assert_same_run(one: Path, two: Path) -> float:
    """The same samples and pairs in every episode, and final weights within float32 rounding; returns the
    largest weight difference."""
    for episode in (1, 2):
        ours, theirs = (_lines(d / f"episode-{episode:03d}/samples.jsonl") for d in (one, two))
        assert [(s["id"], s["responses"]) for s in ours] == [(s["id"], s["responses"]) for s in theirs]
        for mine, other in zip(ours, theirs):  # scored in other batches: equal up to rounding
            assert mine["rewards"] == pytest.approx(other["rewards"], abs=1e-4)
        ours, theirs = (_lines(d / f"episode-{episode:03d}/pairs.jsonl") for d in (one, two))
        assert len(ours) == 4, "every prompt must give a pair for one process and two to share batches alike"
        assert [(p["id"], p["chosen"], p["rejected"]) for p in ours] == \
            [(p["id"], p["chosen"], p["rejected"]) for p in theirs]
    first, second = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert first.keys() == second.keys()
    largest = max((first[k] - second[k]).abs().max().item() for k in first)
    assert largest < 1e-5, largest
    metrics = [json.loads((d / "manifest.json").read_text())["metrics"] for d in (one, two)]
    for key in ("eval_reward_mean_end", "win_rate_vs_reference_end", "kl_to_reference_end"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], abs=1e-4), key
    return largest


def test_two_processes_ddp_form_the_pairs_and_weights_of_one(tiny_setup, whole):
    """Each of 2 processes samples and scores half the prompts; the pairs are one process's and DDP trains to
    its weights."""
    two = tiny_setup["root"] / "ddp"
    _two_processes("ddp", tiny_setup, two)
    _assert_same_run(whole, two)
    assert json.loads((two / "manifest.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_two_processes_fsdp2_form_the_pairs_and_weights_of_one(tmp_path):
    """FSDP2 (on an untied model, as the sharded recipes are): the merging optimizer draws each shard's
    entries as one process does, so the weights match too."""
    setup = _models(tmp_path, "tiny-untied")
    one, two = tmp_path / "one", tmp_path / "fsdp2"
    run("online-dpo", load_recipe(RECIPE, overrides=_overrides(setup, one)))
    out = _two_processes("fsdp2", setup, two)
    assert out.stderr.count("fsdp2_on_cpu: FSDP2 units:") >= 2, out.stderr[-4000:]  # each episode's policy sharded
    assert SHARDED in out.stdout  # and the models that are only evaluated
    _assert_same_run(one, two)


@pytest.mark.slow
def test_two_processes_zero3_form_the_pairs_and_weights_of_one(tmp_path):
    """DeepSpeed ZeRO-3 with TRL's AdamW (the merging optimizers refuse ZeRO-3's flat partitions, which lose the
    parameter names): the same pairs and weights as one process."""
    pytest.importorskip("deepspeed")
    setup = _models(tmp_path, "tiny-untied")
    one, two = tmp_path / "one", tmp_path / "zero3"
    run("online-dpo", load_recipe(RECIPE, overrides=_overrides(setup, one) + ["merging.method=none"]))
    out = _two_processes("zero3", setup, two, extra=("merging.method=none",))
    assert out.stderr.count("zero3_on_cpu: ZeRO stage 3") >= 2, out.stderr[-4000:]
    assert SHARDED in out.stdout
    _assert_same_run(one, two)
    refused = subprocess.run([*TWO_PROCESSES["zero3"], "online-dpo", "--recipe", str(RECIPE), *[
        arg for o in _overrides(setup, tmp_path / "refused") for arg in ("--set", o)]], cwd=ROOT, capture_output=True,
        text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert refused.returncode != 0 and "DeepSpeed ZeRO-3's flat partitions" in refused.stderr


def _worker(launcher_pid: int, rank: int) -> int | None:
    """The pid of the launched worker with RANK=`rank`, a descendant of the launcher."""
    children = {int(p.name): int(p.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
                for p in Path("/proc").iterdir() if p.name.isdigit() and p.joinpath("stat").exists()}
    descendants, frontier = set(), {launcher_pid}
    while frontier:
        frontier = {pid for pid, parent in children.items() if parent in frontier} - descendants
        descendants |= frontier
    for pid in descendants:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    return None


@pytest.mark.slow
def test_two_processes_one_rank_killed_mid_episode_resume_to_the_uninterrupted_weights(tiny_setup, tmp_path):
    """Rank 1 killed with SIGKILL once episode 2 is sampled: the launcher ends the run, and the rerun finishes with
    the weights of an uninterrupted 2-process run."""
    uninterrupted = tiny_setup["root"] / "ddp"
    if not (uninterrupted / "manifest.json").exists():
        _two_processes("ddp", tiny_setup, uninterrupted)
    killed = tmp_path / "killed"
    launcher = _two_processes("ddp", tiny_setup, killed, wait=False)
    deadline = time.monotonic() + 600
    while not (killed / "episode-002/samples.jsonl").exists() and time.monotonic() < deadline:
        assert launcher.poll() is None, "the run ended before it could be killed"
        time.sleep(0.1)
    worker = _worker(launcher.pid, 1)
    assert worker is not None
    os.kill(worker, signal.SIGKILL)
    assert launcher.wait(timeout=300) != 0
    assert not (killed / "episode-002/metrics.json").exists() and not (killed / "manifest.json").exists()
    _two_processes("ddp", tiny_setup, killed)
    assert (killed / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()


def test_plan_counts_the_bytes_the_episode_trainer_holds(tiny_setup, tmp_path):
    """`plan`'s trainer entries for one GPU are the bytes online DPO's trainer holds after a step on the tiny
    model with a bf16 recipe: float32 weights (the master copy), float32 Adam moments, the reference in bf16."""
    from alignment.data import trl_dataset
    from alignment.train.common import load_frozen_model, load_trained_model
    from alignment.train.online_dpo import MergingDPOTrainer
    from qwen2_align.plan import memory_plan, model_config

    recipe = load_recipe(RECIPE, overrides=_overrides(tiny_setup, tmp_path) + ["dtype=bfloat16", "merging.method=none",
                                                                              "training.max_steps=1"])
    reply = [{"role": "assistant", "content": "It is 5."}], [{"role": "assistant", "content": "no"}]
    pairs = [{"id": str(i), "prompt": row["messages"], "chosen": reply[0], "rejected": reply[1]}
             for i, row in enumerate(math_problems(4, seed=1))]
    trainer = MergingDPOTrainer(model=load_trained_model(recipe, recipe.model),
                                ref_model=load_frozen_model(recipe.reference, recipe), args=recipe.args,
                                train_dataset=trl_dataset(pairs, "preference"),
                                processing_class=load_tokenizer(recipe.model), merging=recipe.merging,
                                tau_reference=recipe.reference)
    trainer.train()

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    moments = [t for state in trainer.optimizer.state.values() for k, t in state.items() if k in ("exp_avg", "exp_avg_sq")]
    plan = memory_plan(model_config(recipe.model), 1, 2, 512, True, reference_model=True)
    assert nbytes(trainer.model.parameters()) == plan["weights (fp32 master, sharded)"]
    assert nbytes(moments) == plan["Adam moments (fp32, sharded)"]
    assert nbytes(trainer.ref_model.parameters()) == plan["reference model (bf16, sharded)"]
