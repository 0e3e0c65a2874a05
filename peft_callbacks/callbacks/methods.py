"""``LoHaCallback``, ``LoKrCallback``, ``OFTCallback``: :class:`~peft_callbacks.PEFTCallback` with each method's
settings as typed arguments, so LightningCLI checks them in YAML::

    trainer:
      callbacks:
        - class_path: peft_callbacks.OFTCallback
          init_args: {oft_block_size: 16, target_modules: [query, value]}
"""

from __future__ import annotations

from peft_callbacks.callbacks.peft import PEFTCallback
from peft_callbacks.methods.loha import LoHaConfig
from peft_callbacks.methods.lokr import LoKrConfig
from peft_callbacks.methods.oft import OFTConfig

__all__ = ["LoHaCallback", "LoKrCallback", "OFTCallback"]


class LoHaCallback(PEFTCallback):
    """Fine-tune with LoHa (a Hadamard product of two low-rank updates): inject at ``setup``, train only its tensors
    (+ the task head), merge into a plain model at the end.

    See :mod:`peft_callbacks.methods.loha` for the method and :class:`PEFTCallback` for what happens when.

    Args:
        rank: the rank ``r`` of each factor pair (> 0).
        alpha: the update is scaled by ``alpha / rank`` (> 0).
        rank_dropout: probability of zeroing each output row of the update during training, in ``[0, 1)``.
        module_dropout: probability of skipping a layer's whole update for one training step, in ``[0, 1)``.
        use_effective_conv2d: factor convolution kernels larger than 1 through core tensors.
        target_modules: ``None`` (every Linear/Conv/``Conv1D`` outside the head, so CNNs work too),
            ``"all-linear"``, a name, a regex or a list (see :mod:`peft_callbacks.core.targets`).
        exclude_modules: patterns of modules to leave alone.
        train_head: keep the task head fully trainable.
        train_bn: let BatchNorm layers train; by default their running statistics stay frozen.
        module: dotted path of the submodule to adapt; by default every timm/transformers model found.
        merge_on_train_end: fold LoHa into the base weights when training ends.
        save_adapter_to: directory for the adapter file, written before the merge.
        save_merged_to: directory for the merged model's weights, written after the merge.
        adapter_name: the name of the adapter (several can share a model).

    Example::

        >>> import lightning as L, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from peft_callbacks.demo import ImageClassifier  # any LightningModule; this one wraps a timm model
        >>> data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=4)
        >>> loha = LoHaCallback(rank=4, alpha=8)
        >>> trainer = L.Trainer(max_steps=2, callbacks=[loha], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(ImageClassifier("test_resnet", num_classes=3), data)
        >>> loha.parameter_count.percent < 25
        True
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 8.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        use_effective_conv2d: bool = False,
        target_modules: str | list[str] | None = None,
        exclude_modules: str | list[str] | None = None,
        train_head: bool = True,
        train_bn: bool = False,
        module: str | None = None,
        merge_on_train_end: bool = True,
        save_adapter_to: str | None = None,
        save_merged_to: str | None = None,
        adapter_name: str = "default",
    ) -> None:
        config = LoHaConfig.from_arguments(locals())
        super().__init__(config, adapter_name, module, merge_on_train_end, save_adapter_to, save_merged_to)


class LoKrCallback(PEFTCallback):
    """Fine-tune with LoKr (a Kronecker product of a small and a low-rank matrix): inject at ``setup``, train only
    its tensors (+ the task head), merge into a plain model at the end.

    See :mod:`peft_callbacks.methods.lokr` for the method and :class:`PEFTCallback` for what happens when.

    Args:
        rank: the rank ``r`` of the factored matrices (> 0).
        alpha: the update is scaled by ``alpha / rank`` (> 0).
        rank_dropout: probability of zeroing each output row of the update during training, in ``[0, 1)``.
        module_dropout: probability of skipping a layer's whole update for one training step, in ``[0, 1)``.
        use_effective_conv2d: factor convolution kernels larger than 1 through a core tensor.
        decompose_both: also factor the left Kronecker matrix when that is smaller.
        decompose_factor: split each width as ``(f, width / f)``; ``-1`` splits near the square root.
        rank_dropout_scale: rescale the rows ``rank_dropout`` keeps by the inverse of the kept fraction.
        target_modules: ``None`` (every Linear/Conv/``Conv1D`` outside the head, so CNNs work too),
            ``"all-linear"``, a name, a regex or a list (see :mod:`peft_callbacks.core.targets`).
        exclude_modules: patterns of modules to leave alone.
        train_head: keep the task head fully trainable.
        train_bn: let BatchNorm layers train; by default their running statistics stay frozen.
        module: dotted path of the submodule to adapt; by default every timm/transformers model found.
        merge_on_train_end: fold LoKr into the base weights when training ends.
        save_adapter_to: directory for the adapter file, written before the merge.
        save_merged_to: directory for the merged model's weights, written after the merge.
        adapter_name: the name of the adapter (several can share a model).

    Example::

        >>> import lightning as L, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from peft_callbacks.demo import ImageClassifier
        >>> data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=4)
        >>> lokr = LoKrCallback(rank=4, decompose_both=True)
        >>> trainer = L.Trainer(max_steps=2, callbacks=[lokr], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(ImageClassifier("test_resnet", num_classes=3), data)
        >>> lokr.parameter_count.percent < 25
        True
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 8.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        use_effective_conv2d: bool = False,
        decompose_both: bool = False,
        decompose_factor: int = -1,
        rank_dropout_scale: bool = False,
        target_modules: str | list[str] | None = None,
        exclude_modules: str | list[str] | None = None,
        train_head: bool = True,
        train_bn: bool = False,
        module: str | None = None,
        merge_on_train_end: bool = True,
        save_adapter_to: str | None = None,
        save_merged_to: str | None = None,
        adapter_name: str = "default",
    ) -> None:
        config = LoKrConfig.from_arguments(locals())
        super().__init__(config, adapter_name, module, merge_on_train_end, save_adapter_to, save_merged_to)


