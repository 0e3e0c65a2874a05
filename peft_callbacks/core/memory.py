r"""What one rank holds when a Llama-shaped model trains LoRA adapters, on paper: frozen base, adapter, its
gradients, the optimizer's state and the activations, under DDP, FSDP2, TP × FSDP2 and QLoRA + FSDP2.

The model counts bytes the way the strategies lay tensors out (``docs/scaling-out.md`` explains each term;
``benchmarks/scale_out.py`` checks it against what CPU runs hold):

==============  ================================================================================================
term            per rank
==============  ================================================================================================
frozen base     DDP: every weight. FSDP2 over ``n`` ranks: ``1/n`` of every weight, and *gathered to compute*:
                the units held whole while they compute (the root unit, embeddings and output layer, stays gathered
                through the step; two decoder layers at a time, the one computing and the one prefetched). TP over
                ``t`` ranks divides all of it by ``t``. QLoRA stores the decoder's linear weights in 4 bits (NF4 with
                double quantization, ≈ 4.13 bits per weight) and dequantizes one at a time while computing.
adapter         LoRA's ``A`` and ``B`` on the 7 projections of every layer (fp32 by default); FSDP2 divides them by
                ``n``; TP splits the factor that runs along the base's split dimension (``B`` of column-parallel
                layers, ``A`` of row-parallel ones) and replicates the other.
gradients       as the adapter (only trained tensors get gradients).
optimizer       AdamW: two states per trained value, in the adapter's dtype.
activations     what autograd keeps for backward, per token and layer: the two norms' inputs and outputs, q, k, v,
                the attention output, the MLP's gate, SiLU(gate), up and their product (the inputs of the adapted
                projections), LoRA's rank-``r`` intermediates; plus the loss's float32 log-softmax over the
                vocabulary. With activation checkpointing, each layer's input plus one layer recomputed. Data
                parallelism does not divide it (each rank has its own micro-batch); tensor parallelism divides the
                heads' and the MLP's by ``t``, the norms' too with sequence parallelism, the loss's with
                ``loss_parallel``.
==============  ================================================================================================

Example::

    >>> estimate = estimate_memory(LLAMA_SHAPES["8B"], "fsdp2", ranks=8)
    >>> round(estimate.frozen_base / 2**30, 1), round(estimate.gathered / 2**30, 1), round(estimate.adapter / 2**20, 1)
    (1.9, 2.8, 20.0)
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from peft_callbacks._validation import check_bool, check_positive_int

__all__ = ["LLAMA_SHAPES", "LlamaShape", "MemoryEstimate", "STRATEGIES", "estimate_memory", "memory_table"]

Strategy = Literal["ddp", "fsdp2", "tp_fsdp2", "qlora_fsdp2"]
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp2", "tp_fsdp2", "qlora_fsdp2")
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes, an 8-bit absmax per 64 values, a float32 per 256 absmax


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """A Llama's shape (transformers' ``LlamaConfig`` names).

    Example::

        >>> round(LLAMA_SHAPES["8B"].parameters() / 1e9, 2)
        8.03
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @property
    def kv_size(self) -> int:
        """Width of the key (and value) projection: ``kv_heads × head_dim``."""
        return self.num_key_value_heads * self.hidden_size // self.num_attention_heads

    def projections(self) -> dict[str, tuple[int, int, int]]:
        """``{name: (in, out, split dim under tensor parallelism)}`` of one decoder layer's linear layers (split dim
        0: column-parallel, 1: row-parallel, as Lightning's example plan)."""
        d, f, kv = self.hidden_size, self.intermediate_size, self.kv_size
        return {
            "q_proj": (d, d, 0),
            "k_proj": (d, kv, 0),
            "v_proj": (d, kv, 0),
            "o_proj": (d, d, 1),
            "gate_proj": (d, f, 0),
            "up_proj": (d, f, 0),
            "down_proj": (f, d, 1),
        }

    def layer_linear_parameters(self) -> int:
        """Weights of one decoder layer's projections."""
        return sum(i * o for i, o, _ in self.projections().values())

    def root_parameters(self) -> int:
        """Embeddings, output layer (unless tied) and final norm: what stays outside the decoder layers."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def parameters(self) -> int:
        """Every weight of the model."""
        per_layer = self.layer_linear_parameters() + 2 * self.hidden_size  # + the two norms
        return self.num_hidden_layers * per_layer + self.root_parameters()


LLAMA_SHAPES = {  # Llama 3.2 1B, Llama 3.1 8B and 70B
    "1B": LlamaShape(2048, 8192, 16, 32, 8, 128256, tie_word_embeddings=True),
    "8B": LlamaShape(4096, 14336, 32, 32, 8, 128256),
    "70B": LlamaShape(8192, 28672, 80, 64, 8, 128256),
}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds, by term (see the module docstring).

    Example::

        >>> MemoryEstimate(1, 2, 3, 4, 5, gathered=6).total
        21
    """

    frozen_base: float
    adapter: float
    gradients: float
    optimizer: float
    activations: float
    gathered: float = 0.0  # frozen weights held whole only while they compute (FSDP2's gathered units, dequantized)

    @property
    def total(self) -> float:
        return self.frozen_base + self.gathered + self.adapter + self.gradients + self.optimizer + self.activations


