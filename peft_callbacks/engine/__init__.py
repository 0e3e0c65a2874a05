"""The surgery engine: one pipeline for every PEFT method (plain PyTorch, no Lightning).

* :mod:`~peft_callbacks.engine.config` — a method's settings, checked and serialised in one place;
* :mod:`~peft_callbacks.engine.layers` — :class:`Adapter` (one method's update of one layer) inside an
  :class:`AdaptedLayer` (the base layer plus its named adapters);
* :mod:`~peft_callbacks.engine.parameters` — :class:`ParameterAdapter` inside :class:`AdaptedParameters`: updates of
  named parameters of modules that are not weight layers (fused mixture-of-experts weights);
* :mod:`~peft_callbacks.engine.method` — :class:`Method` / :class:`LayerMethod` and the registry;
* :mod:`~peft_callbacks.engine.surgery` — :func:`inject`, :func:`merge`, :func:`unload`, :func:`disabled`,
  :func:`replay`;
* :mod:`~peft_callbacks.engine.precision` — where a merged weight goes: in place, into plain layers of another
  dtype, or re-quantized (quantized bases);
* :mod:`~peft_callbacks.engine.scaling` — every update's ``scale`` (``0``: the base model, ``1``: the trained one) and
  :func:`scaled`;
* :mod:`~peft_callbacks.engine.transaction` — a failed surgery leaves the model as it was.

See the docs page "Adding a method" for a method written against it.
"""

from peft_callbacks.engine.config import LayerConfig, MethodConfig, not_recorded
from peft_callbacks.engine.layers import DEFAULT_ADAPTER, AdaptedLayer, Adapter, AdditiveAdapter
from peft_callbacks.engine.method import (
    LayerMethod,
    Method,
    ModuleMethod,
    PeftMapping,
    get_method,
    peft_version,
    register_method,
    registered_methods,
    replace_module,
)
from peft_callbacks.engine.parameters import AdaptedParameters, ParameterAdapter
from peft_callbacks.engine.precision import requantization_error
from peft_callbacks.engine.scaling import scaled
from peft_callbacks.engine.surgery import adapt_layer, disabled, inject, merge, peft_layers, replay, unload
from peft_callbacks.engine.transaction import transaction

__all__ = [
    "DEFAULT_ADAPTER",
    "AdaptedLayer",
    "AdaptedParameters",
    "Adapter",
    "AdditiveAdapter",
    "LayerConfig",
    "LayerMethod",
    "Method",
    "ModuleMethod",
    "MethodConfig",
    "ParameterAdapter",
    "PeftMapping",
    "peft_version",
    "adapt_layer",
    "disabled",
    "get_method",
    "inject",
    "merge",
    "not_recorded",
    "peft_layers",
    "register_method",
    "registered_methods",
    "replace_module",
    "replay",
    "requantization_error",
    "scaled",
    "transaction",
    "unload",
]
