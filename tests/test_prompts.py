"""Prompt tuning (transformers) and visual prompt tuning (timm ViTs): maths, masks, generation, errors, callbacks."""

from __future__ import annotations

import copy
import inspect
import pickle

import lightning as L
import pytest
import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import HF_MODELS, TIMM_MODELS, run

from peft_callbacks.callbacks.method_callbacks import PromptTuningCallback, VisualPromptCallback
from peft_callbacks.core.heads import find_head
from peft_callbacks.core.params import count_parameters
from peft_callbacks.core.recipe import surgery_records
from peft_callbacks.engine import replay as replay_surgery
from peft_callbacks.methods.prompts import (
    inject_prompt_tuning,
    inject_visual_prompts,
    remove_prompt_tuning,
    remove_visual_prompts,
    soft_prompts,
    visual_prompts,
)

N = 3


def build(name: str):
    if name == "vit_reg_avg":
        torch.manual_seed(0)
        model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            num_classes=3,
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            reg_tokens=2,
            global_pool="avg",
        )
        return model.eval(), {"x": torch.randn(2, 3, 32, 32)}
    model, inputs = (TIMM_MODELS if name in TIMM_MODELS else HF_MODELS)[name]()
    return model.eval(), inputs


def head_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for path in find_head(model).head for p in model.get_submodule(path).parameters()]


def prompt_weight(model: nn.Module) -> nn.Parameter:
    return next(iter({**soft_prompts(model), **visual_prompts(model)}.values())).weight


def capture_kwargs(module: nn.Module) -> dict:
    """What ``module`` is called with (positional arguments by name), seen after our hooks ran."""
    seen = {}

    def hook(m, args, kwargs):
        names = list(inspect.signature(m.forward).parameters)
        seen.update(zip(names, args), **kwargs)

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def train(model: nn.Module, inputs: dict, steps: int = 12, lr: float = 5e-2) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    target, losses = torch.tensor([0, 2]), []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(run(model, inputs), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# -- soft prompts (transformers) ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, task",
    [
        ("gpt2", "CAUSAL_LM"),
        ("llama", "CAUSAL_LM"),
        ("bert", "SEQ_CLS"),
        ("distilbert", "SEQ_CLS"),
        ("qwen2", "SEQ_CLS"),
    ],
)
def test_matches_hf_peft_prompt_tuning(name, task):
    from peft import PromptTuningConfig, get_peft_model

    model, inputs = build(name)
    dim = model.get_input_embeddings().embedding_dim  # DistilBERT's config has no `hidden_size` for PEFT to read
    config = PromptTuningConfig(
        task_type=task, num_virtual_tokens=N, token_dim=dim, num_layers=2, num_attention_heads=2
    )
    reference = get_peft_model(copy.deepcopy(model), config).eval()
    inject_prompt_tuning(model, N, init="vocab")
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(prompt_weight(model))
    if task == "CAUSAL_LM":
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    else:
        labels = torch.tensor([0, 1])
    ours, theirs = model(**inputs, labels=labels), reference(**inputs, labels=labels)
    their_logits = theirs.logits[:, N:] if task == "CAUSAL_LM" else theirs.logits  # we drop the prompt positions
    torch.testing.assert_close(ours.logits, their_logits)
    torch.testing.assert_close(ours.loss, theirs.loss)
    if task == "CAUSAL_LM":  # greedy generation, left-padded batch
        ids, mask = inputs["input_ids"], inputs["attention_mask"].flip(1)
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(**kwargs), reference.generate(**kwargs))


@pytest.mark.parametrize("name", ["bert", "roberta", "gpt2_cls", "qwen2", "llama"])
def test_padded_batches_shapes_masks_and_results(name):
    model, _ = build(name)
    inject_prompt_tuning(model, N, init="vocab")
    pad = model.config.pad_token_id
    ids = torch.randint(3, 99, (2, 7))
    mask = torch.ones_like(ids)
    ids[1, -2:], mask[1, -2:] = pad, 0  # right padding with real pad tokens
    seen = capture_kwargs(model.base_model)
    batch = model(input_ids=ids, attention_mask=mask).logits
    assert seen["attention_mask"].shape == (2, N + 7) and seen["input_ids"].shape == (2, N + 7)
    assert torch.equal(seen["attention_mask"][:, :N], torch.ones(2, N, dtype=mask.dtype))
    assert torch.equal(seen["attention_mask"][:, N:], mask)
    alone = model(input_ids=ids[1:, :-2], attention_mask=mask[1:, :-2]).logits
    if batch.ndim == 3:  # LM: one row of logits per real token, prompt positions dropped
        assert batch.shape == (2, 7, 99)
        torch.testing.assert_close(batch[1:, :-2], alone, atol=1e-5, rtol=1e-4)
    else:  # classifier pools the last real token (GPT-2/Qwen2) or CLS: padding must not change the result
        torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=1e-4)


