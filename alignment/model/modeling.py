"""The Qwen2 decoder: embeddings -> N x (RMSNorm, GQA attention, RMSNorm, SwiGLU or MoE) -> RMSNorm -> LM head.

Parameter names match Hugging Face's `qwen2` checkpoints exactly, so `from_pretrained` reads
Hub weights and `save_pretrained` writes weights that stock transformers and vLLM load.
What differs from stock is how the work is done: SDPA without a mask whenever the batch has no
padding, packed and padded rows attended as causal segments without an n x n mask
(`attention.py`), and the loss computed through the LM head in chunks (`loss.py`) so
full-vocabulary logits are never materialised when labels are given.

One decoder serves both families: a `qwen2_moe` config puts the MoE block (`moe.py`) in the
layers that `mlp_only_layers` / `decoder_sparse_step` make sparse, and `Qwen2MoeForCausalLM`
adds the load-balancing loss, as stock `Qwen2MoeForCausalLM` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast, MoeCausalLMOutputWithPast,
                                           MoeModelOutputWithPast, SequenceClassifierOutputWithPast)
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func
from transformers.utils import ModelOutput

from .attention import AttentionLayout, Qwen2Attention, build_attention_layout
from .config import Qwen2Config, Qwen2MoeConfig
from .dca import DualChunkPositions, DualChunkRotary
from .loss import causal_lm_loss, token_logprobs
from .mlp import Qwen2MLP
from .moe import Qwen2SparseMoeBlock, is_moe_layer
from .rope import RotaryEmbedding


@dataclass
class Qwen2CausalLMOutput(CausalLMOutputWithPast):
    """With labels: also how many labelled tokens were predicted exactly (token accuracy)."""

    num_correct: torch.Tensor | None = None
    num_labels: int | None = None


@dataclass
class Qwen2MoeCausalLMOutput(MoeCausalLMOutputWithPast):
    """Stock's MoE output (router logits, aux loss) plus the token accuracy of `Qwen2CausalLMOutput`."""

    num_correct: torch.Tensor | None = None
    num_labels: int | None = None


@dataclass
class FusedLMHeadOutput(ModelOutput):
    """TRL's fused-LM-head protocol (`trl.trainer.utils.FusedCausalLMOutput`): per-token results
    [b, n-1] (or [b, n] with shift_labels), zero where the label is ignored."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class Qwen2RMSNorm(nn.Module):
    """x / rms(x) * w, computed in float32 and cast back (as Qwen2 does)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Qwen2DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: Qwen2Config | Qwen2MoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen2Attention(config, layer_idx)
        self.sparse = is_moe_layer(config, layer_idx)
        if self.sparse:
            self.mlp = Qwen2SparseMoeBlock(config)
        else:
            self.mlp = Qwen2MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [b, n, hidden]
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | DualChunkPositions,
        layout: AttentionLayout | None,
        past_key_values: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the new hidden states and, for an MoE layer, its router logits [b * n, num_experts]."""
        attended = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, layout, past_key_values)
        h = hidden_states + attended
        if not self.sparse:
            return h + self.mlp(self.post_attention_layernorm(h)), None
        out, router_logits = self.mlp(self.post_attention_layernorm(h))
        return h + out, router_logits


class Qwen2PreTrainedModel(PreTrainedModel):
    config_class = Qwen2Config
    config: Qwen2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # normal(0, initializer_range) for Linear/Embedding, ones for RMSNorm
        if isinstance(module, RotaryEmbedding):
            module.reset_parameters()


class Qwen2Model(Qwen2PreTrainedModel):
    def __init__(self, config: Qwen2Config | Qwen2MoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if config.dual_chunk_attention_config:
            self.rotary_emb = DualChunkRotary(config)
        else:
            self.rotary_emb = RotaryEmbedding(config.rope_parameters, head_dim, config.max_position_embeddings)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # [b, n]
        attention_mask: torch.Tensor | None = None,  # [b, past + n] of 1/0
        position_ids: torch.LongTensor | None = None,  # [b, n]
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,  # [b, n, hidden]
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        output_router_logits: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPast | MoeModelOutputWithPast:
        """MoE configs get a `MoeModelOutputWithPast`, with the router logits of the MoE layers when asked."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        b, n, _ = inputs_embeds.shape
        if isinstance(self.rotary_emb, DualChunkRotary):  # positions come from the padding mask
            layout, position_embeddings = None, self.rotary_emb(inputs_embeds, attention_mask, position_ids, past_len)
        else:
            if position_ids is None:
                position_ids = torch.arange(past_len, past_len + n, device=inputs_embeds.device).expand(b, n)
            layout = build_attention_layout(attention_mask, position_ids, n, past_len)
            position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        all_hidden = [hidden_states] if output_hidden_states else None
        all_router_logits = []
        for layer in self.layers:
            hidden_states, router_logits = layer(
                hidden_states, position_embeddings=position_embeddings, layout=layout, past_key_values=past_key_values
            )
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            if output_router_logits and router_logits is not None:
                all_router_logits.append(router_logits)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden[-1] = hidden_states
        out = dict(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )
        if self.config.model_type != "qwen2_moe":
            return BaseModelOutputWithPast(**out)
        return MoeModelOutputWithPast(**out, router_logits=tuple(all_router_logits) if output_router_logits else None)


