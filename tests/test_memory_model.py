"""The memory model of ``docs/scaling-out.md`` (``peft_callbacks.core.memory``): its counts against real modules
(transformers' Llama and our LoRA surgery, built on ``meta``: no memory), and how each strategy divides each term.
The bytes it predicts are compared with what CPU runs hold in ``benchmarks/scale_out.py``."""

from __future__ import annotations

import pytest
import torch
import transformers as hf

from peft_callbacks import LoRAConfig, inject
from peft_callbacks.core.memory import LLAMA_SHAPES, STRATEGIES, estimate_memory, memory_table


def meta_llama(shape, layers: int | None = None) -> hf.LlamaForCausalLM:
    config = hf.LlamaConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=layers or shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_word_embeddings,
    )
    with torch.device("meta"):
        return hf.LlamaForCausalLM(config)


@pytest.mark.parametrize("name", list(LLAMA_SHAPES))
def test_parameter_counts_are_transformers_llamas(name):
    shape = LLAMA_SHAPES[name]
    model = meta_llama(shape)
    assert shape.parameters() == sum(p.numel() for p in model.parameters())  # a tied output layer counted once


def test_lora_values_are_what_the_surgery_creates():
    shape = LLAMA_SHAPES["8B"]
    model = inject(meta_llama(shape, layers=2), LoRAConfig(rank=16, train_head=False))
    created = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_rank = estimate_memory(shape, "ddp", ranks=1, rank=16, adapter_bytes=1).adapter
    assert created * shape.num_hidden_layers // 2 == per_rank


def test_each_strategy_divides_what_it_shards():
    shape, n = LLAMA_SHAPES["70B"], 8
    ddp, fsdp2, tp, qlora = (estimate_memory(shape, s, ranks=n, tensor_parallel=2) for s in STRATEGIES)
    assert ddp.frozen_base == shape.parameters() * 2
    layer = shape.layer_linear_parameters() + 2 * shape.hidden_size
    gathered = (shape.root_parameters() + 2 * layer) * 2  # the root unit, a layer computing and one prefetched
    assert fsdp2.frozen_base == ddp.frozen_base / n and fsdp2.gathered == gathered and ddp.gathered == 0
    assert fsdp2.adapter == pytest.approx(ddp.adapter / n) and fsdp2.optimizer == 2 * fsdp2.gradients
    assert tp.activations == pytest.approx(ddp.activations / 2, rel=1e-3)  # (LoRA's rank-r outputs stay whole)
    assert fsdp2.activations == ddp.activations
    plain_tp = estimate_memory(shape, "tp_fsdp2", ranks=n, tensor_parallel=2, sequence_parallel=False)
    assert tp.activations < plain_tp.activations < ddp.activations
    assert tp.frozen_base == fsdp2.frozen_base and tp.gathered == fsdp2.gathered / 2  # 2 × 4 ranks share it too
    assert qlora.frozen_base < fsdp2.frozen_base / 2 and qlora.total < fsdp2.total
    checkpointed = estimate_memory(shape, "fsdp2", ranks=n, checkpointing=True)
    assert checkpointed.activations < fsdp2.activations / 5


def test_the_table_has_a_row_per_shape_and_strategy():
    table = memory_table().splitlines()
    assert len(table) == 2 + len(LLAMA_SHAPES) * len(STRATEGIES)
    assert table[-1].startswith("| 70B | QLoRA + FSDP2 ×8 |")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"`strategy` must be one of .*got 'zero3'"):
        estimate_memory(LLAMA_SHAPES["1B"], "zero3")
    with pytest.raises(ValueError, match=r"`tensor_parallel` must divide `ranks` \(8\), got 3"):
        estimate_memory(LLAMA_SHAPES["1B"], "tp_fsdp2", tensor_parallel=3)
