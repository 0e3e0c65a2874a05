"""Prompt tuning (Lester et al. 2021) for transformers models: learned soft tokens in front of every input.

The user keeps calling the model as before (``model(input_ids=..., attention_mask=..., labels=...)``). Three hooks
do the rest:

1. a forward pre-hook on the model puts ``n`` placeholder ids in front of ``input_ids`` (or the prompt in front of
   ``inputs_embeds``) and extends ``attention_mask`` (ones), ``token_type_ids`` (zeros), ``position_ids`` and
   ``cache_position`` (shifted by ``n``) and token-level ``labels`` (``-100``, so no loss is taken on the prompt);
2. a forward hook on ``get_input_embeddings()`` swaps the placeholders' embeddings for the learned prompt;
3. a forward hook on the model drops the prompt positions from token-level ``logits`` and ``last_hidden_state``,
   so they line up with the user's ``input_ids`` and ``attention_mask`` again (``hidden_states`` / ``attentions``
   keep them; as in HF PEFT, BERT's ``pooler_output`` and classifiers pool the first position, now a prompt).

Keeping ``input_ids`` (rather than passing ``inputs_embeds``) lets models that pool at the last non-padding token
(GPT-2 / Qwen2 sequence classifiers) still find it. ``model.generate`` works: the prompt enters the key/value cache
on the first step, later steps only get their attention mask and positions shifted. Encoder-decoder models (T5,
BART) are not supported.

Example::

    >>> import torch, transformers as hf
    >>> cfg = hf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, bos_token_id=1, eos_token_id=1)
    >>> lm = hf.GPT2LMHeadModel(cfg).eval()
    >>> lm = inject_prompt_tuning(lm, num_virtual_tokens=4, init="vocab")
    >>> ids = torch.randint(3, 50, (2, 6))
    >>> out = lm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    >>> out.logits.shape  # the prompt positions are dropped from the logits
    torch.Size([2, 6, 50])
    >>> lm.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape
    torch.Size([2, 9])
    >>> print(count_parameters(lm))  # 4 tokens x 32 dims
    trainable 128 / total 59,968 (0.21%)
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks._validation import check_int, check_int_list, check_module, check_positive_int
from peft_callbacks.core.model_kinds import TEXT_TRANSFORMERS, ModelKind
from peft_callbacks.core.models import family_of
from peft_callbacks.core.modules import PEFTModule, peft_modules
from peft_callbacks.core.params import count_parameters
from peft_callbacks.engine import MethodConfig, inject, not_recorded, register_method, unload
from peft_callbacks.engine.arguments import takes_settings
from peft_callbacks.engine.scaling import FixedScale
from peft_callbacks.methods.prompts.method import PromptMethod

__all__ = [
    "PromptTuningConfig",
    "SoftPrompt",
    "count_parameters",
    "inject_prompt_tuning",
    "remove_prompt_tuning",
    "soft_prompts",
]

log = logging.getLogger(__name__)

PROMPT_NAME = "soft_prompt"


_CACHE_KEYS = ("past_key_values", "cache")  # transformers < 5.2x / newer releases name the model's cache argument


def _cache_length(kwargs: dict[str, Any]) -> int:
    """How many positions the key/value cache passed to the model already holds (0 on a first step)."""
    past = next((kwargs[key] for key in _CACHE_KEYS if kwargs.get(key) is not None), None)
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)) and past and past[0] is not None:
        return int(past[0][0].shape[-2])
    return 0


def _prepend(tensor: torch.Tensor, n: int, value: int) -> torch.Tensor:
    pad = torch.full((tensor.shape[0], n), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=1)


class SoftPrompt(FixedScale, PEFTModule):
    """``n`` learned embeddings put in front of every input of a transformers model (see the module docstring).

    Args:
        num_virtual_tokens: the number of prompt tokens ``n``.
        dim: the embedding width ``d``; the prompt holds ``n·d`` parameters.
        placeholder_id: a token id (not padding, not EOS) that marks the prompt positions in ``input_ids``.

    Example::

        >>> SoftPrompt(num_virtual_tokens=20, dim=768).weight.shape
        torch.Size([20, 768])
    """

    def __init__(self, num_virtual_tokens: int, dim: int, placeholder_id: int = 0) -> None:
        super().__init__()
        self.num_virtual_tokens = check_positive_int("num_virtual_tokens", num_virtual_tokens)
        check_positive_int("dim", dim)
        self.placeholder_id = check_int("placeholder_id", placeholder_id, minimum=0)
        self.weight = nn.Parameter(torch.zeros(num_virtual_tokens, dim))
        self.disabled = False  # the model runs without the prompt (e.g. to score the base model)
        self._pending = False  # placeholders waiting for the embedding hook
        self._lengths: tuple[int, int] | None = None  # (user length, extended length) of the current call

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, dim={self.weight.shape[1]}"

    # -- hooks ----------------------------------------------------------------------------------------------------
    def before_model(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook (with kwargs) on the model: extend the inputs by the prompt."""
        if self.disabled:
            self._pending, self._lengths = False, None
            return None
        kwargs = dict(kwargs)
        if args:
            names = list(inspect.signature(model.forward).parameters)[: len(args)]
            kwargs.update(zip(names, args))
        n = self.num_virtual_tokens
        self._pending, self._lengths = False, None
        if _cache_length(kwargs) == 0:
            self._extend_first_step(kwargs)
        else:  # a generation step: the prompt is already in the cache
            for key in ("position_ids", "cache_position"):
                if isinstance(kwargs.get(key), torch.Tensor):
                    kwargs[key] = kwargs[key] + n
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            kwargs["attention_mask"] = _prepend(mask, n, 1)
        return (), kwargs

    def _extend_first_step(self, kwargs: dict) -> None:
        n = self.num_virtual_tokens
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if ids is not None:
            seq = ids.shape[1]
            kwargs["input_ids"] = _prepend(ids, n, self.placeholder_id)
            self._pending = True
        elif embeds is not None:
            seq = embeds.shape[1]
            prompt = self.weight.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
            kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, n + T, d)
        else:
            raise ValueError("Prompt tuning needs `input_ids` or `inputs_embeds` in the model call; got neither.")
        self._lengths = (seq, seq + n)
        token_types, labels = kwargs.get("token_type_ids"), kwargs.get("labels")
        if isinstance(token_types, torch.Tensor) and token_types.shape[-1] == seq:
            kwargs["token_type_ids"] = _prepend(token_types, n, 0)
        if isinstance(labels, torch.Tensor) and labels.ndim >= 2 and labels.shape[1] == seq:
            kwargs["labels"] = _prepend(labels, n, -100)  # no loss on prompt positions
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor):
            front = torch.arange(n, device=position_ids.device, dtype=position_ids.dtype)
            kwargs["position_ids"] = torch.cat([front.expand(*position_ids.shape[:-1], n), position_ids + n], dim=-1)
        cache_position = kwargs.get("cache_position")
        if isinstance(cache_position, torch.Tensor):
            front = torch.arange(n, device=cache_position.device, dtype=cache_position.dtype)
            kwargs["cache_position"] = torch.cat([front, cache_position + n])

    def on_embeddings(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the input embeddings: the placeholders' rows become the prompt."""
        if not self._pending:
            return output
        self._pending = False
        n = self.num_virtual_tokens
        prompt = self.weight.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([prompt, output[:, n:]], dim=1)  # (B, n, d) + (B, T, d) -> (B, n + T, d)

    def after_model(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Forward hook on the model: drop the prompt positions from token-level logits and last hidden states."""
        lengths, self._lengths, self._pending = self._lengths, None, False
        if lengths is None or not hasattr(output, "get"):
            return output
        for key in ("logits", "last_hidden_state"):
            value = output.get(key)
            if isinstance(value, torch.Tensor) and value.ndim >= 3 and value.shape[1] == lengths[1]:
                output[key] = value[:, self.num_virtual_tokens :]  # (B, n + T, ...) -> (B, T, ...)
        return output


def soft_prompts(model: nn.Module) -> dict[str, SoftPrompt]:
    """``{path: prompt}`` of every soft prompt inside ``model``.

    Example::

        >>> import transformers as hf
        >>> cfg = hf.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        ...                     vocab_size=20)
        >>> list(soft_prompts(inject_prompt_tuning(hf.BertForSequenceClassification(cfg), 4)))
        ['bert.soft_prompt']
    """
    return peft_modules(model, SoftPrompt)


def _placeholder_id(model: nn.Module, vocab_size: int) -> int:
    config = model.config
    special = {getattr(config, k, None) for k in ("pad_token_id", "eos_token_id", "bos_token_id", "sep_token_id")}
    special |= {
        i
        for k in ("eos_token_id", "bos_token_id")
        if isinstance(getattr(config, k, None), list)
        for i in getattr(config, k)
    }
    return next(i for i in range(vocab_size) if i not in special)


def check_tokenizer(tokenizer: Any) -> Any:
    """Return ``tokenizer`` if it is ``None`` or callable as ``tokenizer(text, add_special_tokens=False)``."""
    if tokenizer is not None and not callable(tokenizer):
        raise TypeError(
            f"`tokenizer` must be None or a callable tokenizer (e.g. a transformers tokenizer), got "
            f"{type(tokenizer).__name__} {tokenizer!r}."
        )
    return tokenizer


def _init_token_ids(
    init: str, tokenizer: Any, init_token_ids: list[int] | None, vocab_size: int, num_virtual_tokens: int
) -> list[int] | None:
    source = "tokenizer(init)"
    if init_token_ids is not None:
        ids, source = check_int_list("init_token_ids", init_token_ids), "init_token_ids"
    elif init == "random":
        return None
    elif init == "vocab":
        return torch.randint(0, vocab_size, (num_virtual_tokens,)).tolist()
    elif tokenizer is None:
        raise ValueError(
            f"`init` must be 'random', 'vocab' or a text to start the prompt from; the text {init!r} needs a "
            f"`tokenizer` (or its ids in `init_token_ids`)."
        )
    else:
        ids = list(tokenizer(init, add_special_tokens=False)["input_ids"])
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size]
    if bad or not ids:
        raise ValueError(f"`{source}` must give token ids in [0, {vocab_size}); got {ids[:10]!r}.")
    return ids


def _check_model(model: nn.Module) -> nn.Embedding:
    family = family_of(model)
    if family != "transformers":
        hint = " For timm ViTs use inject_visual_prompts / VisualPromptCallback." if family == "timm" else ""
        raise ValueError(
            f"Prompt tuning needs a transformers PreTrainedModel with text inputs, got {type(model).__name__}.{hint}"
        )
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"Prompt tuning supports encoder-only and decoder-only transformers models; {type(model).__name__} is an "
            f"encoder-decoder model, which is not supported."
        )
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, nn.Embedding):
        raise ValueError(
            f"{type(model).__name__}.get_input_embeddings() is {type(embeddings).__name__}, not a token embedding "
            f"(nn.Embedding); prompt tuning needs a text model."
        )
    return embeddings


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuningConfig(MethodConfig, method="prompt_tuning"):
    """Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` learned embeddings in front of every input.

    Attributes:
        num_virtual_tokens: prompt length ``n`` (> 0); the prompt holds ``n·d`` parameters.
        init: ``"random"`` (normal, with the embedding matrix's standard deviation), ``"vocab"`` (embeddings of
            random vocabulary tokens, Lester et al. 2021 §3) or a text whose token embeddings start the prompt
            (repeated to length ``n``; needs ``tokenizer`` or ``init_token_ids``).
        init_token_ids: token ids to start the prompt from (instead of a tokenizer); repeated to length ``n``.
        tokenizer: called as ``tokenizer(text, add_special_tokens=False)["input_ids"]`` for a text ``init``.

    Example::

        >>> PromptTuningConfig(num_virtual_tokens=10).to_dict()
        {'train_head': True, 'train_bn': False, 'num_virtual_tokens': 10}
    """

    num_virtual_tokens: int = 20
    init: str = not_recorded("random")
    init_token_ids: list[int] | None = not_recorded()
    tokenizer: Any = not_recorded()

    def validate(self) -> None:
        super().validate()
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        if not isinstance(self.init, str) or not self.init:
            raise TypeError(f"`init` must be 'random', 'vocab' or a non-empty text, got {self.init!r}.")
        self._set("init_token_ids", check_int_list("init_token_ids", self.init_token_ids))
        check_tokenizer(self.tokenizer)
        if self.init not in ("random", "vocab") and self.tokenizer is None and self.init_token_ids is None:
            raise ValueError(
                f"`init` must be 'random', 'vocab' or a text to start the prompt from; the text {self.init!r} needs a "
                f"`tokenizer`: pass `tokenizer` or `init_token_ids` to turn it into ids."
            )


class PromptTuningMethod(PromptMethod):
    """Soft prompts in front of the inputs of a transformers text model (not mergeable)."""

    name = "prompt_tuning"
    title = "Prompt tuning"
    config_class = PromptTuningConfig
    module_class = SoftPrompt
    existing_modules = "a soft prompt"
    removal = "remove_prompt_tuning(model)"
    examples = {
        "random": PromptTuningConfig(num_virtual_tokens=3),
        "vocab": PromptTuningConfig(num_virtual_tokens=3, init="vocab"),
        "text": PromptTuningConfig(num_virtual_tokens=3, init="Classify:", init_token_ids=[5, 6]),
    }

    def applies_to(self, config: PromptTuningConfig) -> ModelKind:
        """Text models whose input is token embeddings (the soft prompt goes before them); not encoder-decoders."""
        return TEXT_TRANSFORMERS

    def places(self, model: nn.Module) -> Any:
        return _check_model(model)

    def insert(self, model: nn.Module, targets: list[str], config: PromptTuningConfig, adapter_name: str) -> None:
        embeddings = self.places(model)
        n = config.num_virtual_tokens
        vocab_size, dim = embeddings.weight.shape
        ids = _init_token_ids(config.init, config.tokenizer, config.init_token_ids, vocab_size, n)
        prompt = SoftPrompt(n, dim, _placeholder_id(model, vocab_size))
        with torch.no_grad():
            if embeddings.weight.device.type == "meta":
                pass  # a dry run: shapes only
            elif ids is None:
                prompt.weight.normal_(0.0, float(embeddings.weight.float().std()))
            else:
                rows = torch.tensor((ids * (n // len(ids) + 1))[:n], device=embeddings.weight.device)
                prompt.weight.copy_(embeddings.weight[rows])
        prompt.to(device=embeddings.weight.device, dtype=embeddings.weight.dtype)
        model.base_model.add_module(PROMPT_NAME, prompt)
        model.register_forward_pre_hook(prompt.before_model, with_kwargs=True)
        embeddings.register_forward_hook(prompt.on_embeddings)
        model.register_forward_hook(prompt.after_model, with_kwargs=True, always_call=True)

    def describe(self, config: PromptTuningConfig) -> str:
        return f"{config.num_virtual_tokens} virtual tokens"


register_method(PromptTuningMethod())


@takes_settings(PromptTuningConfig, positional=2)
def inject_prompt_tuning(model: nn.Module, config: PromptTuningConfig) -> nn.Module:
    """Give a transformers model a learned soft prompt and freeze everything else (in place).

    ``inject(model, PromptTuningConfig(...))`` with :class:`PromptTuningConfig`'s fields as keywords
    (``num_virtual_tokens`` and ``init`` also by position). The task head (e.g. ``classifier``, ``score``) trains
    with ``train_head``; a causal LM's ``lm_head`` never does.

    Args:
        model: an encoder-only or decoder-only transformers model (BERT-style classifiers, causal LMs, …).

    Returns:
        ``model`` itself, modified in place.

    Raises:
        ValueError: ``num_virtual_tokens`` <= 0, a text ``init`` without a tokenizer, or an unsupported model.
    """
    return inject(check_module("model", model), config)


def remove_prompt_tuning(model: nn.Module) -> nn.Module:
    """Take the soft prompt and its hooks out of ``model``; it is called as before again (in place).

    Example::

        >>> import transformers as hf
        >>> cfg = hf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20)
        >>> lm = inject_prompt_tuning(hf.GPT2LMHeadModel(cfg), 4)
        >>> len(soft_prompts(remove_prompt_tuning(lm))), len(lm._forward_pre_hooks)
        (0, 0)
    """
    return unload(model, method="prompt_tuning")