class Qwen2ForCausalLM(Qwen2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Qwen2Config | Qwen2MoeConfig):
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,  # [b, n], unshifted, -100 = ignore
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool = False,
        shift_labels: torch.LongTensor | None = None,  # [b, n], already shifted
        num_items_in_batch: int | torch.Tensor | None = None,
        fused_lm_head: bool = False,
        **kwargs,
    ) -> Qwen2CausalLMOutput | FusedLMHeadOutput:
        """With labels, returns the loss and no logits: the loss goes through the LM head in chunks.

        `fused_lm_head=True` answers TRL's fused-LM-head call (per-token log-probs and logging
        statistics for the labelled positions) with our chunked kernel; see `FusedLMHeadOutput`.
        """
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **self._router_options(kwargs),
        )
        result = self._head(out, labels, shift_labels, num_items_in_batch, logits_to_keep, fused_lm_head)
        return self._with_router_outputs(result, out, attention_mask, fused_lm_head)

    def _router_options(self, kwargs: dict) -> dict:
        """Backbone arguments of an MoE model's router (none for a dense one)."""
        return {}

    def _with_router_outputs(self, result, out, attention_mask, fused_lm_head):
        """An MoE model adds the load-balancing loss and router logits; a dense one returns `result`."""
        return result

    def _head(
        self,
        out: BaseModelOutputWithPast,
        labels: torch.LongTensor | None,
        shift_labels: torch.LongTensor | None,
        num_items_in_batch: int | torch.Tensor | None,
        logits_to_keep: int | torch.Tensor,
        fused_lm_head: bool,
    ) -> Qwen2CausalLMOutput | FusedLMHeadOutput:
        hidden = out.last_hidden_state  # [b, n, hidden]
        if fused_lm_head:
            if shift_labels is None:
                hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
            stats = token_logprobs(hidden, self.lm_head.weight, shift_labels, with_stats=True)
            mask = shift_labels != -100
            denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
            return FusedLMHeadOutput(
                loss=-stats.log_probs.sum() / denom, log_probs=stats.log_probs, entropy=stats.entropy,
                mean_logits=stats.mean_logits, log_sum_sq_probs=stats.log_sum_sq_probs, is_top1=stats.is_top1,
                label_mask=mask,
            )
        loss = logits = correct = n_labels = None
        if labels is not None or shift_labels is not None:
            loss, correct, n_labels = causal_lm_loss(hidden, self.lm_head.weight, labels, shift_labels,
                                                     num_items_in_batch)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :])  # [b, kept, vocab]
        return Qwen2CausalLMOutput(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states,
            num_correct=correct, num_labels=n_labels,
        )