def test_causal_lm_loss_ignores_prompt_positions():
    model, inputs = build("gpt2")
    inject_prompt_tuning(model, N)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    seen = capture_kwargs(model)  # registered after ours: sees the extended arguments
    out = model(**inputs, labels=labels, output_hidden_states=True)
    assert torch.equal(seen["labels"][:, :N], torch.full((2, N), -100)) and torch.equal(seen["labels"][:, N:], labels)
    full = model.lm_head(out.hidden_states[-1])  # (B, N + T, V): logits at prompt positions too
    torch.testing.assert_close(out.logits, full[:, N:])
    # the last prompt position predicts the first real token; no prompt position is a target
    manual = nn.functional.cross_entropy(full[:, N - 1 : -1].reshape(-1, 99), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)


def test_token_types_positions_and_positional_calls():
    bert, inputs = build("bert")
    inject_prompt_tuning(bert, N)
    plain = run(bert, inputs)
    zeros = torch.zeros_like(inputs["input_ids"])
    positions = torch.arange(7).expand(2, 7)
    torch.testing.assert_close(bert(**inputs, token_type_ids=zeros).logits, plain)
    torch.testing.assert_close(bert(**inputs, position_ids=positions).logits, plain)
    torch.testing.assert_close(bert(inputs["input_ids"], inputs["attention_mask"]).logits, plain)
    llama, inputs = build("llama")
    inject_prompt_tuning(llama, N)
    torch.testing.assert_close(llama(**inputs, position_ids=positions).logits, run(llama, inputs))


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2_cls", "qwen2"])
def test_prompt_count_gradients_and_learning(name):
    model, inputs = build(name)
    inject_prompt_tuning(model, N)
    dim = model.get_input_embeddings().embedding_dim
    heads = head_params(model)
    assert count_parameters(model).trainable == N * dim + sum(p.numel() for p in heads)
    run(model, inputs).sum().backward()
    got = {id(p) for p in model.parameters() if p.grad is not None}
    assert got == {id(prompt_weight(model))} | {id(p) for p in heads}
    assert prompt_weight(model).grad.abs().sum() > 0
    model.zero_grad()
    losses = train(model, inputs)
    assert losses[-1] < 0.7 * losses[0], losses