def _lora_per_rank(shape: LlamaShape, rank: int, tensor_parallel: int) -> float:
    """LoRA values one tensor-parallel rank holds (A and B of every projection of every layer)."""
    per_layer = 0.0
    for inputs, outputs, split in shape.projections().values():
        a, b = rank * inputs, rank * outputs
        per_layer += (a + b / tensor_parallel) if split == 0 else (a / tensor_parallel + b)
    return per_layer * shape.num_hidden_layers


def _activations(shape: LlamaShape, tokens: int, rank: int, nbytes: int, checkpointing: bool, split: dict) -> float:
    """Bytes autograd keeps for backward on one rank; ``split``: how tensor parallelism divides them."""
    t, d, f = split["t"], shape.hidden_size, shape.intermediate_size
    norms = 4 * d / (t if split["sequence_parallel"] else 1)  # the two norms' inputs and outputs
    heads_and_mlp = (2 * d + 2 * shape.kv_size + 4 * f) / t  # q, k, v, attention output; gate, SiLU, up, product
    per_layer = tokens * (norms + heads_and_mlp + 7 * rank) * nbytes
    loss = tokens * shape.vocab_size * 4 / (t if split["loss_parallel"] else 1)  # float32 log-softmax
    if checkpointing:
        inputs = shape.num_hidden_layers * tokens * d * nbytes / (t if split["sequence_parallel"] else 1)
        return inputs + per_layer + loss
    return shape.num_hidden_layers * per_layer + loss


def _check_shape(name: str, shape: object) -> LlamaShape:
    if not isinstance(shape, LlamaShape):
        raise TypeError(
            f"`{name}` must be a LlamaShape (e.g. LLAMA_SHAPES['8B']), got {type(shape).__name__} {shape!r}."
        )
    return shape


