"""Online DPO: each episode samples `samples_per_prompt` responses per prompt from the current policy, the
reward (the reward model's score, a verifier's verdict on the final answer, or both: recipe `verifier`) rates
them, the best and the worst become a pair (a pair whose reward margin is not above
`min_reward_margin` is dropped: a tie teaches nothing), and DPO trains on the pairs with TRL's DPOTrainer
and the recipe's optimizer: AdamW, or an online merging optimizer (`merging.method`: ondare / onties,
alignment.optim) that mixes each update with tau = reference - base.

    run_dir/episode-000/metrics.json   the starting policy evaluated on the held-out prompts
    run_dir/episode-001/samples.jsonl  prompts, responses and rewards (generation.json: their token count and rate)
    run_dir/episode-001/pairs.jsonl    best vs worst
    run_dir/episode-001/model/         the policy after the episode (only the latest one is kept)
    run_dir/episode-001/metrics.json   written last: the episode is done and is never redone
    run_dir/                           the final policy, metrics.json, curves.png, manifest.json

Under `accelerate launch` (DDP, FSDP2) every process runs the loop: the episode's prompts are split over the
processes, each samples and scores its share, and the gathered samples, hence the pairs, are those of one
process (each prompt is sampled with its own seed, `prompt_seeds`). The main process writes the episode's
files; DPO trains on the pairs as TRL shards them; the held-out evaluation is split the same way, each
process loading the whole models it scores with on its own device.

After each episode the policy is evaluated on held-out prompts (`eval_prompts` of them): the mean reward of
one sample each (with a verifier, also the share that is correct), the win rate against the reference model's
samples judged by the reward (ties count half), and KL(policy || reference) estimated on the policy's samples
as the mean of log p_policy(y) - log p_reference(y). The transformers backend loads each episode's policy from
its saved folder, so a resumed run samples exactly what an uninterrupted one does; vLLM keeps one engine and
receives the new weights in place (`VLLMGenerator.load_weights`; restarted on vLLM's CPU build).
"""

from __future__ import annotations

import gc
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import PartialState

from reward.verifiers import answer_is_correct

from ..atomic import atomic_write_text
from ..checkpoint import DTYPES, causal_lm_class, checkpoint_tensors, reward_model_class
from ..data import DataError, load_jsonl, read_rows, to_jsonl, trl_dataset
from ..generation import (Completion, GenerationSpec, PolicyServerGenerator, VLLMGenerator, make_generator,
                          policy_tag)
from ..optim import MERGING_OPTIMIZERS
from ..reward_model import RewardModel
from ..stages import Run, Stage, StageError
from .common import (fit, in_shares, load_frozen_model, load_sharded_frozen, load_trained_model, load_trainer_tokenizer,
                     plot_history, save_model, shards_frozen_models, unhashed_datasets, whole_models, whole_parameters)
from .dpo import DPORecipe, Qwen2DPOTrainer, completion_logprobs


@dataclass
class MergingSpec:
    """The online merging optimizer (Lu et al. 2024, alignment.optim) that limits the alignment tax:
    tau = reference (the SFT model) - base_model is mixed into every update."""

    method: Literal["ondare", "onties", "none"] = "ondare"  # none: TRL's AdamW
    base_model: str | None = None  # theta_b; the pre-trained model before SFT
    reserve_rate: float = 0.01  # p: the share of entries F_p keeps
    alpha: float = 1e-6  # tau's weight in each merged update
    rescale: bool = False  # kept entries times 1/p (the public code) or not (the paper)
    tau_mask: Literal["step", "fixed"] = "step"  # OnDARE: draw tau's mask every step (paper) or once (sparse)
    merge_every: int = 1  # merge on every k-th step, plain AdamW on the others

    def __post_init__(self) -> None:
        if self.method != "none" and not self.base_model:
            raise ValueError(f"base_model: required with method {self.method!r} (tau = reference - base_model)")
        if not 0 < self.reserve_rate <= 1:
            raise ValueError(f"reserve_rate: must be in (0, 1], got {self.reserve_rate}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha: must be in [0, 1], got {self.alpha}")
        if self.merge_every < 1:
            raise ValueError(f"merge_every: must be >= 1, got {self.merge_every}")


