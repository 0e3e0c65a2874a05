"""Prompt-tuning callbacks: soft prompts for transformers models, visual prompts (VPT) for timm ViTs.

Two callbacks rather than one that guesses: the two methods take different arguments (``init`` vs ``deep``) and
work on different families, and a YAML config should say which one it means. Each one tells the user about the
other when given the wrong kind of model.
"""

from __future__ import annotations

from typing import Any

from peft_callbacks.callbacks.peft import PEFTCallback
from peft_callbacks.methods.prompts.soft import PromptTuningConfig
from peft_callbacks.methods.prompts.visual import VisualPromptConfig


class PromptTuningCallback(PEFTCallback):
    """Prompt tuning (Lester et al. 2021) for the transformers models inside a LightningModule.

    ``num_virtual_tokens`` learned embeddings are put in front of every input; ``attention_mask``,
    ``token_type_ids``, ``position_ids`` and token-level ``labels`` (``-100``) are extended inside the model call
    and the prompt positions are dropped from token-level ``logits``, so the module's ``training_step`` stays as it
    is. The rest of the model is frozen (the task head stays trainable unless ``train_head=False``).

    Args:
        num_virtual_tokens: prompt length ``n`` (> 0).
        init: ``"random"``, ``"vocab"`` (embeddings of random vocabulary tokens) or a text to start from (needs
            ``tokenizer`` or ``init_token_ids``).
        init_token_ids: token ids to start the prompt from (repeated to length ``n``).
        tokenizer: a tokenizer for a text ``init``.
        train_head: keep the task head (``classifier``, ``score``, …) trainable.
        module: dotted path of the submodule to adapt; by default every transformers model found.
        save_adapter_to: directory to write the adapter file to when training ends (see :func:`save_adapter`).
        save_merged_to: directory to write the adapted model's full weights to when training ends.

    Example::

        >>> import torch, transformers as hf
        >>> from peft_callbacks.demo import quiet_trainer
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> import lightning as L
        >>> class LM(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         cfg = hf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, bos_token_id=1, eos_token_id=1)
        ...         self.model = hf.GPT2LMHeadModel(cfg)
        ...     def training_step(self, batch, batch_idx):
        ...         (ids,) = batch
        ...         return self.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        ...     def configure_optimizers(self):
        ...         return torch.optim.AdamW(self.parameters(), lr=1e-2)
        >>> data = DataLoader(TensorDataset(torch.randint(3, 50, (8, 6))), batch_size=4)
        >>> prompts = PromptTuningCallback(num_virtual_tokens=5)
        >>> trainer = quiet_trainer(max_steps=2, callbacks=[prompts])
        >>> trainer.fit(LM(), data)
        >>> prompts.parameter_count.trainable  # 5 tokens x 32 dims
        160
    """

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        init: str = "random",
        init_token_ids: list[int] | None = None,
        tokenizer: Any = None,
        train_head: bool = True,
        module: str | None = None,
        save_adapter_to: str | None = None,
        save_merged_to: str | None = None,
    ) -> None:
        config = PromptTuningConfig.from_arguments(locals())
        super().__init__(config, module=module, save_adapter_to=save_adapter_to, save_merged_to=save_merged_to)


class VisualPromptCallback(PEFTCallback):
    """Visual prompt tuning (VPT, Jia et al. 2022) for the timm Vision Transformers inside a LightningModule.

    Learned tokens go after the class/register tokens before the first block (shallow) or before every block
    (deep) and are taken out after the last block, so pooling and the head see what they saw before. The rest of
    the model is frozen (the classifier stays trainable unless ``train_head=False``).

    Args:
        num_virtual_tokens: prompts per block ``n`` (> 0).
        deep: deep VPT (``L·n·d`` parameters) instead of shallow (``n·d``).
        dropout: dropout on the prompts, in ``[0, 1)``.
        train_head: keep the classifier trainable.
        module: dotted path of the submodule to adapt; by default every timm model found.
        save_adapter_to: directory to write the adapter file to when training ends (see :func:`save_adapter`).
        save_merged_to: directory to write the adapted model's full weights to when training ends.

    Example::

        >>> cb = VisualPromptCallback(num_virtual_tokens=10, deep=True)
        >>> cb.num_virtual_tokens, cb.deep
        (10, True)
    """

    def __init__(
        self,
        num_virtual_tokens: int = 10,
        deep: bool = False,
        dropout: float = 0.0,
        train_head: bool = True,
        module: str | None = None,
        save_adapter_to: str | None = None,
        save_merged_to: str | None = None,
    ) -> None:
        config = VisualPromptConfig.from_arguments(locals())
        super().__init__(config, module=module, save_adapter_to=save_adapter_to, save_merged_to=save_merged_to)