def test_prompt_initialisation():
    model, _ = build("gpt2")
    embedding = model.get_input_embeddings().weight
    inject_prompt_tuning(model, 5, "Classify:", tokenizer=lambda text, add_special_tokens: {"input_ids": [5, 6]})
    assert torch.equal(prompt_weight(model), embedding[[5, 6, 5, 6, 5]])
    model, _ = build("gpt2")
    inject_prompt_tuning(model, 2, "text", init_token_ids=[9, 8, 7])
    assert torch.equal(prompt_weight(model), model.get_input_embeddings().weight[[9, 8]])
    model, _ = build("gpt2")
    inject_prompt_tuning(model, 4, "vocab")
    rows = model.get_input_embeddings().weight
    assert all(any(torch.equal(r, e) for e in rows) for r in prompt_weight(model))
    with pytest.raises(ValueError, match="the text 'Classify:' needs a `tokenizer`"):
        inject_prompt_tuning(build("gpt2")[0], 4, "Classify:")
    with pytest.raises(ValueError, match=r"`init_token_ids` must give token ids in \[0, 99\); got \[5, 500\]"):
        inject_prompt_tuning(build("gpt2")[0], 4, "x", init_token_ids=[5, 500])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generation_follows_the_trained_prompt(name):
    model, inputs = build(name)
    inject_prompt_tuning(model, N)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([prompt_weight(model)], lr=1e-1)
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
    model.eval()
    ids, mask = inputs["input_ids"][:1], torch.ones(1, 7, dtype=torch.long)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    with torch.no_grad():  # each cached step's logits equal a full forward pass over the longer text
        for step in range(3):
            prefix = cached.sequences[:, : 7 + step]
            logits = model(input_ids=prefix, attention_mask=torch.ones_like(prefix)).logits
            torch.testing.assert_close(cached.scores[step], logits[:, -1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(uncached.scores[step], logits[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", ["past_key_values", "cache"])
def test_generation_step_is_recognised_under_either_cache_name(key):
    """transformers renamed the model's cache argument; a generation step must never get the prompt again."""
    model, inputs = build("llama")
    inject_prompt_tuning(model, N)

    class Cache:  # what generate passes after the first step: a cache that already holds prompt + text
        def get_seq_length(self) -> int:
            return N + 7

    ids, positions = torch.tensor([[5]]), torch.tensor([[7]])
    _, kwargs = model.base_model.soft_prompt.before_model(
        model, (), {"input_ids": ids, "position_ids": positions, key: Cache()}
    )
    assert torch.equal(kwargs["input_ids"], ids)  # no placeholders in front of a cached step
    assert torch.equal(kwargs["position_ids"], positions + N)  # positions continue after the prompt


def test_soft_prompt_remove_copy_replay():
    model, inputs = build("gpt2_cls")
    reference = run(model, inputs)
    inject_prompt_tuning(model, N)
    prompted = run(model, inputs)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(run(clone, inputs), prompted)
    fresh, _ = build("gpt2_cls")
    replay_surgery(fresh, surgery_records(model))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(run(fresh, inputs), prompted)
    remove_prompt_tuning(model)
    assert not soft_prompts(model) and not surgery_records(model)
    assert torch.equal(run(model, inputs), reference)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: inject_prompt_tuning(build("bert")[0], 0),
            ValueError,
            "`num_virtual_tokens` must be an int >= 1, got 0",
        ),
        (lambda: inject_prompt_tuning(build("deit")[0]), ValueError, "use inject_visual_prompts"),
        (lambda: inject_prompt_tuning(build("t5")[0]), ValueError, "encoder-decoder model, which is not supported"),
        (lambda: inject_prompt_tuning(build("vit_hf")[0]), ValueError, "not a token embedding"),
        (lambda: inject_visual_prompts(build("deit")[0], -1), ValueError, "`num_virtual_tokens` must be an int >= 1"),
        (lambda: inject_visual_prompts(build("swin")[0]), ValueError, "supports timm VisionTransformer.*SwinTransfo"),
        (lambda: inject_visual_prompts(build("bert")[0]), ValueError, "got BertForSequenceClassification"),
        (lambda: PromptTuningCallback(num_virtual_tokens=0), ValueError, "`num_virtual_tokens` must be an int >= 1"),
        (lambda: PromptTuningCallback(init="Hello"), ValueError, "pass `tokenizer` or `init_token_ids`"),
        (lambda: VisualPromptCallback(dropout=1.0), ValueError, r"`dropout` must be in \[0.0, 1.0\)"),
        (lambda: VisualPromptCallback(deep="yes"), TypeError, "`deep` must be True or False"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_twice_is_an_error():
    model, _ = build("bert")
    inject_prompt_tuning(model, N)
    with pytest.raises(ValueError, match="already has a soft prompt"):
        inject_prompt_tuning(model, N)
    vit, _ = build("deit")
    inject_visual_prompts(vit, N)
    with pytest.raises(ValueError, match="already has visual prompts") as refused:
        inject_visual_prompts(vit, N)
    assert str(refused.value).endswith("Call unload(model) first.")  # one set per model: no other adapter_name


# -- visual prompts (timm ViTs) -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit", "deit", "vit_reg_avg"])
@pytest.mark.parametrize("deep", [False, True])
def test_vpt_shapes_counts_placement_and_gradients(name, deep):
    model, inputs = build(name)
    features = model.forward_features(inputs["x"])
    inject_visual_prompts(model, N, deep=deep)
    blocks, p = list(model.blocks), model.num_prefix_tokens
    dim, depth = model.embed_dim, len(blocks)
    assert count_parameters(model).trainable == (depth if deep else 1) * N * dim + sum(
        q.numel() for q in head_params(model)
    )
    seen = []
    for block in blocks:  # registered after ours: these see what the blocks see
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    out = model.forward_features(inputs["x"])
    assert out.shape == features.shape  # prompts are dropped after the last block, whatever the pooling
    weight = prompt_weight(model)
    for i, x in enumerate(seen):
        assert x.shape[1] == features.shape[1] + N
        if i == 0 or deep:
            assert torch.equal(x[:, p : p + N], weight[i].expand(2, -1, -1))  # right after the prefix tokens
        else:
            assert not torch.equal(x[:, p : p + N], weight[0].expand(2, -1, -1))
    model.forward_head(out).sum().backward()
    got = {id(q) for q in model.parameters() if q.grad is not None}
    assert got == {id(weight)} | {id(q) for q in head_params(model)}


@pytest.mark.parametrize("name", ["vit", "deit", "vit_reg_avg"])
def test_vpt_learns(name):
    model, inputs = build(name)
    inject_visual_prompts(model, 4, deep=True)
    losses = train(model, inputs, lr=1e-1)
    assert losses[-1] < 0.7 * losses[0], losses


def test_vpt_remove_copy_replay():
    model, inputs = build("deit")
    reference = run(model, inputs)
    inject_visual_prompts(model, N, deep=True)
    prompted = run(model, inputs)
    assert not torch.allclose(prompted, reference)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(run(clone, inputs), prompted)
    fresh, _ = build("deit")
    replay_surgery(fresh, surgery_records(model))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(run(fresh, inputs), prompted)
    remove_visual_prompts(model)
    assert not visual_prompts(model) and torch.equal(run(model, inputs), reference)


# -- callbacks in a real fit ----------------------------------------------------------------------------------------
class _Task(L.LightningModule):
    def __init__(self, name: str):
        super().__init__()
        self.model = build(name)[0].train()

    def training_step(self, batch, batch_idx):
        if len(batch) == 1:  # language modelling
            (ids,) = batch
            return self.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=5e-2)


def _fit(module: L.LightningModule, callback, data, tmp_path) -> None:
    trainer = L.Trainer(
        max_steps=4,
        callbacks=[callback],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)


def test_prompt_tuning_callback_fit_and_generate(tmp_path):
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randint(3, 99, (8, 6))), batch_size=4)
    callback = pickle.loads(pickle.dumps(PromptTuningCallback(num_virtual_tokens=N, init_token_ids=[4, 5])))
    module = _Task("gpt2")
    embedding = module.model.get_input_embeddings().weight.detach().clone()
    _fit(module, callback, data, tmp_path)
    weight = prompt_weight(module.model)
    assert callback.parameter_count.trainable == N * 32
    assert not torch.equal(weight, embedding[[4, 5, 4]]) and torch.equal(module.model.transformer.wte.weight, embedding)
    ids = torch.randint(3, 99, (2, 5))
    out = module.model.eval().generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, 7) and torch.equal(out[:, :5], ids)


