"""``PEFTCallback``: any registered PEFT method, applied to an unchanged LightningModule by one callback.

The typed callbacks (``LoRACallback``, ``AdapterCallback``, …) are this callback with their method's settings as
``__init__`` arguments, which is what LightningCLI needs to check a YAML file
(:func:`~peft_callbacks.callbacks.options.typed_callback`); any registered method, one of your own included, is
usable from code or YAML through its config::

    trainer:
      callbacks:
        - class_path: peft_callbacks.PEFTCallback
          init_args:
            config: {class_path: peft_callbacks.LoRAConfig, init_args: {rank: 8}}
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.nn.modules.batchnorm import _BatchNorm

from peft_callbacks.callbacks.base import SurgeryCallback
from peft_callbacks.callbacks.options import CallbackOptions
from peft_callbacks.callbacks.verify import verify_merge
from peft_callbacks.core import quantized
from peft_callbacks.core.models import find_models
from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.core.params import unfreeze_batchnorm_stats
from peft_callbacks.core.recipe import surgery_records
from peft_callbacks.core.sharding import full_tensor
from peft_callbacks.engine import DEFAULT_ADAPTER, MethodConfig, get_method, inject, merge, replay
from peft_callbacks.engine.adapters import adapter_names, set_adapter
from peft_callbacks.engine.arguments import takes_settings
from peft_callbacks.engine.surgery import apply_batchnorm_rule, check_config
from peft_callbacks.engine.usage import drop_adapters, reset_usage, uncalled_layers
from peft_callbacks.forgetting.verify import ArtifactCheck
from peft_callbacks.io.adapter_file import save_adapter
from peft_callbacks.io.checkpoint import read_record
from peft_callbacks.plumbing.checkpoint_hooks import install_checkpoint_hook, restore_checkpoint, write_outside_fit
from peft_callbacks.plumbing.hooks import run_after_conversion, run_after_hook
from peft_callbacks.plumbing.strategies import strategy_kind

log = logging.getLogger(__name__)

__all__ = ["PEFTCallback"]


@takes_settings(CallbackOptions)
class PEFTCallback(SurgeryCallback):
    """Fine-tune with any PEFT method: inject at ``setup``, train only its tensors (+ the task head), and for
    mergeable methods merge at the end.

    Surgery runs right after the module's ``setup``/``configure_model`` (networks built there are adapted too) and
    before a checkpoint is restored and optimizers are built, so ``trainer.fit(ckpt_path=...)`` resumes the adapter.
    Mergeable methods (LoRA, DoRA, …) are folded into the base weights at ``on_train_end`` (float32, finite-checked):
    the module is a plain model again, and ``trainer.test(ckpt_path=...)`` afterwards replays the recipe saved in the
    checkpoint to load the unmerged tensors, then merges again. Methods that stay in the model (adapters, prompts) are
    applied before ``validate`` / ``test`` / ``predict`` too.

    After the first optimizer step a rank-zero warning names every adapted module whose tensors got no gradient (a
    frozen BatchNorm with zero scale, a layer the model never calls), so an adapter that cannot train never goes
    unnoticed; where a frozen all-zero BatchNorm scale in its block is the cause, it names the fix (``train_bn=True``).
    Adapters behind a *trainable* zero scale get no gradient at the first step only, so they are looked at again
    after the second. Before that warning, layers whose weight the model reads directly but never calls (an MoE router
    computing ``F.linear(h, gate.weight)``) lose this adapter, with a log line: it would never run, and merging it
    would change the model (:mod:`peft_callbacks.engine.usage`); a resumed run leaves them out again.

    **Quantized bases** (bitsandbytes 4-/8-bit layers, QLoRA): the adapters train around the frozen quantized layers.
    At the end the adapter stays unmerged by default, because rounding a merged weight back into 4 or 8 bits would
    lose most of the update: it is saved (to ``save_adapter_to``, else ``<log_dir>/adapter``) and a log line says
    so. With ``merged_dtype`` the model is merged into a plain model of that dtype instead, from the dequantized
    weights; ``save_merged_to`` then writes it.

    Args:
        config: the method and its settings, e.g. ``LoRAConfig(rank=8)`` or ``BottleneckConfig(bottleneck=16)``.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from peft_callbacks import LoRAConfig
        >>> from peft_callbacks.demo import ImageClassifier, quiet_trainer  # a LightningModule wrapping a timm model
        >>> data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=4)
        >>> callback = PEFTCallback(LoRAConfig(rank=4))
        >>> trainer = quiet_trainer(max_steps=2, callbacks=[callback])
        >>> trainer.fit(ImageClassifier("test_resnet", num_classes=3), data)
        >>> callback.parameter_count.percent < 25
        True
    """

    def __init__(self, config: MethodConfig, options: CallbackOptions) -> None:
        self._configure(config, options)

    def _configure(self, config: MethodConfig, options: CallbackOptions) -> None:
        """Take a method's config and the options (what the ``__init__`` of every typed callback calls)."""
        super().__init__(
            module=options.module, save_adapter_to=options.save_adapter_to, save_merged_to=options.save_merged_to
        )
        self.config = check_config(config)
        options.check_for(self.config)
        self.adapter_name = options.adapter_name
        self.merge_on_train_end = options.merge_on_train_end
        self.merged_dtype = options.merged_dtype
        self.verify = options.verify
        self.verification: ArtifactCheck | None = None  # what the check of the last merge found
        self.kept_adapter = False  # the last fit ended with the adapter unmerged (quantized base, refused merge)
        self.recipes: dict[str, list[dict[str, Any]]] = {}
        self._reinjected = False
        self._gradients_checked = False
        self._waiting: list[str] | None = None  # adapters looked at again at the second step

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("config")
        if config is not None and name in {f.name for f in dataclasses.fields(config)}:
            return getattr(config, name)  # callback.rank reads the config's rank
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def method(self):
        """The registered method this callback applies."""
        return get_method(self.config)

    # -- surgery ----------------------------------------------------------------------------------------------------
    def apply(self, model: nn.Module, path: str) -> None:
        inject(model, self.config, adapter_name=self.adapter_name)

    def applied_config(self) -> MethodConfig:
        """The config :meth:`apply` records on the model (``config``; a subclass may store another, e.g. EVA's)."""
        return self.config

    def is_applied(self, model: nn.Module) -> bool:
        records = [
            r
            for r in surgery_records(model)
            if r["method"] == self.method.name and r.get("adapter_name", DEFAULT_ADAPTER) == self.adapter_name
        ]
        if not records:
            applied = bool(self.method.modules(model, self.adapter_name))
            if applied:
                apply_batchnorm_rule(model, self.config)
            return applied
        saved = {k: v for k, v in records[-1]["config"].items() if k not in ("targets", "modules")}
        targets = records[-1]["config"].get("targets") or []  # patterns resolved as the recipe holds them
        config = self.applied_config()
        wanted = (self.method.resolve(model, config, targets) if targets else config).to_dict()
        if saved != wanted:
            changed = {k: (saved.get(k), wanted.get(k)) for k in wanted if saved.get(k) != wanted.get(k)}
            raise ValueError(
                f"{self.name}: the model already carries {self.method.title} adapter {self.adapter_name!r} with other "
                f"settings ({', '.join(f'{k}: {a!r} there, {b!r} here' for k, (a, b) in changed.items())}). Merge or "
                f"unload it first, or use the same settings to continue training it."
            )
        apply_batchnorm_rule(model, self.config)  # a second fit on the same module: BatchNorm frozen as in the first
        return True

    def run_surgery(self, pl_module: nn.Module, trainer: pl.Trainer | None = None) -> None:
        needs_dtype = self.save_merged_to and self.merged_dtype is None and self._merges()
        if needs_dtype and quantized.holds_quantized(pl_module):
            raise ValueError(
                f"{self.name}(save_merged_to={self.save_merged_to!r}) on a quantized base needs `merged_dtype` "
                f"('bfloat16', 'float16' or 'float32'): the merged model is written as a plain model of that dtype, "
                f"from the dequantized weights. Without it the adapter stays unmerged (rounding the merge back into "
                f"the quantized weights would lose most of the update); use `save_adapter_to` for it."
            )
        super().run_surgery(pl_module, trainer)
        self.recipes = {path: surgery_records(model) for path, model in find_models(pl_module, self.module)}
        for _, model in find_models(pl_module, self.module):
            if len(adapter_names(model)) > 1:  # another task's adapter is kept, inactive and frozen, while this trains
                set_adapter(model, self.adapter_name)

    def _other_adapters(self, pl_module: nn.Module) -> list[str]:
        return [n for n in adapter_names(pl_module) if n != self.adapter_name]

    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.verification, self.kept_adapter = None, False
        others = self._other_adapters(pl_module) if self._merges() else []
        if others:
            rank_zero_info(
                f"{self.name}: the model also holds adapters {others}; {self.adapter_name!r} stays unmerged."
            )
        elif self._merges():
            self._merge(pl_module, trainer)
        unfreeze_batchnorm_stats(pl_module)  # training is over: BatchNorm layers behave as usual again

    def _merges(self) -> bool:
        return self.method.mergeable and self.merge_on_train_end

    def _merge(self, pl_module: nn.Module, trainer: pl.Trainer | None = None) -> None:
        """Merge as configured; on a quantized base without ``merged_dtype`` keep the adapter (saved) instead. With
        ``verify``, a merged copy is checked first and a merge that moves a score too far is refused."""
        quantized_kept = []
        if self.merged_dtype is None:
            layers = self.method.modules(pl_module)
            quantized_kept = sorted(
                {quantized.quantization_label(m.base_layer) for m in layers.values() if _is_quantized(m)}
            )
        if not quantized_kept:
            if trainer is not None and self.verify is not None:
                self.verification = verify_merge(
                    self.verify, trainer, pl_module, self._merge_into, self.name, self.module
                )
                if self.verification is not None and not self.verification.accepted:
                    self._keep_adapter(
                        pl_module,
                        trainer,
                        f"the merge was refused: it moved a score by more than "
                        f"tolerance={self.verification.tolerance:g}",
                    )
                    return
            self._merge_into(pl_module)
            return
        if trainer is None:
            return  # after validate/test: the adapter stays, as after fit
        self._keep_adapter(
            pl_module,
            trainer,
            f"the base is quantized (bitsandbytes {', '.join(quantized_kept)}), so {self.method.title} stays "
            f"unmerged: rounding merged weights back into the quantized format would lose most of the update",
            hint="merged_dtype='bfloat16' for a merged plain model (from the dequantized weights)",
        )

    def _merge_into(self, pl_module: nn.Module) -> None:
        """The merge itself: into each found model in ``merged_dtype``, else in place."""
        if self.merged_dtype is not None:
            for _, model in find_models(pl_module, self.module):
                merge(model, method=self.method.name, dtype=self.merged_dtype)
        else:
            merge(pl_module, method=self.method.name)

    def _keep_adapter(self, pl_module: nn.Module, trainer: pl.Trainer, reason: str, hint: str = "") -> None:
        """Leave the adapter unmerged and saved (to ``save_adapter_to``, else ``<log_dir>/adapter``), saying why."""
        self.kept_adapter = True
        directory = self.save_adapter_to
        if directory is None:
            directory = os.path.join(trainer.log_dir or trainer.default_root_dir, "adapter")
            if trainer.is_global_zero:
                save_adapter(pl_module, directory)
        rank_zero_info(
            f"{self.name}: {reason}. The adapter is saved in {directory}; load it onto the same base with "
            f"load_adapter" + (f", or pass {hint}." if hint else ".")
        )

    def save_models(self, pl_module: nn.Module, directory: str) -> None:
        if self.kept_adapter and self.verification is not None:
            rank_zero_info(f"{self.name}: the merge was refused, so no merged model is written to {directory}.")
            return
        super().save_models(pl_module, directory)

    # -- gradients reach every adapter ----------------------------------------------------------------------------
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)  # the distributed run-time check
        if self._gradients_checked:
            return
        if self._waiting is None:  # the first step
            self._drop_uncalled(trainer, pl_module)
        if strategy_kind(trainer) in ("fsdp", "deepspeed"):
            self._gradients_checked = True
            return  # their gradients live in flat buffers, not in `.grad` of each tensor
        silent = _modules_without_gradient(pl_module, self.method)
        if self._waiting is not None:  # second step: the adapters that waited for a BatchNorm scale to leave zero
            silent, self._gradients_checked = [p for p in silent if p in self._waiting], True
            if silent:
                rank_zero_warn(_no_gradient_message(self.name, silent, "second", {}, ""))
            return
        roots = {path for path, _ in find_models(pl_module, self.module)} | {""}
        blocked = _behind_zero_scale_batchnorm(pl_module, silent, roots)
        # a trainable BatchNorm scale at zero passes no gradient at the first step but moves then: look again after it
        self._waiting = [p for p in silent if blocked.get(p) is False]
        self._gradients_checked = not self._waiting
        silent = [p for p in silent if p not in self._waiting]
        if silent:
            rank_zero_warn(_no_gradient_message(self.name, silent, "first", blocked, self._train_bn_fix()))

    def _train_bn_fix(self) -> str:
        """How this callback is written to let BatchNorm layers train: ``LoRACallback(train_bn=True)``."""
        if "train_bn" in inspect.signature(type(self).__init__).parameters:
            return f"{self.name}(train_bn=True)"
        return f"PEFTCallback({type(self.config).__name__}(..., train_bn=True))"

    # -- layers the model never calls ------------------------------------------------------------------------------
    drops_uncalled = True  # AdaLoRA's rank allocator holds its layers from fit start: it keeps them (never merged)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reset_usage(pl_module)  # reads of `.weight` while the model was set up say nothing about its forward

    def _drop_uncalled(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the first step's forwards: drop this adapter from layers the model reads but never calls."""
        paths = uncalled_layers(pl_module)
        if not paths:
            return
        shown = ", ".join(paths[:8]) + (", …" if len(paths) > 8 else "")
        if not self.drops_uncalled or strategy_kind(trainer) in ("fsdp", "deepspeed"):
            rank_zero_warn(
                f"{self.name}: the model reads the weight of {len(paths)} adapted layer(s) directly and never calls "
                f"them ({shown}), so their adapters never run; they are kept but will not be merged. Leave them out "
                f"with `exclude_modules`."
            )
            return
        modules = dict(pl_module.named_modules())
        adapters = [modules[p].adapters[self.adapter_name] for p in paths if self.adapter_name in modules[p].adapters]
        removed = {id(t) for a in adapters for t in a.parameters()}
        dropped = drop_adapters(pl_module, paths, self.adapter_name)
        forget_parameters(trainer.optimizers, removed)
        self.recipes = {path: surgery_records(model) for path, model in find_models(pl_module, self.module)}
        rank_zero_info(
            f"{self.name}: left out {len(dropped)} layer(s) the model never calls ({shown}): it reads their weight "
            f"directly (e.g. F.linear(h, layer.weight)), so their {self.method.title} adapter would never run, and a "
            f"merge would change what the model computes. Exclude them with `exclude_modules` to skip this step."
        )

    # -- validate / test / predict ------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._gradients_checked, self._waiting = False, None
        if stage == "fit":  # checkpoints hold the plain model (see plumbing/checkpoint_hooks.py)
            install_checkpoint_hook(pl_module, owner=self)
        elif not self.method.mergeable:  # the surgery stays in the model: redo it so a checkpoint's tensors fit
            run_after_conversion(trainer, pl_module, lambda: self.run_surgery(pl_module, trainer), owner=self)
        else:
            run_after_hook(pl_module, "on_load_checkpoint", lambda ckpt: self._reinject(pl_module, ckpt), owner=self)
        # a checkpoint in the plain layout goes back to the adapted one where the module carries the surgery
        run_after_hook(pl_module, "on_load_checkpoint", lambda ckpt: restore_checkpoint(pl_module, ckpt), owner=self)

    def _reinject(self, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """A checkpoint written mid-training holds unmerged tensors, a merged model has none: replay the recipe the
        checkpoint recorded so that ``trainer.test(ckpt_path="best")`` loads, and merge again at ``teardown``."""
        if any(isinstance(m, PEFTModule) for m in pl_module.modules()):
            return
        record = read_record(checkpoint)
        if record is not None and record["layout"] == "merged":
            return  # the plain model: it loads as it is
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        recipes = record["recipes"] if record is not None else state.get("recipes")
        if not recipes:
            if not any(".lora_A." in k or ".adapters." in k for k in checkpoint.get("state_dict", {})):
                return  # a checkpoint of the merged (or never adapted) model
            self.run_surgery(pl_module)  # written by an older version: the same surgery finds the same layers
        else:
            for path, records in recipes.items():
                replay(pl_module.get_submodule(path) if path else pl_module, records)
        self._reinjected = True
        rank_zero_info(f"{self.name}: re-created the adapter to load the checkpoint.")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._reinjected and self.merge_on_train_end:
            self._merge(pl_module)
        self._reinjected = False

    writes_plain_checkpoints = True  # see plumbing/checkpoint_hooks.py: write_outside_fit

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        write_outside_fit(trainer, self, checkpoint)  # e.g. trainer.save_checkpoint after fit

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["method"] = self.method.name
        state["adapter_name"] = self.adapter_name
        state["config"] = self.config.to_dict(all_fields=True)
        state["recipes"] = self.recipes
        return state


def forget_parameters(optimizers: list[torch.optim.Optimizer], removed: set[int]) -> None:
    """Take the tensors whose ``id`` is in ``removed`` out of every param group and state of ``optimizers``."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in removed]
        for p in [p for p in optimizer.state if id(p) in removed]:
            del optimizer.state[p]


def _modules_without_gradient(pl_module: nn.Module, method) -> list[str]:
    """Paths of the method's modules with trainable tensors none of which got a non-zero gradient."""
    silent = []
    for path, module in method.modules(pl_module).items():
        params = [p for p in module.parameters() if p.requires_grad and not _is_base(module, p)]
        # an FSDP2 gradient is a shard: gathered (every rank runs this hook, in the same order) before looking at it
        grads = [None if p.grad is None else full_tensor(p.grad) for p in params]
        if params and all(g is None or not bool(g.any()) for g in grads):
            silent.append(path)
    return silent


def _is_quantized(layer: nn.Module) -> bool:
    base = layer._modules.get("base_layer")
    return base is not None and quantized.stores_quantized(base)


def _is_base(module: nn.Module, param: torch.Tensor) -> bool:
    base = module._modules.get("base_layer")
    return base is not None and any(param is p for p in base.parameters())


def _behind_zero_scale_batchnorm(pl_module: nn.Module, paths: list[str], roots: set[str]) -> dict[str, bool]:
    """``{path: frozen}`` for the modules of ``paths`` whose block holds a BatchNorm with an all-zero scale.

    The block is the nearest enclosing module that holds a BatchNorm (a ResNet block for a conv inside it), below the
    model itself (``roots``: the adapted models' paths; a whole ResNet holds such BatchNorms everywhere). Such a
    scale (timm zero-initialises the last BatchNorm of each residual block of a model trained from scratch) passes no
    gradient back; ``frozen`` says whether the scale stays (a trainable one leaves zero after the first step).
    """
    found = {}
    for path in paths:
        parts = path.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            if ".".join(parts[:depth]) in roots:
                break
            block = pl_module.get_submodule(".".join(parts[:depth]))
            norms = [m for m in block.modules() if isinstance(m, _BatchNorm)]
            if not norms:
                continue
            # an FSDP2 weight is a shard: gathered (every rank looks at the same blocks, in the same order)
            zero = [m.weight for m in norms if m.weight is not None and not bool(full_tensor(m.weight.detach()).any())]
            if zero:
                found[path] = not any(w.requires_grad for w in zero)
            break
    return found


def _no_gradient_message(name: str, silent: list[str], step: str, blocked: dict[str, bool], fix: str) -> str:
    """The warning: the silent modules, then the fix where a frozen zero BatchNorm scale is the cause, else the usual
    causes."""
    listed = ", ".join(silent[:8]) + (f" and {len(silent) - 8} more" if len(silent) > 8 else "")
    message = f"{name}: after the {step} step, {len(silent)} adapted module(s) got no gradient and will not train: "
    message += f"{listed}."
    frozen = [p for p in silent if blocked.get(p) is True]
    if frozen:
        message += (
            f" {_how_many(len(frozen), len(silent))} in blocks whose BatchNorm has an all-zero, frozen scale (timm "
            f"zero-initialises the last BatchNorm of each residual block of a model built from scratch), which blocks "
            f"their gradient: let BatchNorm layers train so those scales can move, with {fix}."
        )
    if len(frozen) < len(silent):
        message += (
            f" Usual causes{' for the others' if frozen else ''}: the model never calls the layer, or a frozen layer "
            f"after it blocks the gradient (e.g. a BatchNorm with zero scale, as timm initialises ResNets)."
        )
    others = ", or train those layers" if len(frozen) < len(silent) else ""
    return f"{message} Otherwise leave them out with `exclude_modules`{others}."


def _how_many(part: int, whole: int) -> str:
    if part == whole:
        return "All of them sit" if whole > 1 else "It sits"
    return f"{part} of them sit" if part > 1 else "One of them sits"
