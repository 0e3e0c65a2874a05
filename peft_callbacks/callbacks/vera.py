"""``VeRACallback``: VeRA fine-tuning of an unchanged LightningModule, merged into a plain model at the end."""

from __future__ import annotations

from peft_callbacks.callbacks.peft import PEFTCallback
from peft_callbacks.methods.vera import VeRAConfig

__all__ = ["VeRACallback"]


class VeRACallback(PEFTCallback):
    """Fine-tune with VeRA: two trained vectors per Linear / ``Conv1D`` layer around frozen random projections that
    all adapted layers share (:mod:`peft_callbacks.methods.vera`); merged into the base weights at the end.

    The projections are drawn from ``projection_prng_key`` and never stored: the adapter file holds the vectors and
    the seed (a reload draws the same projections). Layers are chosen as by :class:`~peft_callbacks.LoRACallback`,
    Linear and ``Conv1D`` only (as in HF PEFT); the task head trains in full by default.

    Args:
        rank: size ``r`` of the shared projections (> 0; PEFT's default 256).
        projection_prng_key: seed of the projections (>= 0).
        save_projection: store the projections in HF PEFT directories written by ``export_peft`` (PEFT's flag).
        dropout: dropout on the VeRA branch input, in ``[0, 1)``.
        d_initial: initial value of the ``vera_lambda_d`` entries (> 0).
        target_modules: ``None`` (every Linear/``Conv1D`` outside the head), ``"all-linear"``, names, regexes or a
            list (see :mod:`peft_callbacks.core.targets`).
        exclude_modules: patterns of modules to leave alone.
        train_head: keep the task head fully trainable.
        train_bn: let BatchNorm layers train (weights and running statistics).
        module: dotted path of the submodule to adapt; by default every timm/transformers model found.
        merge_on_train_end: fold VeRA into the base weights when training ends.
        save_adapter_to: directory for the adapter file, written before the merge.
        save_merged_to: directory for the merged model's weights, written after the merge.
        adapter_name: the name of the adapter (several can share a model).

    Example::

        >>> import lightning as L, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from peft_callbacks.demo import ImageClassifier  # any LightningModule; this one wraps a timm model
        >>> data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=4)
        >>> vera = VeRACallback(rank=32)
        >>> trainer = L.Trainer(max_steps=2, callbacks=[vera], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(ImageClassifier("test_vit", num_classes=3), data)
        >>> vera.parameter_count.trainable  # the vectors of every Linear layer + the 3-class head
        4035
    """

    def __init__(
        self,
        rank: int = 256,
        projection_prng_key: int = 0,
        save_projection: bool = True,
        dropout: float = 0.0,
        d_initial: float = 0.1,
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
        config = VeRAConfig.from_arguments(locals())
        super().__init__(config, adapter_name, module, merge_on_train_end, save_adapter_to, save_merged_to)