class OFTCallback(PEFTCallback):
    """Fine-tune with OFT (a learned block-diagonal orthogonal rotation of each adapted layer's input): inject at
    ``setup``, train only the rotations (+ the task head), merge into a plain model at the end.

    See :mod:`peft_callbacks.methods.oft` for the method and :class:`PEFTCallback` for what happens when.

    Args:
        oft_block_size: the size of each rotation block (>= 0); give this or ``rank``, the other 0.
        rank: the number of blocks per layer (>= 0).
        module_dropout: during training, the probability of each block being replaced by the identity, in ``[0, 1)``.
        coft: constrained OFT: keep each rotation within ``eps`` of the identity.
        eps: the radius of ``coft``'s constraint (> 0).
        block_share: one block shared by all blocks of a layer.
        use_cayley_neumann: the Cayley transform by its Neumann series (PEFT's default) instead of the exact inverse.
        num_cayley_neumann_terms: terms of that series (>= 2).
        target_modules: ``None`` (every Linear/Conv/``Conv1D`` outside the head, so CNNs work too),
            ``"all-linear"``, a name, a regex or a list (see :mod:`peft_callbacks.core.targets`).
        exclude_modules: patterns of modules to leave alone.
        train_head: keep the task head fully trainable.
        train_bn: let BatchNorm layers train; by default their running statistics stay frozen.
        module: dotted path of the submodule to adapt; by default every timm/transformers model found.
        merge_on_train_end: fold the rotations into the base weights when training ends.
        save_adapter_to: directory for the adapter file, written before the merge.
        save_merged_to: directory for the merged model's weights, written after the merge.
        adapter_name: the name of the adapter (several can share a model).

    Example::

        >>> import lightning as L, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from peft_callbacks.demo import ImageClassifier
        >>> data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=4)
        >>> oft = OFTCallback(oft_block_size=8)
        >>> trainer = L.Trainer(max_steps=2, callbacks=[oft], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(ImageClassifier("test_resnet", num_classes=3), data)
        >>> oft.parameter_count.percent < 25
        True
    """

    def __init__(
        self,
        oft_block_size: int = 32,
        rank: int = 0,
        module_dropout: float = 0.0,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        use_cayley_neumann: bool = True,
        num_cayley_neumann_terms: int = 5,
        target_modules: str | list[str] | None = None,
        exclude_modules: str | list[str] | None = None,
        train_head: bool = True,
        train_bn: bool = False,
        module: str | None = None,
        merge_on_train_end: bool = True,
        save_adapter_to: str | None = None,
        save_merged_to: str | None = None,
        adapter_name: str = "default",
    ) -> None:
        config = OFTConfig.from_arguments(locals())
        super().__init__(config, adapter_name, module, merge_on_train_end, save_adapter_to, save_merged_to)
