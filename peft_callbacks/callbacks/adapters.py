"""``AdapterCallback``: bottleneck adapters (Houlsby / Pfeiffer) for an unchanged LightningModule."""

from __future__ import annotations

from typing import Literal

from peft_callbacks.callbacks.peft import PEFTCallback
from peft_callbacks.methods.bottleneck.method import BottleneckConfig


class AdapterCallback(PEFTCallback):
    """Fine-tune with bottleneck adapters: only the adapters (+ the task head, + norms if asked) are trained.

    Adapters are inserted after the attention and MLP sub-layers of every transformer block (``"houlsby"``) or after
    the MLP only (``"pfeiffer"``) of the timm / transformers models inside the LightningModule, found by their block
    structure (see :mod:`peft_callbacks.methods.bottleneck.points`). Surgery runs right after ``configure_model``,
    before a checkpoint is restored and optimizers are built. Adapters cannot be merged: they stay in the model after
    training, and are what an adapter file stores.

    Args:
        bottleneck: bottleneck width ``m`` (> 0); each adapter has ``2·d·m + d + m`` parameters.
        placement: ``"houlsby"`` (after attention and MLP) or ``"pfeiffer"`` (after the MLP only).
        activation: ``"gelu"``, ``"relu"``, ``"silu"`` or ``"tanh"``.
        modules: names or regexes of the sub-layers to follow with an adapter, for models whose blocks are not
            recognised (overrides ``placement``).
        train_head: keep the task head trainable.
        train_norms: also train every LayerNorm / RMSNorm.
        module: dotted path of the submodule to adapt; by default every timm/transformers model found.
        save_adapter_to: directory to write the adapter file to when training ends (see :func:`save_adapter`).
        save_merged_to: directory to write the adapted model's full weights to when training ends.
        adapter_name: the name of the adapter (several can share a model).

    Example::

        >>> import lightning as L
        >>> from peft_callbacks.demo import ImageClassifier, quiet_trainer, random_loader  # any LightningModule, data
        >>> deit = dict(img_size=32, depth=2, embed_dim=32, num_heads=2)  # a tiny DeiT: 2 blocks of width 32
        >>> module = ImageClassifier("deit_tiny_patch16_224", num_classes=3, model_kwargs=deit)
        >>> data = random_loader(8, shape=(3, 32, 32), classes=3, batch_size=4)
        >>> adapters = AdapterCallback(bottleneck=4, placement="pfeiffer")
        >>> trainer = quiet_trainer(max_steps=2, callbacks=[adapters])
        >>> trainer.fit(module, data)
        >>> adapters.parameter_count.trainable  # 2 adapters x (2*32*4 + 32 + 4) + head 32*3 + 3
        683
    """

    def __init__(
        self,
        bottleneck: int = 64,
        placement: Literal["houlsby", "pfeiffer"] = "houlsby",
        activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu",
        modules: str | list[str] | None = None,
        train_head: bool = True,
        train_norms: bool = False,
        module: str | None = None,
        save_adapter_to: str | None = None,
        save_merged_to: str | None = None,
        adapter_name: str = "default",
    ) -> None:
        config = BottleneckConfig.from_arguments(locals())
        super().__init__(config, adapter_name, module, save_adapter_to=save_adapter_to, save_merged_to=save_merged_to)
