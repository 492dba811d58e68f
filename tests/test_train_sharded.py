"""What sharded training (FSDP2, ZeRO-3) relies on, checked in one process: the LM-head kernels on
an FSDP2-sharded and a ZeRO-3-partitioned head, the final save through the trainer, and whole
models for the DPO reference and evaluation."""

import json
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import transformers
import trl.trainer.utils
import yaml
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from alignment.checkpoint import init_checkpoint
from alignment.model import Qwen2ForCausalLM, preset_config
from alignment.model.loss import causal_lm_loss, token_logprobs
from alignment.stages import Run
from alignment.train.common import load_training_data, save_model, whole_models
from alignment.train.sft import build_sft_trainer
from qwen2_align.demo.arithmetic import write_arithmetic_sets
from qwen2_align.stage_table import load_recipe

NARROW = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture
def one_process_group():
    """A gloo process group of this process alone, as `torchrun --nproc_per_node 1` would start."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@pytest.mark.parametrize("fused_lm_head", [False, True], ids=["labels", "fused_lm_head"])
def test_lm_head_kernels_take_an_fsdp2_sharded_head(one_process_group, fused_lm_head):
    """lm_head in its own FSDP2 unit is a DTensor when the kernels read it (its forward never runs,
    as under accelerate with LoRA): loss and gradients equal the unsharded model's."""
    config = preset_config("tiny-untied", **NARROW)
    torch.manual_seed(0)
    plain = Qwen2ForCausalLM(config)
    sharded = Qwen2ForCausalLM(config)
    sharded.load_state_dict(plain.state_dict())
    fully_shard(sharded.lm_head)
    fully_shard(sharded)
    assert isinstance(sharded.lm_head.weight, DTensor)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(12) < 4, -100)
    results = []
    for model in (plain, sharded):
        out = model(input_ids=ids, labels=labels, fused_lm_head=fused_lm_head)
        loss = -out.log_probs.sum() if fused_lm_head else out.loss
        loss.backward()
        grads = [_plain(p.grad) for p in (model.lm_head.weight, model.model.layers[0].mlp.down_proj.weight)]
        results.append([loss.detach(), *grads])
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


class Partitioned:
    """Holds a parameter empty except inside `gather`, as ZeRO-3 does outside its module's forward
    (TRL's `maybe_gather_lm_head_ctx` is what the kernels enter to read it)."""

    def __init__(self, param: torch.nn.Parameter):
        self.param, self.whole, self.gathers = param, param.data, 0
        param.data = torch.empty(0)
        param.ds_status = "NOT_AVAILABLE"  # DeepSpeed marks the parameters it partitions

    @contextmanager
    def gather(self, *params):
        assert params == (self.param,)
        self.gathers += 1
        self.param.data = self.whole
        try:
            yield
        finally:
            self.param.data = torch.empty(0)


@pytest.mark.parametrize("loss_of, gathers", [(lambda h, w, y: token_logprobs(h, w, y).sum(), 2),
                                             (lambda h, w, y: causal_lm_loss(h, w, shift_labels=y)[0], 1)],
                         ids=["token_logprobs", "causal_lm_loss"])
def test_lm_head_kernels_gather_a_zero3_partitioned_head(monkeypatch, loss_of, gathers):
    """The kernels read the whole head inside TRL's gather context; `token_logprobs` recomputes the
    logits in backward and gathers again, `causal_lm_loss` has its gradients from the forward.
    (The head is frozen here: how ZeRO-3 reduces a head gradient needs DeepSpeed.)"""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 16, generator=generator, requires_grad=True)
    head = torch.nn.Parameter(torch.randn(50, 16, generator=generator) / 4, requires_grad=False)
    labels = torch.randint(0, 50, (2, 6), generator=generator).masked_fill(torch.arange(6) < 2, -100)
    loss_of(hidden, head, labels).backward()
    expected, hidden.grad = hidden.grad, None
    partitioned = Partitioned(head)
    monkeypatch.setattr(trl.trainer.utils, "maybe_gather_lm_head_ctx", partitioned.gather)
    monkeypatch.setattr(transformers.integrations.deepspeed, "is_deepspeed_zero3_enabled", lambda: True)
    loss_of(hidden, head, labels).backward()
    assert partitioned.gathers == gathers
    torch.testing.assert_close(hidden.grad, expected)
    hidden.grad = None  # a whole model beside a ZeRO-3 trainer (online DPO's KL): nothing to gather
    whole = torch.nn.Parameter(partitioned.whole, requires_grad=False)
    loss_of(hidden, whole, labels).backward()
    assert partitioned.gathers == gathers
    torch.testing.assert_close(hidden.grad, expected)


