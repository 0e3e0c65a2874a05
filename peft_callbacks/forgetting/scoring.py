"""Score the base task on the model as it is now, and measure label-free drift from the baseline outputs.

:class:`BaseTaskScorer` runs a held-out base-task loader through the current backbone (and the frozen original
head, when one is given), under ``torch.no_grad()`` in eval mode, restoring every module's train/eval mode
afterwards. A model without a head of its own (timm ``num_classes=0``, a transformers base model) is scored through
the wrapping module's ``forward``, ``forward_fn`` or ``base_head`` (:mod:`peft_callbacks.forgetting.headless`),
never by taking its features as class scores. The first call caches, per batch, the output distribution and the
pooled features (the input of the head, averaged over token positions for token-level heads; the output of a model
without a head); later calls report the KL divergence
``KL(p_baseline || p_now)`` and the cosine similarity of the features to those cached at the first call, so drift is
measured even without base labels.

With several processes, batch ``i`` is scored by rank ``i % world_size`` and the torchmetrics states are summed
over ranks, so the figures equal a single-process run. A sharded model (FSDP2, ZeRO-3) gathers its weights in every
forward, a collective all ranks must join: then each rank runs as many forwards as the busiest one, the extra ones
on a batch it has already seen, their outputs left out.

Example::

    >>> import timm, torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    >>> loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=4)
    >>> scorer = BaseTaskScorer(model, metric="accuracy")
    >>> first = scorer.score(loader)
    >>> again = scorer.score(loader)
    >>> again.value == first.value, round(again.kl_to_baseline, 6), round(again.feature_cosine, 4)
    (True, 0.0, 1.0)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric, Metric

from peft_callbacks.core.heads import headless_reason
from peft_callbacks.core.models import defines_forward, family_of, find_models
from peft_callbacks.core.sharding import has_sharded_parameters
from peft_callbacks.forgetting.batches import (
    IGNORE_INDEX,
    call_model,
    language_model_labels,
    move_to_device,
    split_batch,
)
from peft_callbacks.forgetting.headless import (
    apply_feature_head,
    captured_output,
    check_scores_not_features,
    feature_head_from,
    headless_error,
)
from peft_callbacks.forgetting.metrics import build_metric, check_metric
from peft_callbacks.forgetting.original_heads import (
    base_heads_from,
    base_heads_from_file,
    captured_input,
    head_paths,
    output_size,
    swapped_heads,
)

ForwardFn = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class BaseTaskScore:
    """One evaluation of the base task.

    Attributes:
        value: the base-task metric (``None`` when no metric was asked for).
        kl_to_baseline: mean ``KL(p_baseline || p_now)`` per example (or token), ``None`` without drift.
        feature_cosine: mean cosine similarity of pooled features to the baseline's, ``None`` without drift.
        batches: batches scored (over all processes).
    """

    value: float | None
    kl_to_baseline: float | None
    feature_cosine: float | None
    batches: int


@contextlib.contextmanager
def evaluation_mode(module: nn.Module, grad: bool = False) -> Iterator[None]:
    """``module.eval()`` under ``torch.no_grad()`` (``grad=True``: gradients on), then each submodule's own previous
    ``training`` flag back.

    Example::

        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> _ = model[1].eval()
        >>> with evaluation_mode(model):
        ...     model.training, torch.is_grad_enabled()
        (False, False)
        >>> model.training, model[1].training
        (True, False)
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.set_grad_enabled(grad):
            yield
    finally:
        for m, training in modes:
            m.training = training


