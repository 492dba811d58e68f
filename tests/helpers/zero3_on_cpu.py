"""`accelerate launch` entry point: `qwen2-align`, each process reporting on stderr the ZeRO stage of the DeepSpeed
engine its model was wrapped in, so a test can tell ZeRO-3 ran rather than a fallback."""

import sys

import accelerate

from qwen2_align.cli import main

ZERO_MARK = "zero3_on_cpu: ZeRO stage"
_prepare_deepspeed = accelerate.Accelerator._prepare_deepspeed


def _prepare(self, *args):
    prepared = _prepare_deepspeed(self, *args)
    if self.deepspeed_engine_wrapped is not None:  # a model was prepared (the data loaders come first)
        stage = self.deepspeed_engine_wrapped.engine.zero_optimization_stage()
        print(f"{ZERO_MARK} {stage} (rank {self.process_index})", file=sys.stderr, flush=True)
    return prepared


accelerate.Accelerator._prepare_deepspeed = _prepare

if __name__ == "__main__":
    sys.exit(main())