def estimate_memory(
    shape: LlamaShape,
    strategy: Strategy,
    *,
    ranks: int = 8,
    tensor_parallel: int = 1,
    rank: int = 16,
    micro_batch: int = 1,
    sequence: int = 4096,
    base_bytes: int = 2,
    adapter_bytes: int = 4,
    activation_bytes: int = 2,
    checkpointing: bool = False,
    sequence_parallel: bool = True,
    loss_parallel: bool = True,
) -> MemoryEstimate:
    """Bytes one rank holds while training LoRA on every projection of ``shape`` (see the module docstring).

    Args:
        shape: the model, e.g. ``LLAMA_SHAPES["8B"]``.
        strategy: ``"ddp"``, ``"fsdp2"``, ``"tp_fsdp2"`` (``tensor_parallel`` ranks inside, FSDP2 across the
            rest) or ``"qlora_fsdp2"`` (a 4-bit base under FSDP2).
        ranks: processes in all.
        tensor_parallel: the tensor-parallel size (``"tp_fsdp2"`` only; it must divide ``ranks``).
        rank: the LoRA rank.
        micro_batch: sequences per rank and step.
        sequence: tokens per sequence.
        base_bytes: bytes per frozen weight that is not quantized (2: bf16).
        adapter_bytes: bytes per LoRA value, per gradient value, per optimizer-state value (4: fp32).
        activation_bytes: bytes per activation value (2: bf16).
        checkpointing: activation checkpointing of every decoder layer.
        sequence_parallel: under tensor parallelism the norms run sequence-parallel (as Lightning's example plan);
            ``False``: their inputs and outputs are whole on every rank.
        loss_parallel: under tensor parallelism the logits stay split for the loss (``loss_parallel``, as Lightning's
            example); ``False``: the output layer replicates them and every rank computes the whole loss.

    Raises:
        TypeError/ValueError: an argument of the wrong kind or out of range (named), an unknown strategy, or a
            tensor-parallel size that does not divide ``ranks``.

    Example::

        >>> ddp = estimate_memory(LLAMA_SHAPES["1B"], "ddp", ranks=2)
        >>> round(ddp.frozen_base / 2**30, 2)
        2.3
    """
    _check_shape("shape", shape)
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    sizes = {"ranks": ranks, "tensor_parallel": tensor_parallel, "rank": rank, "micro_batch": micro_batch}
    sizes |= {"sequence": sequence, "base_bytes": base_bytes, "adapter_bytes": adapter_bytes}
    for name, value in {**sizes, "activation_bytes": activation_bytes}.items():
        check_positive_int(name, value)
    for name, flag in (("checkpointing", checkpointing), ("sequence_parallel", sequence_parallel)):
        check_bool(name, flag)
    check_bool("loss_parallel", loss_parallel)
    if ranks % tensor_parallel:
        raise ValueError(f"`tensor_parallel` must divide `ranks` ({ranks}), got {tensor_parallel}.")
    t = tensor_parallel if strategy == "tp_fsdp2" else 1
    n = 1 if strategy == "ddp" else ranks // t  # ranks each tensor is sharded over by FSDP2
    layers, layer = shape.num_hidden_layers, shape.layer_linear_parameters() + 2 * shape.hidden_size
    root = shape.root_parameters()
    if strategy == "qlora_fsdp2":
        quantized = layers * shape.layer_linear_parameters()
        frozen = (quantized * NF4_BITS / 8 + (shape.parameters() - quantized) * base_bytes) / n
        gathered_layer = shape.layer_linear_parameters() * NF4_BITS / 8 + 2 * shape.hidden_size * base_bytes
        widest = max(i * o for i, o, _ in shape.projections().values())
        gathered = root * base_bytes + 2 * gathered_layer + widest * base_bytes  # + one weight dequantized
    else:
        frozen = shape.parameters() * base_bytes / (n * t)
        gathered = (root + 2 * layer) * base_bytes / t if n > 1 else 0.0  # FSDP2's units (TP slices of them)
    adapter = _lora_per_rank(shape, rank, t) * adapter_bytes / n
    tokens = micro_batch * sequence
    split = {"t": t, "sequence_parallel": sequence_parallel, "loss_parallel": loss_parallel}
    activations = _activations(shape, tokens, rank, activation_bytes, checkpointing, split)
    return MemoryEstimate(frozen, adapter, adapter, 2 * adapter, activations, gathered)


def memory_table(
    shapes: dict[str, LlamaShape] | None = None, *, ranks: int = 8, tensor_parallel: int = 2, **kwargs
) -> str:
    """A Markdown table of :func:`estimate_memory` for every shape and strategy, in GiB per rank.

    Example::

        >>> print(memory_table({"1B": LLAMA_SHAPES["1B"]}, ranks=2).splitlines()[2])
        | 1B | DDP ×2 | 2.30 | 0.00 | 0.04 | 0.04 | 0.08 | 7.60 | 10.07 |
    """
    if shapes is None:
        shapes = LLAMA_SHAPES
    if not isinstance(shapes, dict) or not shapes:
        raise TypeError(f"`shapes` must be None or a non-empty dict of name: LlamaShape, got {shapes!r}.")
    for name, shape in shapes.items():
        _check_shape(f"shapes[{name!r}]", shape)
    check_positive_int("ranks", ranks)
    check_positive_int("tensor_parallel", tensor_parallel)
    titles = {
        "ddp": f"DDP ×{ranks}",
        "fsdp2": f"FSDP2 ×{ranks}",
        "tp_fsdp2": f"TP ×{tensor_parallel} × FSDP2 ×{ranks // tensor_parallel}",
        "qlora_fsdp2": f"QLoRA + FSDP2 ×{ranks}",
    }
    rows = [
        "| model | strategy | frozen base | gathered to compute | adapter | gradients | AdamW | activations | total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, shape in shapes.items():
        for strategy in STRATEGIES:
            e = estimate_memory(shape, strategy, ranks=ranks, tensor_parallel=tensor_parallel, **kwargs)
            values = (e.frozen_base, e.gathered, e.adapter, e.gradients, e.optimizer, e.activations, e.total)
            rows.append(f"| {name} | {titles[strategy]} | " + " | ".join(f"{v / 2**30:.2f}" for v in values) + " |")
    return "\n".join(rows)