@dataclass
class OnlineDPORecipe(DPORecipe):
    """inputs.prompts -> episodes of: samples from the policy, best vs worst by the reward, DPO on the pairs
    (alignment.train.online_dpo). `reference` (default: `model`) is DPO's reference and tau's SFT end.

    The reward is the reward model's score, or with `verifier: math` whether the response's final answer equals
    the prompt row's `meta.answer` (1 or 0); with both, correctness decides and the reward model orders the
    responses within each verdict (reward = verdict + sigmoid(score) / 2)."""

    reward_model: str = ""  # a reward-model run dir that scores samples
    verifier: Literal["none", "math"] = "none"  # math: the final answer checked against meta.answer
    prompts_per_episode: int = 64
    samples_per_prompt: int = 4
    episodes: int = 1
    min_reward_margin: float = 0.0  # pairs whose best - worst reward is not above it are dropped
    reference_policy: Literal["initial", "previous"] = "initial"  # DPO's reference: `reference`, or last episode's
    eval_prompts: int = 16  # held out from inputs.prompts: reward, win rate and KL after every episode
    generation: GenerationSpec = field(default_factory=GenerationSpec)  # how the policy samples (model: unused)
    merging: MergingSpec = field(default_factory=MergingSpec)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.reward_model and self.verifier == "none":
            raise ValueError("reward_model: required without a verifier (a reward-model run dir, e.g. runs/tiny/rm)")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt: must be >= 2 (best and worst of them), got {self.samples_per_prompt}")
        for name in ("prompts_per_episode", "episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.eval_prompts < 0:
            raise ValueError(f"eval_prompts: must be >= 0, got {self.eval_prompts}")
        if self.generation.backend == "openai":
            raise ValueError("generation.backend: online DPO samples from the policy it trains: transformers or vllm")
        if self.lora is not None and self.generation.backend == "vllm-server":
            raise ValueError("generation.backend: vllm-server is sent whole weights; with lora use vllm or transformers")
        if self.lora is not None and self.merging.method != "none":
            raise ValueError("merging.method: the merging optimizers merge whole weights; with lora use none")


class MergingDPOTrainer(Qwen2DPOTrainer):
    """Our DPO trainer whose optimizer is the recipe's online merging optimizer; the parameter groups
    (weight decay on all but biases and norms) are the Trainer's own."""

    def __init__(self, *args, merging: MergingSpec, tau_reference: str, **kwargs):
        self.merging, self.tau_reference = merging, tau_reference
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.merging.method == "none":
            return super().create_optimizer(model)
        if self.is_deepspeed_enabled:
            raise StageError(f"merging.method: {self.merging.method} merges each parameter with its slice of tau by "
                             "name, which DeepSpeed ZeRO-3's flat partitions do not keep; use FSDP2 "
                             "(recipes/accelerate/fsdp2.yaml) or merging.method: none")
        if self.optimizer is None:
            model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(model))
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [{"params": [(n, p) for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                      {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0}]
            merging = self.merging
            self.optimizer = MERGING_OPTIMIZERS[merging.method](
                [g for g in groups if g["params"]], merging.base_model, self.tau_reference,
                lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon, reserve_rate=merging.reserve_rate, alpha=merging.alpha,
                rescale=merging.rescale, merge_every=merging.merge_every, tau_mask=merging.tau_mask,
                seed=self.args.seed)
        return self.optimizer


def best_and_worst(rewards: list[float], texts: list[str], min_margin: float) -> tuple[int, int] | None:
    """Indices of the highest- and lowest-rewarded responses (ties to the earlier sample), or None when the
    margin is not above `min_margin` or both say the same."""
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    if rewards[best] - rewards[worst] <= min_margin or texts[best].strip() == texts[worst].strip():
        return None
    return best, worst


def episode_prompts(prompts: list[dict], recipe: OnlineDPORecipe, episode: int) -> list[dict]:
    """The episode's prompts: a seeded draw without repeats (every prompt when there are fewer)."""
    count = min(recipe.prompts_per_episode, len(prompts))
    return random.Random(f"{recipe.seed}:{episode}").sample(prompts, count)


def prompt_seeds(rows: list[dict], *key: object) -> list[int]:
    """A sampling seed per prompt row, from `key` and the row's id: what a prompt samples does not depend on
    which process samples it or with which other prompts."""
    return [random.Random(":".join(map(str, (*key, row["id"])))).getrandbits(63) for row in rows]


def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


class PolicySampler:
    """Samples from the current policy: transformers loads the episode's saved policy; vLLM keeps its engine,
    asleep while the trainer runs, and receives the new weights in place; a `serve-policy` server
    (`vllm-server`) holds the policy on GPUs of its own and is sent the trainer's weights after each episode."""

    def __init__(self, recipe: OnlineDPORecipe, policy: str, state: PartialState):
        self.recipe, self.policy, self.state, self.generator = recipe, policy, state, None
        self.released = False
        self.timings: dict[str, float] = {}  # this episode's weight sync and engine sleep, for its metrics
        if recipe.generation.backend == "vllm-server":
            self.generator = PolicyServerGenerator(recipe.generation)

    @property
    def serving(self) -> bool:
        return isinstance(self.generator, PolicyServerGenerator)

    def use(self, policy: str) -> None:
        if self.serving:  # the main process sends the checkpoint if the server holds another policy
            tag = policy_tag(policy)
            if self.state.is_main_process and self.generator.policy() != tag:
                self.generator.send_weights(*checkpoint_tensors(policy), tag, self.state.device)
            self.state.wait_for_everyone()
            self.policy = policy
            return
        if policy == self.policy and not self.released:
            return
        if isinstance(self.generator, VLLMGenerator):  # in place on a GPU, a restart on vLLM's CPU build
            start = time.perf_counter()
            self.generator.load_weights(policy)
            self.timings["weight_sync_s"] = time.perf_counter() - start
        elif self.generator is not None:
            self.generator.close()
            self.generator = None
        self.policy, self.released = policy, False

    def push(self, trainer, policy: str) -> None:
        """The trainer's weights, just saved to `policy`, to the server (every process gathers, the main one
        sends): the server's engine is not reloaded from a checkpoint. The sync's time and size go to `timings`."""
        layout, tensors = whole_parameters(trainer)
        if not self.state.is_main_process:
            for _ in tensors:  # this process's part of each gather
                pass
        else:
            sync = self.generator.send_weights(layout, tensors, policy_tag(policy), self.state.device)
            self.timings |= {"weight_sync_s": sync["seconds"], "weight_sync_gib": sync["bytes"] / 2**30,
                             "weight_sync_restart_s": sync["restart_seconds"]}
        self.state.wait_for_everyone()
        self.policy = policy

    def take_timings(self) -> dict[str, float]:
        timings, self.timings = self.timings, {}
        return timings

    def release(self) -> None:
        """Free the generator's memory for the trainer: a vLLM engine sleeps, a transformers model is dropped,
        a server keeps its own GPUs."""
        if self.serving:
            return
        if isinstance(self.generator, VLLMGenerator):
            start = time.perf_counter()
            self.generator.sleep()
            self.timings["engine_sleep_s"] = time.perf_counter() - start
        else:
            self.close()
        self.released = True

    def sample(self, prompts: list[list[dict]], n: int, seeds: list[int]) -> tuple[list[list[Completion]], float]:
        """n completions per prompt, each prompt sampled with its own seed, and the seconds generation took."""
        if not prompts:
            return [], 0.0
        if self.generator is None:
            with whole_models():
                self.generator = make_generator(replace(self.recipe.generation, model=self.policy))
        start = time.perf_counter()
        completions = self.generator.generate(prompts, self.recipe.generation.sampling(n=n, seeds=seeds))
        return completions, time.perf_counter() - start

    def close(self) -> None:
        if self.generator is not None and not self.serving:  # the server outlives the run
            self.generator.close()
            self.generator = None


class OnlineDPO:
    """One run: episodes of sample -> score -> pair -> DPO, each finished episode kept on disk."""

    def __init__(self, recipe: OnlineDPORecipe, run: Run):
        self.recipe, self.run, self.run_dir = recipe, run, run.run_dir
        self.state = PartialState()  # the processes of `accelerate launch`, or this one alone
        self.reference = recipe.reference or recipe.model  # the SFT model: DPO's reference and tau's end
        try:
            read = read_rows(recipe.inputs["prompts"], "prompt")
        except DataError as e:
            raise StageError(f"online-dpo: {e}") from None
        rows, quarantined = read.rows, [q.record() for q in read.quarantined]
        if recipe.verifier != "none":  # a prompt the verifier cannot check has no reward
            quarantined += [{"reason": "meta.answer: the verifier needs a reference answer", "origin": r["id"],
                             "row": r} for r in rows if not str(r.get("meta", {}).get("answer", "")).strip()]
            rows = [r for r in rows if str(r.get("meta", {}).get("answer", "")).strip()]
        held = set(random.Random(recipe.seed).sample(range(len(rows)), min(recipe.eval_prompts, len(rows) - 1)))
        self.eval_rows = [r for i, r in enumerate(rows) if i in held]
        self.train_rows = [r for i, r in enumerate(rows) if i not in held]
        if self.state.is_main_process:
            atomic_write_text(self.run_dir / "quarantine.jsonl", to_jsonl(quarantined))
        if not self.train_rows:
            raise StageError("online-dpo: inputs.prompts: no valid prompt rows to train on "
                             f"({len(quarantined)} quarantined, see {self.run_dir / 'quarantine.jsonl'})")
        self.counts = {"prompts_in": read.read, "quarantined": len(quarantined),
                       "train_prompts": len(self.train_rows), "eval_prompts": len(self.eval_rows)}
        self.tokenizer = load_trainer_tokenizer(recipe.model)
        self.sharded = shards_frozen_models()  # the reward model and the held-out KL's models, as the trainer
        if self.sharded:
            self.state.print(f"online-dpo: {SHARDED} over {self.state.num_processes} processes (FSDP2, a unit per "
                             "decoder layer)")
        self.scorer = RewardModel(recipe.reward_model, model=self.frozen(recipe.reward_model, reward=True)) \
            if recipe.reward_model else None
        self.reference_eval_rewards: list[float] | None = None

    def frozen(self, path: str, reward: bool = False) -> torch.nn.Module:
        """A model that is only evaluated, in the compute dtype: whole on this process's device, or sharded over
        the processes when the trainer is (`load_sharded_frozen`)."""
        model_class = reward_model_class(path) if reward else causal_lm_class(path)
        if self.sharded:
            return load_sharded_frozen(path, model_class, DTYPES[self.recipe.compute_precision()], self.state.device)
        with whole_models():
            return load_frozen_model(path, self.recipe, self.state.device, model_class)

    def write(self, path: Path, text: str) -> None:
        """The main process writes the run's files."""
        if self.state.is_main_process:
            atomic_write_text(path, text)

    def episode_dir(self, episode: int) -> Path:
        return self.run_dir / f"episode-{episode:03d}"

    def policy_after(self, episode: int) -> str:
        return self.recipe.model if episode == 0 else str(self.episode_dir(episode) / "model")

    def finished(self, episode: int) -> dict | None:
        path = self.episode_dir(episode) / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else None

    def rewards(self, rows: list[dict], texts: list[str]) -> list[float]:
        """The reward of each response to its prompt row (the recipe's docstring says how it is made)."""
        scores = self.scorer([r["messages"] + _reply(t) for r, t in zip(rows, texts)]) if self.scorer else None
        if self.recipe.verifier == "none":
            return scores
        verdicts = [float(answer_is_correct(str(r["meta"]["answer"]), t)) for r, t in zip(rows, texts)]
        if scores is None:
            return verdicts
        return [v + 0.5 / (1.0 + math.exp(-s)) for v, s in zip(verdicts, scores)]

    def sample_and_score(self, sampler: PolicySampler, rows: list[dict], n: int, key: tuple) -> list[dict]:
        """n responses to each row's prompt with their rewards, split over the processes: one
        {"responses", "rewards", "tokens", "seconds"} per row (seconds: its process's generation time)."""
        seeds = prompt_seeds(rows, *key)

        def share(items: list[tuple[dict, int]]) -> list[dict]:
            completions, seconds = sampler.sample([r["messages"] for r, _ in items], n, [s for _, s in items])
            texts = [c.text for cs in completions for c in cs]
            rewards = iter(self.rewards([r for r, _ in items for _ in range(n)], texts))
            return [{"responses": [c.text for c in cs], "rewards": [next(rewards) for _ in cs],
                     "tokens": sum(c.num_tokens for c in cs), "seconds": seconds} for cs in completions]

        return in_shares(self.state, list(zip(rows, seeds)), share, equal_shares=self.sharded)

    def reference_rewards(self) -> list[float]:
        """The rewards of one sample of the reference model per held-out prompt: sampled and scored once, kept
        with the samples in the run dir (every evaluation compares against them)."""
        path = self.run_dir / "reference_samples.jsonl"
        if self.reference_eval_rewards is None and path.exists():
            self.reference_eval_rewards = [r["reward"] for r in load_jsonl(path)]
        if self.reference_eval_rewards is None:
            sampler = PolicySampler(replace(self.recipe, generation=replace(self.recipe.generation,
                                                                            backend="transformers")), self.reference,
                                    self.state)
            try:
                scored = self.sample_and_score(sampler, self.eval_rows, 1, (self.recipe.seed, "eval"))
            finally:
                sampler.close()
            self.write(path, to_jsonl([{"id": r["id"], "response": s["responses"][0], "reward": s["rewards"][0]}
                                       for r, s in zip(self.eval_rows, scored)]))
            self.reference_eval_rewards = [s["rewards"][0] for s in scored]
        return self.reference_eval_rewards

    def evaluate(self, sampler: PolicySampler, policy: str) -> dict[str, float]:
        """Mean reward, win rate against the reference's samples, and KL to the reference, on held-out prompts."""
        if not self.eval_rows:
            return {}
        sampler.use(policy)
        scored = self.sample_and_score(sampler, self.eval_rows, 1, (self.recipe.seed, "eval"))
        rewards = [s["rewards"][0] for s in scored]
        reference_rewards = self.reference_rewards()
        wins = [1.0 if r > s else 0.5 if r == s else 0.0 for r, s in zip(rewards, reference_rewards)]
        pairs = [(r["messages"], _reply(s["responses"][0])) for r, s in zip(self.eval_rows, scored)]

        def logprobs(path: str) -> list[float]:
            def share(items: list[tuple[list[dict], list[dict]]]) -> list[float]:
                model = self.frozen(path)
                return completion_logprobs(model, self.tokenizer, [p for p, _ in items], [c for _, c in items])
            return in_shares(self.state, pairs, share, equal_shares=self.sharded)

        policy_logp, reference_logp = logprobs(policy), logprobs(self.reference)
        accuracy = {} if self.recipe.verifier == "none" else {
            "eval_accuracy": sum(r >= 1.0 for r in rewards) / len(rewards)}  # the verdict: the integer part
        return {"eval_reward_mean": sum(rewards) / len(rewards), **accuracy,
                "win_rate_vs_reference": sum(wins) / len(wins),
                "kl_to_reference": sum(p - q for p, q in zip(policy_logp, reference_logp)) / len(pairs)}

    def sample_and_pair(self, sampler: PolicySampler, episode: int) -> tuple[list[dict], list[dict], dict]:
        """The episode's samples with their rewards (kept on disk, so a resumed episode does not sample
        again) and the best-vs-worst pairs made from them."""
        recipe, directory = self.recipe, self.episode_dir(episode)
        path, timing_path = directory / "samples.jsonl", directory / "generation.json"
        if path.exists():
            samples = load_jsonl(path)
            timing = json.loads(timing_path.read_text())
        else:
            rows = episode_prompts(self.train_rows, recipe, episode)
            scored = self.sample_and_score(sampler, rows, recipe.samples_per_prompt, (recipe.seed, episode))
            samples = [{"id": r["id"], "prompt": r["messages"], "responses": s["responses"], "rewards": s["rewards"]}
                       for r, s in zip(rows, scored)]
            tokens, seconds = sum(s["tokens"] for s in scored), max(s["seconds"] for s in scored)
            timing = {"generation_tokens": tokens, "generation_tokens_per_s": tokens / seconds if seconds else 0.0}
            self.write(timing_path, json.dumps(timing) + "\n")
            self.write(path, to_jsonl(samples))
        pairs = []
        for sample in samples:
            chosen = best_and_worst(sample["rewards"], sample["responses"], recipe.min_reward_margin)
            if chosen is not None:
                best, worst = chosen
                pairs.append({"id": f"{sample['id']}-e{episode}", "prompt": sample["prompt"],
                              "chosen": _reply(sample["responses"][best]),
                              "rejected": _reply(sample["responses"][worst]), "source": "online-dpo",
                              "meta": {"episode": episode, "reward_chosen": sample["rewards"][best],
                                       "reward_rejected": sample["rewards"][worst]}})
        self.write(directory / "pairs.jsonl", to_jsonl(pairs))
        rewards = [r for s in samples for r in s["rewards"]]
        margins = [p["meta"]["reward_chosen"] - p["meta"]["reward_rejected"] for p in pairs]
        accuracy = {} if recipe.verifier == "none" else {  # the verdict is the reward's integer part
            "sample_accuracy": sum(r >= 1.0 for r in rewards) / len(rewards)}
        stats = {"samples": len(rewards), "sample_reward_mean": sum(rewards) / len(rewards), **accuracy,
                 "sample_reward_max": max(rewards), "pairs_kept": len(pairs),
                 "pairs_dropped": len(samples) - len(pairs),
                 "pair_margin_mean": sum(margins) / len(margins) if margins else 0.0, **timing}
        return samples, pairs, stats

    def train_episode(self, episode: int, pairs: list[dict], sampler: PolicySampler) -> dict[str, Any]:
        """DPO on the episode's pairs, from the previous policy; the policy is saved to episode-NNN/model (and
        sent to the sampler's server, if it has one)."""
        started = time.perf_counter()
        recipe, directory = self.recipe, self.episode_dir(episode)
        reference = self.reference if recipe.reference_policy == "initial" else self.policy_after(episode - 1)
        step = replace(recipe, model=self.policy_after(episode - 1), reference=reference,
                       run_dir=str(directory / "trainer"))
        with whole_models():  # under FSDP2 TRL shards the reference as each process loaded it
            reference_model = load_frozen_model(reference, step)
        model = load_trained_model(step, step.model)
        with unhashed_datasets():
            trainer = MergingDPOTrainer(
                model=model, ref_model=reference_model, args=step.args, train_dataset=trl_dataset(pairs, "preference"),
                processing_class=self.tokenizer, merging=recipe.merging, tau_reference=self.reference)
        metrics = fit(trainer, step, started)
        save_model(trainer, step, directory / "model", step.model)
        if sampler.serving:
            sampler.push(trainer, str(directory / "model"))
        if self.state.is_main_process:  # checkpoints of a finished episode
            shutil.rmtree(directory / "trainer", ignore_errors=True)
        texts = [self.tokenizer.apply_chat_template(p["prompt"] + p[side], tokenize=False)
                 for p in pairs for side in ("chosen", "rejected")]
        tokens = sum(map(len, self.tokenizer(texts, add_special_tokens=False)["input_ids"])) \
            * trainer.args.num_train_epochs
        runtime = metrics["train_runtime_s"]
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's wrapper
        result = {"optimizer": type(optimizer).__name__, "dpo_loss_first": losses[0] if losses else None,
                  "dpo_loss_last": losses[-1] if losses else None, "train_steps": trainer.state.global_step,
                  "train_tokens_per_s": tokens / runtime if runtime else 0.0,
                  "trainer_startup_s": metrics["startup_s"]}
        del trainer, optimizer  # the policy, reference and optimizer state leave the GPU before sampling resumes
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result

    def forget_old_policies(self, latest: int) -> None:
        """Only the latest finished episode's policy is needed to go on (and is the result)."""
        if not self.state.is_main_process:
            return
        for episode in range(1, latest):
            shutil.rmtree(self.episode_dir(episode) / "model", ignore_errors=True)

    def run_episodes(self) -> list[dict]:
        recipe = self.recipe
        sampler = PolicySampler(recipe, self.policy_after(0), self.state)
        history = []
        try:
            for episode in range(recipe.episodes + 1):
                done = self.finished(episode)
                if done is None:
                    directory = self.episode_dir(episode)
                    directory.mkdir(parents=True, exist_ok=True)
                    metrics: dict[str, Any] = {"episode": episode}
                    if episode > 0:
                        sampler.use(self.policy_after(episode - 1))
                        _, pairs, stats = self.sample_and_pair(sampler, episode)
                        metrics |= stats
                        if pairs:
                            sampler.release()
                            metrics |= self.train_episode(episode, pairs, sampler)
                        elif self.state.is_main_process:  # nothing to learn from: the policy goes on unchanged
                            shutil.copytree(self.policy_after(episode - 1), directory / "model", dirs_exist_ok=True)
                        self.state.wait_for_everyone()
                    metrics |= self.evaluate(sampler, self.policy_after(episode)) | sampler.take_timings()
                    self.write(directory / "metrics.json", json.dumps(metrics, indent=2) + "\n")
                    self.state.wait_for_everyone()  # the episode is done on every process before any moves on
                    self.state.print(f"online-dpo: episode {episode}/{recipe.episodes}: "
                          + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                      if isinstance(v, float) and k in SHOWN))
                    done = metrics
                self.forget_old_policies(episode)
                history.append(done)
        finally:
            sampler.close()
        return history

    def finish(self, history: list[dict]) -> dict:
        """The final policy, metrics, curves and manifest into the run dir (by the main process)."""
        if self.state.is_main_process:
            self.write_results(history)
        self.state.wait_for_everyone()
        return json.loads((self.run_dir / "manifest.json").read_text())

    def write_results(self, history: list[dict]) -> None:
        final = Path(self.policy_after(self.recipe.episodes))
        for file in final.iterdir():
            if file.is_file():
                shutil.copy2(file, self.run_dir / file.name)
        first, last = history[0], history[-1]
        metrics = {"episodes": self.recipe.episodes, "pairs_trained": sum(h.get("pairs_kept", 0) for h in history),
                   **{f"{k}_start": first[k] for k in SHOWN if k in first and k.startswith(("eval", "win", "kl"))},
                   **{f"{k}_end": last[k] for k in SHOWN if k in last and k.startswith(("eval", "win", "kl"))}}
        atomic_write_text(self.run_dir / "metrics.json", json.dumps({"metrics": metrics, "episodes": history},
                                                                      indent=2) + "\n")
        plot_history([{**h, "step": h["episode"]} for h in history], self.run_dir / "curves.png",
                     f"online-dpo: {self.run_dir} (x: episode)")
        self.run.finish(self.counts, metrics=metrics, processes=self.state.num_processes,
                        precision={"compute": self.recipe.compute_precision(), "weights": "float32"})


SHARDED = "the reward model and the held-out KL's models are sharded"
SHOWN = ("sample_reward_mean", "sample_accuracy", "pairs_kept", "pair_margin_mean", "eval_reward_mean", "eval_accuracy",
         "win_rate_vs_reference", "kl_to_reference", "weight_sync_s")


class OnlineDPOStage(Stage):
    """Online DPO on the shared run lifecycle; episodes, not one trainer, so it runs its own loop."""

    name = "online-dpo"
    recipe_class = OnlineDPORecipe

    def run(self) -> dict[str, Any]:
        run = Run.start(self.name, self.recipe, ["prompts"])
        if run.done:
            return run.done
        online = OnlineDPO(self.recipe, run)
        return online.finish(online.run_episodes())
