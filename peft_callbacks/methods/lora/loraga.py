r"""LoRA-GA: LoRA factors from the SVD of the loss gradient, so the first step moves as full fine-tuning would
(Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation"; HF PEFT's ``init_lora_weights=
"lora_ga"``).

The gradient ``G = ∂L/∂W`` of each adapted linear layer's weight is averaged over a few batches (PEFT's
``estimate_gradients``: only those weights require gradients meanwhile, the model in training mode, each layer's
sum divided by how many backward passes went through it), then, as PEFT's ``lora_ga_init``::

    G ≈ U S Vᵀ                 torch.svd_lowrank(G, q=min(4r, min(out, in)), niter=4), the top 2r components
    direction  "ArB2r" (default): A₀ = Vᵀ[:r]        B₀ = U[:, r:2r]·S[r:2r]
               "A2rBr":           A₀ = Vᵀ[r:2r]      B₀ = U[:, :r]·S[:r]
               "ArBr":            A₀ = Vᵀ[1:2r:2]    B₀ = U[:, 0:2r:2]·S[0:2r:2]
               "random":          r of the 2r indices at random (torch.randperm), the same for A₀ and B₀
    scale      "stable" (default): B₀ × out^¼ / √γ      "weight_svd": B₀ × σ₁(W) / S_B[0] (σ₁ by svd_lowrank, q=r)
               "gd_scale":         A₀, B₀ / s            "unit": as they are                    (s = the LoRA scaling)

and the model computes ``(W − s·B₀A₀)x + s·BAx`` (the residual base kept as PiSSA's:
:mod:`peft_callbacks.methods.lora.init`; the base weight is never written, the adapter file holds ``A₀``, ``B₀``).

**Randomness.** ``torch.svd_lowrank`` (and ``"random"``'s ``randperm``) draw from the global generator, one layer
after the other in the model's order, after all adapters are built; PEFT draws in the same order but builds each
layer's adapter (drawing its kaiming ``A``) just before. So the factors equal PEFT's where each ``svd_lowrank`` call
starts from the same generator state (the tests seed it inside every call); otherwise they are another draw of the
same randomised SVD (with ``niter=4`` the top components agree closely, up to sign).

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.methods.lora import LoRAConfig
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> batches = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(2)]
    >>> loss = lambda model, batch: nn.functional.cross_entropy(model(batch[0]), batch[1])
    >>> before = model(batches[0][0])
    >>> model = lora_ga_init(model, loss, LoRAConfig(rank=2, target_modules=["0"]), batches=batches)
    >>> torch.allclose(model(batches[0][0]), before, atol=1e-5)  # the adapter starts as the part it takes out
    True
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn as nn

from peft_callbacks._validation import (
    check_adapter_name,
    check_batches,
    check_callable,
    check_choice,
    check_instance,
    check_module,
    check_positive_float,
    check_positive_int,
)
from peft_callbacks.engine import DEFAULT_ADAPTER
from peft_callbacks.methods.lora.batches import probe_batches
from peft_callbacks.methods.lora.config import LoRAConfig
from peft_callbacks.methods.lora.data_inits import data_targets, inject_started, weight_rows

log = logging.getLogger(__name__)

__all__ = [
    "LORA_GA_DIRECTIONS",
    "LORA_GA_SCALES",
    "LoRAGAOptions",
    "estimate_gradients",
    "lora_ga_factors",
    "lora_ga_init",
    "loss_of",
]

LORA_GA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAGAOptions:
    """How ``init="lora_ga"`` estimates the gradient and splits its SVD (HF PEFT's ``LoraGAConfig``).

    Attributes:
        lora_ga_batches: how many batches the gradient is averaged over (from ``LoRACallback``: the first batches of
            the training dataloader, through the module's own ``training_step``, at ``setup``).
        lora_ga_direction: which of the gradient's top ``2·rank`` singular vectors start ``A`` and ``B``:
            ``"ArB2r"`` (PEFT's default: ``A`` the first ``rank``, ``B`` the next), ``"A2rBr"``, ``"ArBr"``
            (alternating) or ``"random"``.
        lora_ga_scale: how ``B`` (and ``A``) are scaled: ``"stable"`` (PEFT's default, ``out^¼/√gamma``),
            ``"weight_svd"``, ``"gd_scale"`` or ``"unit"``.
        lora_ga_stable_gamma: PEFT's ``stable_gamma``, the ``γ`` of ``"stable"``.

    Example::

        >>> LoRAGAOptions().lora_ga_direction, LoRAGAOptions().lora_ga_scale
        ('ArB2r', 'stable')
        >>> LoRAGAOptions(lora_ga_direction="BA")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `lora_ga_direction` must be one of ...
    """

    lora_ga_batches: int = 8
    lora_ga_direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = "ArB2r"
    lora_ga_scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = "stable"
    lora_ga_stable_gamma: float = 16.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_ga_batches", check_positive_int("lora_ga_batches", self.lora_ga_batches))
        check_choice("lora_ga_direction", self.lora_ga_direction, LORA_GA_DIRECTIONS)
        check_choice("lora_ga_scale", self.lora_ga_scale, LORA_GA_SCALES)
        gamma = check_positive_float("lora_ga_stable_gamma", self.lora_ga_stable_gamma)
        object.__setattr__(self, "lora_ga_stable_gamma", gamma)


def loss_of(output: Any, where: str) -> torch.Tensor:
    """The loss in what a step returned: a scalar tensor, or a mapping's ``"loss"`` (Lightning's rule)."""
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"LoRA-GA takes the gradient of a loss; {where} returned {type(output).__name__}, not a scalar tensor or "
            f"a mapping with one under 'loss'."
        )
    if not loss.requires_grad:
        raise ValueError(f"LoRA-GA: the loss {where} returned does not depend on the adapted layers' weights.")
    return loss


def estimate_gradients(
    model: nn.Module, targets: list[str], run: Callable[[], None], *, module: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """``{path: G}``: the gradient of each target's weight, as stored, summed over what ``run()`` backpropagates and
    divided by the number of backward passes through the layer (PEFT's ``estimate_gradients``).

    Meanwhile only those weights require gradients and ``module`` (default ``model``) is in training mode; after it
    every parameter's ``requires_grad``, the targets' ``.grad`` and the mode are as they were.

    Raises:
        ValueError: a target no gradient reached.
    """
    module = model if module is None else module
    layers = {p: model.get_submodule(p) for p in targets}
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    grads = {p: layer.weight.grad for p, layer in layers.items()}
    counts = dict.fromkeys(targets, 0)

    def counter(path: str) -> Callable:
        def count(layer: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: counts.__setitem__(path, counts[path] + 1))

        return count

    handles = [layer.register_forward_hook(counter(p)) for p, layer in layers.items()]
    training = module.training
    estimated = {}
    try:
        for p in params:
            p.requires_grad_(False)
        for layer in layers.values():
            layer.weight.grad = None
            layer.weight.requires_grad_(True)
        module.train()
        with torch.enable_grad():
            run()
        for path, layer in layers.items():
            if counts[path] == 0 or layer.weight.grad is None:
                raise ValueError(
                    f"LoRA-GA: no gradient reached layer {path!r} (it did not take part in the loss); leave it out "
                    f"of the targets."
                )
            estimated[path] = layer.weight.grad.detach() / counts[path]
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers.values():
            layer.weight.grad = None
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for path, layer in layers.items():
            layer.weight.grad = grads[path]
        module.train(training)
    return estimated


def lora_ga_factors(
    gradient: torch.Tensor, weight: torch.Tensor, rank: int, scaling: float, options: LoRAGAOptions | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A₀, B₀)`` for a gradient and weight ``(out, in)``, by HF PEFT's ``lora_ga_init`` (module docstring).

    Example::

        >>> g, w = torch.randn(6, 8), torch.randn(6, 8)
        >>> a, b = lora_ga_factors(g, w, 2, 1.0, LoRAGAOptions(lora_ga_scale="unit"))
        >>> tuple(a.shape), tuple(b.shape)
        ((2, 8), (6, 2))
    """
    options = LoRAGAOptions() if options is None else options
    grad = gradient.float()
    u, s, v = torch.svd_lowrank(grad, q=min(4 * rank, min(grad.shape)), niter=4)  # (out, q), (q,), (in, q)
    vh = v.t()
    u, s, vh = u[:, : 2 * rank], s[: 2 * rank], vh[: 2 * rank]
    direction = options.lora_ga_direction
    if direction == "ArBr":
        a_rows, b_cols = slice(1, 2 * rank, 2), slice(0, 2 * rank, 2)
    elif direction == "A2rBr":
        a_rows, b_cols = slice(rank, 2 * rank), slice(None, rank)
    elif direction == "ArB2r":
        a_rows, b_cols = slice(None, rank), slice(rank, 2 * rank)
    else:  # "random": the same r indices for both
        a_rows = b_cols = torch.randperm(2 * rank)[:rank]
    s_b = s[b_cols]
    lora_A = vh[a_rows, :]  # (r, in)
    lora_B = u[:, b_cols] @ torch.diag(s_b)  # (out, r)
    if options.lora_ga_scale == "stable":
        lora_B = lora_B * (grad.shape[0] ** 0.25 / options.lora_ga_stable_gamma**0.5)
    elif options.lora_ga_scale == "weight_svd":
        _, weight_s, _ = torch.svd_lowrank(weight.float(), q=rank, niter=4)
        if s_b[0] > 0:
            lora_B = lora_B * (weight_s[0] / s_b[0])
    elif options.lora_ga_scale == "gd_scale":
        lora_A, lora_B = lora_A / scaling, lora_B / scaling
    return lora_A.contiguous(), lora_B.contiguous()


def lora_ga_init(
    model: nn.Module,
    train_step: Callable[..., Any],
    config: LoRAConfig,
    lora_ga: LoRAGAOptions | None = None,
    *,
    batches: Iterable | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    module: nn.Module | None = None,
) -> nn.Module:
    """Inject LoRA started by LoRA-GA (module docstring); the plain-PyTorch entry for ``init="lora_ga"``.

    Args:
        model: the model to adapt (not yet adapted by this adapter).
        train_step: with ``batches``, ``train_step(model, batch)`` returns the loss of one batch (a scalar tensor,
            or a mapping with it under ``"loss"``); the first ``lora_ga.lora_ga_batches`` batches are read and each
            loss backpropagated. Without ``batches``, ``train_step()`` runs the forward and backward passes itself
            (PEFT's ``preprocess_loraga`` contract). No optimizer steps either way.
        config: LoRA's settings (``init`` is taken as ``"lora_ga"``; ``rank_pattern``, ``alpha_pattern`` and
            ``use_rslora`` apply per layer as in PEFT).
        lora_ga: direction, scale and how many batches (:class:`LoRAGAOptions`; ``None``: its defaults).
        batches: the batches (any iterable; see ``train_step``), moved to ``model``'s device.
        adapter_name: the adapter's name.
        module: the module whose training mode and parameters the estimate manages (default ``model``; a
            LightningModule holding ``model``, whose ``training_step`` gives the loss).

    Returns:
        ``model``, adapted in place (recorded as ``init="lora_ga"``; the adapter holds ``A₀``, ``B₀``, so a saved
        adapter reloads without data). Its parameters' ``requires_grad`` and gradients are as before.

    Raises:
        ValueError: a target that is not linear, ``2·rank`` above ``min(out, in)``, no batch, a layer no gradient
            reached.
    """
    check_module("model", model)
    check_callable("train_step", train_step)
    check_instance("config", config, LoRAConfig)
    check_instance("lora_ga", lora_ga, LoRAGAOptions, optional=True)
    if batches is not None:
        check_batches("batches", batches)
    check_adapter_name(adapter_name)
    check_instance("module", module, nn.Module, optional=True)
    lora_ga = LoRAGAOptions() if lora_ga is None else lora_ga
    config = dataclasses.replace(config, init="lora_ga")
    targets, ranks = data_targets(
        model, config, adapter_name, lambda out, fan_in: min(out, fan_in) // 2, "its top 2·rank gradient components"
    )

    def run() -> None:
        if batches is None:
            train_step()
            return
        count = 0
        for batch in probe_batches(batches, model, num_batches=lora_ga.lora_ga_batches):
            loss_of(train_step(model, batch), "`train_step`").backward()
            count += 1
        if count == 0:
            raise ValueError("`batches` gave no batch: LoRA-GA needs a few batches to estimate the gradient.")

    gradients = estimate_gradients(model, targets, run, module=module)

    def factors(path: str, adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        layer = model.get_submodule(path).base_layer
        gradient = gradients[path].T if adapter.kind == "hf_conv1d" else gradients[path]  # (out, in)
        return lora_ga_factors(gradient, weight_rows(layer), ranks[path], adapter.scaling, lora_ga)

    with torch.no_grad():
        inject_started(model, config, targets, factors, adapter_name)
    log.info("LoRA-GA (%s, %s): %d layer(s) started", lora_ga.lora_ga_direction, lora_ga.lora_ga_scale, len(targets))
    return model
