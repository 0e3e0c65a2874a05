"""``SlimCheckpoint``: Lightning checkpoints that hold only the trained tensors (plus optimizer and loop state)."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from peft_callbacks.io.fingerprint import base_fingerprint, compare_fingerprints
from peft_callbacks.io.slim import SLIM_CHECKPOINT_KEY, fill_slim_state_dict, slim_state_dict
from peft_callbacks.plumbing import seam
from peft_callbacks.plumbing.checkpoint_hooks import write_outside_fit
from peft_callbacks.plumbing.checkpoint_io import use_atomic_checkpoint_io
from peft_callbacks.plumbing.hooks import run_after_hook
from peft_callbacks.plumbing.slim_loading import install_slim_loader
from peft_callbacks.plumbing.strategies import strategy_kind

log = logging.getLogger(__name__)

CHECKPOINT_KEY = SLIM_CHECKPOINT_KEY

__all__ = ["CHECKPOINT_KEY", "SlimCheckpoint"]


class SlimCheckpoint(Callback):
    """Keep only trainable/PEFT tensors in every checkpoint; refill the frozen base from the module when loading.

    With LoRA the base model is frozen, so each checkpoint written by ``ModelCheckpoint`` (or
    ``trainer.save_checkpoint``) needs only the LoRA factors, the trained head, and the optimizer and loop state.
    When such a checkpoint is loaded (``trainer.fit(..., ckpt_path=...)``, ``trainer.test(ckpt_path=...)``), the
    base tensors are taken from the LightningModule as built (same pretrained weights) after checking its base
    fingerprint, and the module loads the completed ``state_dict`` with Lightning's usual ``strict_loading``: nothing
    needs ``strict_loading = False``. Full checkpoints (written without this callback) load as before.

    Put it in the trainer of every run that writes or reads slim checkpoints, together with the PEFT callback.
    Outside a Trainer, :func:`~peft_callbacks.load_checkpoint` loads a slim checkpoint onto the module as built (a
    plain ``LightningModule.load_from_checkpoint`` fails with a message that names it: the base is not in the file).

    Under ``ModelParallelStrategy`` (FSDP2) checkpoints are distributed (one shard per rank, Lightning's default
    ``save_distributed_checkpoint=True``) and hold only the trained tensors' shards; resuming loads those into the
    sharded module and leaves its base as built. A slim checkpoint resumes under another strategy or number of ranks
    too (FSDP2 ↔ DDP ↔ one process, :mod:`peft_callbacks.plumbing.slim_loading`). ``FSDPStrategy`` and DeepSpeed
    write checkpoints in their own formats and are refused: use their full checkpoints, or ``ModelParallelStrategy``.

    Example::

        >>> import lightning as L, os, tempfile, timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from peft_callbacks import LoRACallback
        >>> class Classifier(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         torch.manual_seed(0)
        ...         self.model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
        ...     def training_step(self, batch, batch_idx):
        ...         return torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1])
        ...     def configure_optimizers(self):
        ...         return torch.optim.AdamW(self.parameters(), lr=1e-3)
        >>> data = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))), batch_size=2)
        >>> def trainer(steps):
        ...     callbacks = [LoRACallback(rank=4, merge_on_train_end=False), SlimCheckpoint()]
        ...     return L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> first, module = trainer(2), Classifier()
        >>> first.fit(module, data)
        >>> path = os.path.join(tempfile.mkdtemp(), "slim.ckpt")
        >>> first.save_checkpoint(path)
        >>> len(torch.load(path, weights_only=True)["state_dict"]), len(module.state_dict())  # + the loader key
        (33, 122)
        >>> trainer(3).fit(Classifier(), data, ckpt_path=path)  # resumes at step 2 onto the base as built
    """

    def __init__(self) -> None:
        self._fingerprint: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        kind = strategy_kind(trainer)
        if kind in ("fsdp", "deepspeed"):
            raise ValueError(
                f"SlimCheckpoint does not support {type(trainer.strategy).__name__}: it writes checkpoints in its own "
                f"sharded format. Remove SlimCheckpoint (full checkpoints), or shard with ModelParallelStrategy "
                f"(FSDP2), whose distributed checkpoints SlimCheckpoint keeps slim."
            )
        if kind == "fsdp2" and not trainer.strategy._save_distributed_checkpoint:
            raise ValueError(
                "SlimCheckpoint with ModelParallelStrategy needs distributed checkpoints: use "
                "ModelParallelStrategy(save_distributed_checkpoint=True) (the default), or remove SlimCheckpoint."
            )
        self._fingerprint = None
        # a checkpoint killed mid-write never replaces the last good one
        use_atomic_checkpoint_io(trainer.strategy, owner=self)
        run_after_hook(pl_module, "on_load_checkpoint", lambda ckpt: self._fill(pl_module, ckpt), owner=self)
        # a checkpoint of another strategy's layout too
        install_slim_loader(trainer.strategy, kind, CHECKPOINT_KEY, owner=self)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        seam.undo(self)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        seam.undo(self)  # Lightning calls no teardown after an exception

    writes_plain_checkpoints = False  # but it shapes them: see plumbing/checkpoint_hooks.py, write_outside_fit

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._slim(pl_module, checkpoint)
        write_outside_fit(trainer, self, checkpoint)  # the PEFT callbacks' layout, written after this, outside fit

    def _slim(self, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        fingerprint = base_fingerprint(pl_module, hash_names=(self._fingerprint or {}).get("hashes"))
        if self._fingerprint is None:
            self._fingerprint = fingerprint
        elif compare_fingerprints(self._fingerprint, fingerprint):
            # e.g. LoRA was merged at the end of fit: the base is no longer the one built, so keep it all
            log.info("SlimCheckpoint: the base weights changed during this run; writing a full checkpoint.")
            return
        state = checkpoint["state_dict"]
        before = len(state)
        checkpoint[CHECKPOINT_KEY] = slim_state_dict(pl_module, state, fingerprint)
        log.debug("SlimCheckpoint: kept %d of %d tensors.", len(state), before)

    def _fill(self, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        record = checkpoint.get(CHECKPOINT_KEY)
        if record is not None and "state_dict" in checkpoint:
            fill_slim_state_dict(pl_module, checkpoint["state_dict"], record)
            log.info("SlimCheckpoint: restored %d base tensor(s) from the module.", len(record["omitted"]))