def _pooled(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    if features.ndim > 2:  # (B, T, H) token features -> (B, H)
        features = features.flatten(1, -2).mean(1)
    return features.flatten(1)


def _is_causal_lm(model: nn.Module) -> bool:
    if family_of(model) != "transformers" or getattr(model.config, "is_encoder_decoder", False):
        return False
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False


class BaseTaskScorer:
    """Score a held-out base-task loader through the current backbone and the original (or current) head.

    Args:
        root: the module to score: a LightningModule or a model. ``forward_fn`` receives it.
        metric: ``"accuracy"``, ``"f1"``, ``"loss"``, ``"perplexity"``, a ``torchmetrics.Metric`` or ``None``
            (label-free drift only).
        base_head: the original head (module, whole original model, or path to a saved state dict); ``None``
            scores the model's current head. For a model without a head: the head applied to its pooled features.
        forward_fn: ``forward_fn(root, batch) -> logits`` for models or batches the defaults cannot handle. For a
            model without a head and no ``forward_fn``/``base_head``, ``root``'s own ``forward`` is used.
        module: dotted path of the model inside ``root`` when it holds several.
        num_classes: number of base-task classes for accuracy/F1; read from the head when ``None``.
        limit_batches: score only the first ``limit_batches`` batches.
        drift: measure KL and feature cosine against the outputs cached at the first call.
        features: what the feature cosine compares: ``"head_input"`` (the pooled input of the head; the outputs
            when the model has no head) or ``"output"`` (the pooled model output itself, e.g. a sentence embedding
            returned by ``forward_fn``).

    Example::

        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> data = DataLoader(TensorDataset(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])), batch_size=3)
        >>> scorer = BaseTaskScorer(model, metric="loss", limit_batches=1)
        >>> scorer.score(data).batches
        1
        >>> with torch.no_grad():
        ...     _ = model[2].weight.mul_(3)  # the model drifts
        >>> scorer.score(data).kl_to_baseline > 0
        True
    """

    def __init__(
        self,
        root: nn.Module,
        *,
        metric: str | Metric | None = "accuracy",
        base_head: nn.Module | str | None = None,
        forward_fn: ForwardFn | None = None,
        module: str | None = None,
        num_classes: int | None = None,
        limit_batches: int | None = None,
        drift: bool = True,
        features: str = "head_input",
    ) -> None:
        if features not in ("head_input", "output"):
            raise ValueError(f"`features` must be 'head_input' or 'output', got {features!r}.")
        self.root = root
        self.model_path, self.model = self._single_model(root, module, forward_fn)
        self.headless = headless_reason(self.model) if forward_fn is None else None
        self.feature_head = feature_head_from(base_head) if self.headless and base_head is not None else None
        self.through_root = bool(self.headless) and base_head is None and root is not self.model
        self.through_root = self.through_root and defines_forward(root)
        if isinstance(base_head, str) and not self.headless:
            self.heads = base_heads_from_file(base_head, self.model)
        else:
            self.heads = base_heads_from(base_head, self.model) if base_head is not None and not self.headless else None
        self.metric_spec = check_metric(metric)
        self.forward_fn = forward_fn
        heads = {"": self.feature_head} if self.feature_head is not None else self.heads
        self.num_classes = num_classes if num_classes is not None else output_size(heads, self.model)
        self.limit_batches = limit_batches
        self.drift = drift
        self.features = features
        self.reference: dict[int, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self._causal = _is_causal_lm(self.model)
        self._head_paths = head_paths(self.model)  # the place stays the same when LoRA wraps or merges the head
        if self.metric_spec is not None:
            self.check_class_scores()

    @staticmethod
    def _single_model(root: nn.Module, module: str | None, forward_fn: ForwardFn | None) -> tuple[str, nn.Module]:
        models = find_models(root, module)
        if len(models) > 1 and forward_fn is None:
            raise ValueError(
                f"{type(root).__name__} holds several models ({[p for p, _ in models]}); pass `module=` to say which "
                f"one scores the base task, or `forward_fn=`."
            )
        return models[0]

    def check_class_scores(self) -> None:
        """Refuse to score a model without a head through its features (see the module docstring).

        Raises:
            ValueError: the model has no head, and neither ``forward_fn``, ``base_head`` nor the wrapping module's
                own ``forward`` gives class scores; the message names what to pass.
        """
        if self.headless and self.feature_head is None and not self.through_root:
            raise headless_error(self.headless, self.root, self.model_path)

    def score(self, loader: Iterable, *, rank: int = 0, world_size: int = 1) -> BaseTaskScore:
        """Score ``loader`` (the first ``limit_batches`` batches); this process takes batches ``rank::world_size``.

        Raises:
            ValueError: the loader yields no batch, or a metric needs labels the batches lack.
            TypeError: a batch or model output cannot be read.
        """
        device = _device_of(self.model, self.root)
        # the unwrapped model is called, never a DDP wrapper: ranks score different numbers of batches, and a
        # wrapper's forward would wait for the other ranks (buffer broadcast)
        metric = self._build_metric(loader, device) if self.metric_spec is not None else None
        kl, cosine = MeanMetric().to(device), MeanMetric().to(device)
        taking_reference = self.drift and self.reference is None
        reference = {} if taking_reference else self.reference
        seen = run = 0
        last = None
        with evaluation_mode(self.root):
            for index, batch in enumerate(loader):
                if self.limit_batches is not None and index >= self.limit_batches:
                    break
                seen += 1
                last = batch
                if index % world_size != rank:
                    continue
                run += 1
                logits, labels, features = self.forward(move_to_device(batch, device))
                if metric is not None:
                    self._update_metric(metric, logits, labels)
                if self.drift:
                    self._update_drift(index, logits, features, reference, kl, cosine, taking_reference)
            if world_size > 1 and last is not None and has_sharded_parameters(self.model):
                for _ in range(-(-seen // world_size) - run):  # lockstep: as many forwards as the busiest rank
                    self.forward(move_to_device(last, device))
        if seen == 0:
            raise ValueError("The base-task `dataloader` yielded no batches; it must hold at least one batch.")
        if taking_reference:
            self.reference = reference
        return BaseTaskScore(
            value=None if metric is None else float(metric.compute()),
            kl_to_baseline=float(kl.compute()) if self.drift else None,
            feature_cosine=float(cosine.compute()) if self.drift else None,
            batches=seen,
        )

    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(logits, labels, pooled features)`` of one batch (already on the model's device) through the current
        backbone and the original head, with gradients if they are enabled. Language-model logits and labels are
        shifted for next-token prediction."""
        store: list[torch.Tensor] = []
        with swapped_heads(self.model, self.heads), self._captured_features(store):
            if self.forward_fn is not None:
                inputs, labels = None, _labels_of(batch)
                logits = self.forward_fn(self.root, batch)
            else:
                inputs, labels = split_batch(batch)
                logits = call_model(self.root if self.through_root else self.model, inputs)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"`forward_fn` must return a logits tensor, got {type(logits).__name__}.")
        if self.through_root:
            check_scores_not_features(logits, store[0] if store else None, self.root)
        elif self.feature_head is not None:
            logits = apply_feature_head(self.feature_head, logits, self.model)
        if logits.ndim == 3:  # (B, T, V) language-model logits
            if inputs is not None:
                labels = language_model_labels(inputs, labels)
            if self._causal:
                logits = logits[:, :-1]
                labels = None if labels is None else labels[:, 1:]
        if self.features == "output":
            features = _pooled(logits)
        else:
            features = _pooled(store[0]) if store and store[0] is not None else None
        return logits, labels, features

    def loss(self, batch: Any) -> torch.Tensor:
        """Mean cross-entropy of one base-task batch (on the model's device) through the original head, with
        gradients: the base-task loss that replay trains on and EWC's Fisher differentiates.

        Raises:
            ValueError: the batch has no labels, or labels outside the head's classes.
        """
        self.check_class_scores()
        logits, labels, _ = self.forward(batch)
        self._check_labels(logits, labels)
        flat = logits.reshape(-1, logits.shape[-1]).float()
        return F.cross_entropy(flat, labels.reshape(-1).long().to(flat.device), ignore_index=IGNORE_INDEX)

    def _check_labels(self, logits: torch.Tensor, labels: torch.Tensor | None) -> None:
        if labels is None:
            raise ValueError(
                "The base-task batches carry no labels; yield (inputs, labels) or a dict with 'labels'."
                if self.metric_spec is None
                else f"metric={self.metric_spec!r} needs base-task labels, but the batches carry none; yield "
                f"(inputs, labels) or a dict with 'labels', or pass metric=None for label-free drift only."
            )
        classes = logits.shape[-1]
        labels = labels.reshape(-1)
        bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= classes))]
        if bad.numel():
            shown = sorted({int(v) for v in bad.unique()[:10]})
            head = "the original head (`base_head`)" if self.heads else "the model's current head"
            hint = (
                "check that `base_head` is the head of the base task"
                if self.heads
                else "pass the original head as `base_head=` when fine-tuning replaced it"
            )
            raise ValueError(
                f"Base-task labels {shown} are outside the {classes} classes (0..{classes - 1}) of {head} the base "
                f"task is scored through; {hint}, or map the labels to the head's classes."
            )

    def _captured_features(self, store: list[torch.Tensor]) -> contextlib.AbstractContextManager:
        """Capture the pooled features: the head's input, or the output of a model without a head."""
        if self.headless:
            return captured_output(self.model, store)
        paths = self._head_paths
        return captured_input(self.model.get_submodule(paths[0]) if paths else None, store)

    def _build_metric(self, loader: Iterable, device: torch.device) -> Metric:
        first = next(iter(loader), None) if self.num_classes is None and self.through_root else None
        if first is not None:  # the wrapping module's own head: its class count is read off its logits, once
            with evaluation_mode(self.root):
                self.num_classes = int(self.forward(move_to_device(first, device))[0].shape[-1])
        return build_metric(self.metric_spec, self.num_classes).to(device)

    def _update_metric(self, metric: Metric, logits: torch.Tensor, labels: torch.Tensor | None) -> None:
        if isinstance(self.metric_spec, str) or labels is None:
            self._check_labels(logits, labels)
        metric.update(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long())

    def _update_drift(self, index, logits, features, reference, kl, cosine, taking_reference) -> None:
        log_p = F.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)  # (N, C)
        if taking_reference:
            reference[index] = (log_p.cpu(), None if features is None else features.cpu())
        ref_log_p, ref_features = reference.get(index, (None, None))
        if ref_log_p is None or ref_log_p.shape != log_p.shape:
            baseline = "no such batch" if ref_log_p is None else f"shape {tuple(ref_log_p.shape)}"
            raise ValueError(
                f"Base-task batch {index} has outputs of shape {tuple(log_p.shape)} now but {baseline} at baseline: "
                f"the `dataloader` must yield the same batches in the same order (shuffle=False)."
            )
        ref_log_p = ref_log_p.to(log_p.device)
        kl.update((ref_log_p.exp() * (ref_log_p - log_p)).sum(-1))
        if features is None:
            features, ref_features = log_p, ref_log_p  # no head input seen: compare the outputs themselves
        cosine.update(F.cosine_similarity(features, ref_features.to(features.device), dim=-1))


def weights_version(module: nn.Module) -> int:
    """A number that changes whenever a parameter of ``module`` is replaced or changed in place (each tensor's
    version counter moves on in-place writes), so a callback can tell whether the model changed since it last looked.

    Example::

        >>> layer = nn.Linear(2, 2)
        >>> before = weights_version(layer)
        >>> with torch.no_grad():
        ...     _ = layer.weight.mul_(2)
        >>> weights_version(layer) != before
        True
    """
    return hash(tuple((id(p), p._version) for p in module.parameters()))


def _device_of(*modules: nn.Module) -> torch.device:
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            return tensor.device
    return torch.device("cpu")


def _labels_of(batch: Any) -> torch.Tensor | None:
    try:
        return split_batch(batch)[1]
    except TypeError:
        return None
