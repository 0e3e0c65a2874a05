"""Plain LightningModules used by the demos and the YAML examples: nothing in them knows about PEFT.

* :class:`ImageClassifier` — a timm model with a classification head; ``init_from`` loads earlier weights (a base
  task's) into everything whose shape still fits, the way a pretrained checkpoint would be used.
* :class:`TextClassifier` — a transformers encoder (all-MiniLM-L6-v2 by default, real weights shipped offline),
  mean-pooled into a sentence embedding, then a linear head.

Their ``configure_optimizers`` hand only trainable parameters to the optimizer, so any callback that freezes layers
before the optimizer is built is respected.

Example::

    >>> import torch
    >>> model = ImageClassifier("test_convnext", num_classes=5)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 5])
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from peft_callbacks._validation import check_optional_str, check_positive_float, check_positive_int

log = logging.getLogger(__name__)


def load_matching_weights(model: nn.Module, path: str, prefix: str | None = None) -> list[str]:
    """Load the tensors of a saved state dict into ``model`` where names and shapes match (in place).

    Args:
        model: the module to fill.
        path: a ``.safetensors`` file, a ``torch.save`` state dict, or a Lightning checkpoint (``"state_dict"``).
        prefix: strip this from saved names first; by default whichever of ``""`` and ``"model."`` (the weights
            of a whole :class:`ImageClassifier`, as the CLI or a Lightning checkpoint stores them) fits more tensors.

    Returns:
        The names of the model's tensors that were *not* loaded (a new head, for instance).
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        saved = load_file(path)
    else:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        saved = saved.get("state_dict", saved)
    own = model.state_dict()
    candidates = [prefix] if prefix is not None else ["", "model."]
    fits = max((_fitting(saved, own, p) for p in candidates), key=len)
    if not fits:
        raise ValueError(f"`init_from`={path!r} holds no tensor that fits {type(model).__name__}.")
    model.load_state_dict(fits, strict=False)
    missing = [k for k in own if k not in fits]
    log.info("Loaded %d tensors from %s; %d left as initialised: %s", len(fits), path, len(missing), missing[:6])
    return missing


def _fitting(saved: dict, own: dict, prefix: str) -> dict:
    stripped = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
    return {k: v for k, v in stripped.items() if k in own and own[k].shape == v.shape}


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class ImageClassifier(pl.LightningModule):
    """Image classification with any timm model (``pretrained=False``: weights come from ``init_from``).

    Args:
        model_name: a timm model name, e.g. ``"test_convnext"``, ``"resnet18"``.
        num_classes: classes of the task (the head is built for them).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        init_from: optional weights to start from (``.safetensors``, a state dict or a Lightning checkpoint of this
            class); tensors whose shape does not fit (the old head) are left as initialised.
        model_kwargs: further arguments of ``timm.create_model`` (``img_size``, ``depth``, …).
    """

    def __init__(
        self,
        model_name: str = "test_convnext",
        num_classes: int = 5,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        init_from: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = check_positive_float("lr", lr)
        self.weight_decay = weight_decay
        num_classes = check_positive_int("num_classes", num_classes)
        self.model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **(model_kwargs or {}))
        if check_optional_str("init_from", init_from):
            load_matching_weights(self.model, init_from)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(_trainable(self), lr=self.lr, weight_decay=self.weight_decay)


class TextClassifier(pl.LightningModule):
    """Sentence classification: transformers encoder → mean pooling over real tokens → linear head.

    Args:
        num_classes: classes of the task.
        encoder: a transformers model name or folder; default: all-MiniLM-L6-v2 (real weights, shipped offline).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        num_classes: int = 5,
        encoder: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        from peft_callbacks.demo.data import minilm_path

        self.save_hyperparameters()
        self.lr = check_positive_float("lr", lr)
        self.weight_decay = weight_decay
        # mean pooling replaces BERT's pooler, which would only hold unused (and untrained) weights
        name = check_optional_str("encoder", encoder) or minilm_path()
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the checkpoint's pooler weights are expected to go unused
        try:
            self.encoder = AutoModel.from_pretrained(name, add_pooling_layer=False)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.head = nn.Linear(self.encoder.config.hidden_size, check_positive_int("num_classes", num_classes))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings as sentence-transformers computes them: the mean of the real tokens' states."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}/acc", (logits.argmax(-1) == batch["labels"]).float().mean(), prog_bar=True)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(_trainable(self), lr=self.lr, weight_decay=self.weight_decay)
