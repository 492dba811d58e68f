"""`qwen2-align plan`: parameters and memory per GPU for a trainer recipe, before renting the GPUs.

The estimate counts what the trainers allocate: trained weights kept in float32 (the master copy;
bf16 runs through autocast) with float32 gradients and Adam moments, 16 bytes per trained
parameter, fully sharded across the GPUs (FSDP FULL_SHARD; ZeRO-3 holds the same 16 bytes as bf16
weights and gradients plus an fp32 master copy); LoRA keeps the frozen base in bf16 and only the
adapters in float32. One or two decoder layers are gathered at a time in bf16, and activations
are counted per micro-batch of `per_device_train_batch_size` x `max_length` tokens: every layer's
saved tensors, or only the layer inputs under gradient checkpointing plus one layer recomputed.
The LM head costs one chunk of logits (our chunked loss), not the full [tokens, vocab] block.

Online DPO adds what each process holds outside the trainer, phase by phase (`online_dpo_phases`): the
reward model, resident throughout; while sampling, the policy's generator (a colocated vLLM engine claims
`gpu_memory_utilization` of the GPU; a transformers generator is the whole model; a `vllm-server` policy
holds nothing here, its own GPUs are planned apart), which sleeps or is dropped while the trainer steps; and
for the held-out KL, one model at a time beside the engine. On one GPU the reward and KL models are whole; on
several they are sharded as the trainer is, with one decoder layer gathered at a time. The peak is the
largest phase: the sharded parts shrink with more GPUs, the engine's share and a whole generator do not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoConfig

from alignment.model import PRESETS, Qwen2Config, preset_config
from alignment.model.loss import CHUNK_ROWS
from alignment.stages import StageError

GiB = 1024**3


def model_config(name_or_path: str, recipe_dir: Path | None = None) -> Any:
    """config.json of a local checkpoint, the matching preset for a released Qwen2 id, or the Hub's.

    A run directory that does not exist yet is traced through the recipe (in `recipe_dir`)
    whose `run_dir` it is, to the model that run starts from."""
    if Path(name_or_path, "config.json").exists():
        return AutoConfig.from_pretrained(name_or_path)
    if recipe_dir is not None:
        for path in sorted(recipe_dir.glob("*.yaml")):
            data = yaml.safe_load(path.read_text()) or {}
            if Path(str(data.get("run_dir", ""))) == Path(name_or_path) and data.get("model"):
                return model_config(str(data["model"]), recipe_dir)
    key = re.sub(r"-(instruct|chat)$", "", name_or_path.split("/")[-1].lower())
    if key in PRESETS:
        return preset_config(key)
    try:
        return Qwen2Config.from_pretrained(name_or_path)  # the real Hub path, for ids we do not know
    except OSError as e:
        raise StageError(f"plan: cannot read the config of {name_or_path} ({str(e).splitlines()[0]})") from None


@dataclass
class ParameterCount:
    embedding: int
    per_layer: list[int]
    lm_head: int  # 0 when tied to the embedding
    active_per_token: int  # MoE: parameters a token passes through

    @property
    def total(self) -> int:
        return self.embedding + sum(self.per_layer) + self.lm_head + self.per_layer_norms

    per_layer_norms: int = 0


def count_parameters(c: Any) -> ParameterCount:
    h, heads, kv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    d = getattr(c, "head_dim", None) or h // heads
    attention = h * heads * d + heads * d + 2 * (h * kv * d + kv * d) + heads * d * h  # q, k, v with bias; o
    norms = 2 * h
    layers, active = [], []
    num_experts = getattr(c, "num_experts", 0) or 0
    sparse_step = getattr(c, "decoder_sparse_step", 1) or 1
    mlp_only = set(getattr(c, "mlp_only_layers", None) or [])
    for i in range(c.num_hidden_layers):
        if num_experts and i not in mlp_only and (i + 1) % sparse_step == 0:
            expert = 3 * h * c.moe_intermediate_size
            shared = 3 * h * c.shared_expert_intermediate_size + h  # + its sigmoid gate
            router = h * num_experts
            layers.append(attention + norms + num_experts * expert + shared + router)
            active.append(attention + norms + c.num_experts_per_tok * expert + shared + router)
        else:
            layers.append(attention + norms + 3 * h * c.intermediate_size)
            active.append(layers[-1])
    embedding = c.vocab_size * h
    lm_head = 0 if c.tie_word_embeddings else c.vocab_size * h
    return ParameterCount(embedding, layers, lm_head, embedding + sum(active) + lm_head + h, per_layer_norms=h)


def memory_plan(config: Any, gpus: int, micro_batch: int, seq_len: int, checkpointing: bool,
                reference_model: bool = False, lora: bool = False) -> dict[str, float]:
    """Bytes per GPU by component (see the module docstring for the assumptions)."""
    p = count_parameters(config)
    trained = 0.01 * p.total if lora else p.total  # LoRA: adapters are ~1% of the weights
    h, vocab = config.hidden_size, config.vocab_size
    inter = max(getattr(config, "intermediate_size", 0), getattr(config, "shared_expert_intermediate_size", 0) or 0)
    tokens = micro_batch * seq_len
    per_token_layer = 20 * h + 8 * inter  # bytes of saved tensors per token per layer (bf16, fp32 norms)
    layers = config.num_hidden_layers
    plan = {"weights (bf16, frozen, sharded)": 2 * p.total / gpus, "adapters (fp32, sharded)": 4 * trained / gpus} if lora \
        else {"weights (fp32 master, sharded)": 4 * p.total / gpus}
    plan |= {
        "gradients (fp32, sharded)": 4 * trained / gpus,
        "Adam moments (fp32, sharded)": 8 * trained / gpus,
        "gathered layers (bf16, 2 in flight)": 2 * 2 * max(p.per_layer) + 2 * (p.embedding + p.lm_head) / gpus,
        "activations": (tokens * 2 * h * layers + tokens * per_token_layer) if checkpointing
        else tokens * per_token_layer * layers,
        "LM head chunk (logits + softmax)": CHUNK_ROWS * vocab * (2 + 4) + tokens * h * 4,
    }
    if reference_model:
        plan["reference model (bf16, sharded)"] = 2 * p.total / gpus
    return plan


def online_dpo_phases(recipe: Any, config: Any, recipe_dir: Path | None, gpu_memory_gib: float,
                      gpus: int = 1) -> dict[str, dict[str, float]]:
    """Bytes per GPU that online DPO holds beside the trainer in each phase on `gpus` GPUs (see the module
    docstring)."""
    weight_bytes = 4 if recipe.compute_precision() == "float32" else 2

    def frozen(name: str, count: ParameterCount, total: int) -> dict[str, float]:
        """A model that is only evaluated: whole on one GPU, else sharded with a layer gathered at a time."""
        if gpus == 1:
            return {f"{name} (whole)": weight_bytes * total}
        return {f"{name} (sharded, a layer gathered)": weight_bytes * (total / gpus + max(count.per_layer))}

    policy = count_parameters(config)
    resident = {}
    if recipe.reward_model:
        reward_config = model_config(recipe.reward_model, recipe_dir)
        counted = count_parameters(reward_config)  # a causal LM's count: its LM head is a score head of 1 x hidden
        resident = frozen("reward model", counted, counted.total - counted.lm_head + reward_config.hidden_size)
    if recipe.generation.backend == "vllm":
        engine = {f"vLLM engine ({recipe.generation.gpu_memory_utilization:g} of the GPU)":
                  recipe.generation.gpu_memory_utilization * gpu_memory_gib * GiB}
    elif recipe.generation.backend == "vllm-server":
        engine = {}  # on the server's own GPUs: `policy_server_plan`
    else:
        engine = {"policy generator (whole)": weight_bytes * policy.total}
    return {"training": resident, "sampling": engine | resident,
            "held-out KL": engine | resident | frozen("policy or reference for log-probs", policy, policy.total)}


def policy_server_plan(recipe: Any, config: Any, gpu_memory_gib: float) -> list[str]:
    """What `serve-policy` holds on each of its own GPUs: the policy's weights split over its tensor
    parallelism, inside the `gpu_memory_utilization` share vLLM claims (the rest of the share is KV cache)."""
    generation = recipe.generation
    weight_bytes = 4 if generation.dtype == "float32" else 2  # auto keeps the checkpoint's (bf16) dtype on a GPU
    weights = weight_bytes * count_parameters(config).total / generation.tensor_parallel_size
    claimed = generation.gpu_memory_utilization * gpu_memory_gib * GiB
    verdict = (f"fits: {(claimed - weights) / GiB:.1f} GiB of each share left for the KV cache" if weights < claimed
               else "does not fit: more tensor_parallel_size or a larger gpu_memory_utilization")
    return [f"policy server (generation.backend vllm-server, {generation.tensor_parallel_size} GPU(s) of its own):",
            f"  weights per GPU {weights / GiB:.2f} GiB of the engine's {claimed / GiB:.2f} GiB "
            f"({generation.gpu_memory_utilization:g} of the GPU): {verdict}"]


def render_plan(recipe: Any, gpus: int, recipe_dir: Path | None = None, gpu_memory_gib: float = 80.0) -> str:
    config = model_config(recipe.model, recipe_dir)
    t = recipe.training
    # A DPO or reward-model micro-batch of n pairs runs 2n sequences (chosen and rejected).
    micro_batch = int(t.get("per_device_train_batch_size", 8)) * (1 if recipe.stage == "sft" else 2)
    seq_len = int(t.get("max_length") or 1024)
    checkpointing = bool(t.get("gradient_checkpointing", True))
    def plan_for(n: int) -> dict[str, float]:
        return memory_plan(config, n, micro_batch, seq_len, checkpointing,
                           reference_model=recipe.stage in ("dpo", "online-dpo") and recipe.lora is None,
                           lora=recipe.lora is not None)

    def phases(n: int) -> dict[str, dict[str, float]]:
        return online_dpo_phases(recipe, config, recipe_dir, gpu_memory_gib, n) if recipe.stage == "online-dpo" else {}

    online = phases(gpus)

    def peak(n: int) -> float:
        trainer, beside = sum(plan_for(n).values()), phases(n)
        return max([trainer + sum(beside.get("training", {}).values())]
                   + [sum(phase.values()) for name, phase in beside.items() if name != "training"]) / GiB

    plan = plan_for(gpus)
    p = count_parameters(config)
    lines = [
        f"model {recipe.model}: {p.total / 1e9:.3f} B parameters ({p.active_per_token / 1e9:.3f} B active per token), "
        f"embedding {p.embedding / 1e6:.1f} M, {config.num_hidden_layers} layers",
        f"stage {recipe.stage} on {gpus} GPU(s), ZeRO-3/FSDP full shard, micro-batch {micro_batch} sequences x {seq_len} tokens, "
        f"gradient checkpointing {'on' if checkpointing else 'off'}{', LoRA' if recipe.lora else ''}",
    ]
    width = max(len(k) for k in [*plan, *(f"{name}: {k}" for name, phase in online.items() for k in phase)])
    lines += [f"  {k:<{width}}  {v / GiB:8.2f} GiB" for k, v in plan.items()]
    total = sum(plan.values()) / GiB
    lines.append(f"  {'total per GPU':<{width}}  {total:8.2f} GiB")
    for name, phase in online.items():
        components = {f"{name}: {k}": v for k, v in phase.items()}
        if name == "training":
            components["training: trainer (above)"] = sum(plan.values())
        lines.append(f"online DPO, {name}:")
        lines += [f"  {k:<{width}}  {v / GiB:8.2f} GiB" for k, v in components.items()]
        lines.append(f"  {name + ': total per GPU':<{width}}  {sum(components.values()) / GiB:8.2f} GiB")
    if online:
        total = peak(gpus)
        lines.append(f"  {'peak per GPU':<{width}}  {total:8.2f} GiB")
    if total <= gpu_memory_gib:
        lines.append(f"fits in {gpu_memory_gib:g} GiB per GPU ({gpu_memory_gib - total:.1f} GiB to spare)")
    else:  # the sharded states shrink with more GPUs; activations and whole models do not
        enough = next((n for n in (2 ** i for i in range(11)) if peak(n) <= gpu_memory_gib), None)
        whole = max((sum(v.values()) for k, v in online.items() if k != "training"), default=0) / GiB
        hint = (f"at least {enough} GPUs at this micro-batch" if enough else
                f"{whole:.1f} GiB per GPU beside the trainer (the engine's share or a whole generator, the reward and "
                "log-prob models): a smaller gpu_memory_utilization, or GPUs with more memory" if whole > gpu_memory_gib else
                "a smaller micro-batch or max_length")
        lines.append(f"does not fit in {gpu_memory_gib:g} GiB per GPU: needs {hint}")
    if recipe.stage == "online-dpo" and recipe.generation.backend == "vllm-server":
        lines += policy_server_plan(recipe, config, gpu_memory_gib)
    return "\n".join(lines)
