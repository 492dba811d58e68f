"""The `vllm` backend: vLLM's offline engine (CPU build here, CUDA on GPU machines).

vLLM spawns worker processes, so scripts that use it need an `if __name__ == "__main__":`
guard (the `qwen2-align` console script has one). Prompts are rendered and tokenised with the
checkpoint's tokenizer, exactly as the transformers backend does, and every sampling field is
passed explicitly so the checkpoint's generation_config.json cannot change the decoding.

Beside a trainer (online DPO) the engine is colocated, as TRL's colocate mode runs it: under
`accelerate launch` each process starts its own engine on its own GPU (vLLM's `external_launcher`), and
on a GPU the engine sleeps while the trainer steps (`sleep`: weights and KV cache released) and wakes
into the next policy's weights (`load_weights`). Neither has run on a GPU yet; vLLM's CPU build has no
sleep mode, so there the engine is closed and started again.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..model import Qwen2Config, enable_long_context
from ..tokenizer import load_tokenizer
from .base import Completion, GenerationSpec, Generator, Prompt, SamplingParams
from .transformers_backend import render_prompts


def _on_cpu() -> bool:
    """vLLM's CPU build: no sleep mode, and no in-place weight reload (see `VLLMGenerator.load_weights`)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _in_ray_worker() -> bool:
    """Inside a Ray process (a data stage's worker, alignment.executors); Ray is only imported if the stage is."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


class VLLMGenerator(Generator):
    def __init__(self, spec: GenerationSpec):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.cpu_kvcache_gib))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # else one of few cores idles
        self.spec = spec
        self.tokenizer = load_tokenizer(spec.model)
        self.llm = self._engine(spec)
        self.asleep = False

    @staticmethod
    def _engine(spec: GenerationSpec):
        from vllm import LLM  # heavy and optional (the vllm-cpu extra, or vllm on GPU machines)

        kwargs = {"max_model_len": spec.max_model_len} if spec.max_model_len else {}
        kwargs["worker_extension_cls"] = "alignment.generation.weight_sync.WeightReceiver"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one engine per launched process, on its own device
            kwargs["distributed_executor_backend"] = "external_launcher"
        elif spec.tensor_parallel_size > 1 and _in_ray_worker():
            # a data stage's Ray worker holds its GPUs already: the engine's processes run beside it, on them,
            # instead of vLLM asking the cluster for more
            kwargs["distributed_executor_backend"] = "mp"
        if not _on_cpu():
            kwargs["enable_sleep_mode"] = True
        if spec.long_context():  # the same config fields our loader sets, handed to vLLM as overrides
            long = enable_long_context(Qwen2Config.from_pretrained(spec.model), **spec.long_context()).to_dict()
            kwargs["hf_overrides"] = {k: long[k] for k in ("rope_scaling", "max_position_embeddings",
                                                         "dual_chunk_attention_config") if k in long}
        return LLM(
            model=spec.model,
            dtype=spec.load_dtype(),
            tensor_parallel_size=spec.tensor_parallel_size,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            seed=0,
            enforce_eager=spec.enforce_eager,
            **kwargs,
        )

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSampling

        fields = dict(
            n=params.n,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p if params.temperature > 0 else 1.0,
            top_k=params.top_k if params.temperature > 0 else -1,
            repetition_penalty=params.repetition_penalty,
            stop=params.stop or None,
        )
        if params.seeds is not None:  # vLLM gives a seeded request its own generator
            if len(params.seeds) != len(prompts):
                raise ValueError(f"seeds: one per prompt, got {len(params.seeds)} for {len(prompts)} prompts")
            sampling = [VLLMSampling(**fields, seed=seed) for seed in params.seeds]
        else:
            sampling = VLLMSampling(**fields, seed=params.seed)
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in render_prompts(self.tokenizer, prompts)]
        outs = self.llm.generate([{"prompt_token_ids": i} for i in ids], sampling, use_tqdm=False)
        return [
            [Completion(o.text, len(o.token_ids), "length" if o.finish_reason == "length" else "stop") for o in out.outputs]
            for out in outs
        ]

    def load_weights(self, path: str) -> None:
        """A checkpoint of the same architecture (the next policy of online DPO) read into the running engine in
        place, with no restart; cached prompt prefixes computed with the old weights are dropped.

        Not on vLLM's CPU build: its linear layers keep prepacked copies of the weights that an in-place reload
        leaves stale (measured with vllm-cpu 0.32: after the reload it decoded neither model's greedy tokens),
        so there the engine is started again from `path`. The in-place path has not run on a GPU yet."""
        self.spec = replace(self.spec, model=str(path))
        if _on_cpu() or self.llm is None:
            self.close()
            self.llm = self._engine(self.spec)
            return
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    def weights_dtype(self) -> str:
        return str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")

    def workers(self) -> int:
        """The engine's worker processes (one per GPU of its tensor parallelism)."""
        return self.spec.tensor_parallel_size

    def receive_weights(self, host: str, port: int, world_size: int, layout: list, scratch: Path) -> float:
        """The next policy's tensors, broadcast by a trainer (`weight_sync`), into the running engine: loaded in
        place by each worker on a GPU (not yet run on one). vLLM's CPU build cannot load in place (see
        `load_weights`): there they are written into one of two folders under `scratch`, beside the current
        model's config and tokenizer files, and the engine is started again from it. Returns the seconds that
        restart took (0 on a GPU)."""
        if not _on_cpu():
            self.llm.collective_rpc("receive_weights", args=(host, port, world_size, layout, self.weights_dtype()))
            self.llm.reset_prefix_cache()
            return 0.0
        target = Path(scratch) / ("b" if Path(self.spec.model).resolve() == (Path(scratch) / "a").resolve() else "a")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for file in Path(self.spec.model).iterdir():
            if file.is_file() and ".safetensors" not in file.name:
                shutil.copy2(file, target / file.name)
        self.llm.collective_rpc("receive_weights",
                                args=(host, port, world_size, layout, self.weights_dtype(), str(target)))
        restart = time.perf_counter()
        self.load_weights(str(target))
        return time.perf_counter() - restart

    def sleep(self) -> None:
        """Release the engine's GPU memory (weights and KV cache, vLLM's sleep level 2) until `load_weights`; on
        vLLM's CPU build, which cannot sleep, the engine is closed."""
        if _on_cpu():
            self.close()
        elif self.llm is not None and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def close(self) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