def test_visual_prompt_callback_fit(tmp_path):
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=4)
    callback = pickle.loads(pickle.dumps(VisualPromptCallback(num_virtual_tokens=N, deep=True)))
    module = _Task("deit")
    _fit(module, callback, data, tmp_path)
    assert callback.parameter_count.trainable == 2 * N * 32 + 32 * 3 + 3
    assert callback.state_dict()["config"] == {
        "num_virtual_tokens": N,
        "deep": True,
        "dropout": 0.0,
        "train_head": True,
        "train_bn": False,
    }
    with pytest.raises(ValueError, match="use inject_visual_prompts / VisualPromptCallback"):
        _fit(_Task("deit"), PromptTuningCallback(num_virtual_tokens=N), data, tmp_path)


def test_inputs_embeds_calls_and_yaml_configs():
    from jsonargparse import ArgumentParser

    model, inputs = build("bert")
    inject_prompt_tuning(model, N)
    embeds = model.get_input_embeddings()(inputs["input_ids"])  # the user's own embedding call gets no prompt
    from_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(from_embeds, run(model, inputs))
    encoder = model.bert  # a bare encoder: last_hidden_state lines up with the user's tokens again
    remove_prompt_tuning(model)
    inject_prompt_tuning(encoder, N)
    out = encoder(**inputs, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 7, 32)
    torch.testing.assert_close(out.last_hidden_state, out.hidden_states[-1][:, N:])

    parser = ArgumentParser()
    parser.add_class_arguments(PromptTuningCallback, "soft")
    parser.add_class_arguments(VisualPromptCallback, "visual")
    config = parser.parse_string("soft:\n  num_virtual_tokens: 4\n  init: vocab\nvisual:\n  deep: true\n")
    built = parser.instantiate(config)
    assert built.soft.num_virtual_tokens == 4 and built.soft.init == "vocab" and built.visual.deep is True