def test_whole_models_gives_every_process_the_weights(one_process_group, tmp_path, monkeypatch):
    """Under FSDP's CPU-RAM-efficient loading transformers reads the weights on local rank 0 only;
    within `whole_models` every process reads them (the DPO reference, evaluation)."""
    path = init_checkpoint("tiny", tmp_path / "init", seed=0, **NARROW)
    fsdp_rank_1 = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "LOCAL_RANK": "1"}
    for name, value in fsdp_rank_1.items():
        monkeypatch.setenv(name, value)
    stored = load_file(path / "model.safetensors")["model.norm.weight"]
    assert torch.count_nonzero(Qwen2ForCausalLM.from_pretrained(path).model.norm.weight) == 0  # what rank 1 gets
    with whole_models():
        assert torch.equal(Qwen2ForCausalLM.from_pretrained(path).model.norm.weight, stored)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "dropout": 0.0}], ids=["full", "lora"])
def test_save_model_writes_through_the_trainer_in_the_starting_dtype(tmp_path, monkeypatch, lora):
    """`trainer.save_model` is what gathers sharded weights; the checkpoint is then cast to the
    starting dtype (bf16 here, trained in float32), with LoRA merged, and loads in stock transformers."""
    model = init_checkpoint("tiny", tmp_path / "init", seed=0, dtype="bfloat16", **NARROW)
    data = write_arithmetic_sets(tmp_path / "data", n_demonstrations=16, n_preferences=4, seed=0)
    recipe_path = tmp_path / "sft.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "stage": "sft", "run_dir": str(tmp_path / "sft"), "model": str(model), "dtype": "float32",
        "inputs": {"train": str(data["demonstrations"])}, "seed": 0, "lora": lora,
        "training": {"max_length": 64, "per_device_train_batch_size": 4, "learning_rate": 0.5, "optim": "sgd",
                     "max_steps": 2, "gradient_checkpointing": False, "save_strategy": "no", "disable_tqdm": True},
    }))
    recipe = load_recipe(recipe_path)
    run = Run.start("sft", recipe, ["train"])
    trainer = build_sft_trainer(recipe, load_training_data(recipe, "demonstration", run), recipe.model)
    trainer.train()
    written = []
    trainer_save = trainer.save_model
    monkeypatch.setattr(trainer, "save_model", lambda output_dir, **kw: written.append(output_dir) or
                        trainer_save(output_dir, **kw))
    save_model(trainer, recipe, run.run_dir, recipe.model)
    assert written == [str(run.run_dir / "adapter" if lora else run.run_dir)]

    trained = trainer.model.merge_and_unload() if lora else trainer.model
    expected = {k: v.detach().to(torch.bfloat16) for k, v in trained.state_dict().items()}
    start = load_file(model / "model.safetensors")
    saved = load_file(run.run_dir / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((run.run_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (run.run_dir / "adapter_config.json").exists()  # a full checkpoint, not an adapter
    assert max((saved[k].float() - start[k].float()).abs().max().item() for k in saved) > 1e-2  # training moved it
    for key, tensor in saved.items():  # LoRA is merged in bf16: one rounding more than the cast
        torch.testing.assert_close(tensor, expected[key], rtol=1e-2, atol=1e-3)
    stock = transformers.AutoModelForCausalLM.from_pretrained(run.run_dir)
    assert type(stock).__name__ == "Qwen2ForCausalLM" and stock.dtype == torch.bfloat16
    assert (run.run_dir / "tokenizer.json").exists()
