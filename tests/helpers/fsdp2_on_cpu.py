"""`accelerate launch` entry point: `qwen2-align` with accelerate's FSDP2 on CPU processes (gloo).

accelerate 1.15 picks FSDP only when it finds an accelerator: on CPU (the trainers set `use_cpu`
without a GPU) its state stays MULTI_CPU and `prepare` wraps the model in DDP, silently. torch's
FSDP2 itself runs on gloo, so this sets accelerate's state to FSDP after its own setup and
`prepare` shards the model with accelerate's `fsdp2_prepare_model`, as on GPUs. Each process
reports the FSDP2 units it made on stderr, so a test can tell FSDP2 ran.
"""

import os
import sys

import accelerate.accelerator
import accelerate.state
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule

from qwen2_align.cli import main

FSDP2_MARK = "fsdp2_on_cpu: FSDP2 units:"
_accelerator_state_init = accelerate.state.AcceleratorState.__init__
_fsdp2_prepare_model = accelerate.accelerator.fsdp2_prepare_model


def _state_init(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        if self._mixed_precision != "no":  # as accelerate does for FSDP
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _prepare_model(accelerator, model):
    model = _fsdp2_prepare_model(accelerator, model)
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    print(f"{FSDP2_MARK} {units} (rank {os.environ['RANK']})", file=sys.stderr, flush=True)
    return model


accelerate.state.AcceleratorState.__init__ = _state_init
accelerate.accelerator.fsdp2_prepare_model = _prepare_model

if __name__ == "__main__":
    sys.exit(main())