class Qwen2ForSequenceClassification(Qwen2PreTrainedModel):
    """The reward model: a linear `score` head on the hidden state of the last non-pad token.

    Same parameter names and pooling rule as transformers' `Qwen2ForSequenceClassification`,
    so a saved reward model loads in stock transformers (and an SFT checkpoint loads here with
    a freshly initialised head)."""

    def __init__(self, config: Qwen2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = Qwen2Model(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # [b, n]
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=False,
        ).last_hidden_state  # [b, n, hidden]
        b, n = hidden.shape[:2]
        pad = self.config.pad_token_id
        if pad is None or input_ids is None:
            if pad is None and b != 1:
                raise ValueError("set config.pad_token_id to score a padded batch")
            last = torch.full((b,), n - 1, device=hidden.device)
        else:  # the rightmost token that is not padding, for left or right padding alike
            positions = torch.arange(n, device=hidden.device)
            last = (positions * (input_ids != pad)).argmax(-1)  # [b]
        logits = self.score(hidden[torch.arange(b, device=hidden.device), last])  # [b, num_labels]
        return SequenceClassifierOutputWithPast(logits=logits)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    """Qwen2 MoE (`qwen2_moe` checkpoints, e.g. Qwen2-57B-A14B): the same decoder with MoE layers.

    As in stock transformers, `output_router_logits` (argument, else the config's) returns the
    router logits and `aux_loss`, the Switch load-balancing loss over the MoE layers (padding
    excluded by `attention_mask`); the loss, with labels or with `fused_lm_head`, is the LM loss +
    router_aux_loss_coef * aux_loss. TRL's trainers switch `output_router_logits` on for MoE models.
    """

    config_class = Qwen2MoeConfig
    config: Qwen2MoeConfig

    def _router_options(self, kwargs: dict) -> dict:
        chosen = kwargs.get("output_router_logits")
        return {"output_router_logits": self.config.output_router_logits if chosen is None else chosen}

    def _with_router_outputs(
        self, result: Qwen2CausalLMOutput | FusedLMHeadOutput, out: MoeModelOutputWithPast,
        attention_mask: torch.Tensor | None, fused_lm_head: bool,
    ) -> Qwen2MoeCausalLMOutput | FusedLMHeadOutput:
        aux_loss = None
        if out.router_logits:
            n = out.last_hidden_state.shape[1]
            # The mask's last n columns are this call's tokens (earlier ones are in the KV cache).
            token_mask = attention_mask[:, -n:] if attention_mask is not None and attention_mask.dim() == 2 else None
            aux_loss = load_balancing_loss_func(
                out.router_logits, self.config.num_experts, self.config.num_experts_per_tok, token_mask
            )
            if result.loss is not None:
                result.loss = result.loss + self.config.router_aux_loss_coef * aux_loss
        if fused_lm_head:
            result.aux_loss = aux_loss
            return result
        return Qwen2MoeCausalLMOutput(**result, aux_loss=aux_loss, router_logits=out.router_logits)


class Qwen2MoeForSequenceClassification(Qwen2ForSequenceClassification):
    """The reward model on an MoE backbone: stock `Qwen2MoeForSequenceClassification`'s layout.
    No load-balancing loss: TRL's RewardTrainer asks for none."""

    config_class = Qwen2MoeConfig
    config: Qwen2MoeConfig


CAUSAL_LM_CLASSES: dict[str, type[Qwen2ForCausalLM]] = {"qwen2": Qwen2ForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM}
SEQUENCE_CLASSIFICATION_CLASSES: dict[str, type[Qwen2ForSequenceClassification]] = {
    "qwen2": Qwen2ForSequenceClassification, "qwen2_moe": Qwen2MoeForSequenceClassification,
}
