"""The ``README.md`` model card that ``save_adapter`` / ``export_peft`` write: what the Hub reads (front matter), what a
reader needs (base, method, targets, trainable share, how to load), and never over a README the user wrote."""

from __future__ import annotations

import pytest
import torch.nn as nn
from huggingface_hub import ModelCard
from zoo import HF_MODELS

from peft_callbacks.core.params import count_parameters
from peft_callbacks.io import export_peft, save_adapter
from peft_callbacks.io.atomic import MANIFEST
from peft_callbacks.io.model_card import CARD_FILE, MARKER, model_card
from peft_callbacks.methods.lora import inject_lora

SAVES = {"adapter": save_adapter, "peft": export_peft}


def tuned_bert(**options) -> nn.Module:
    model = HF_MODELS["bert"]()[0]
    model.config._name_or_path = "tiny-org/tiny-bert"
    return inject_lora(model, **{"rank": 4, "alpha": 8, "target_modules": ["query", "value"], **options})


@pytest.mark.parametrize("kind", sorted(SAVES))
def test_the_card_says_what_the_hub_and_a_reader_need(tmp_path, kind):
    model = tuned_bert(rank_pattern={"value": 2})
    SAVES[kind](model, tmp_path)
    text = (tmp_path / CARD_FILE).read_text()
    card = ModelCard(text)  # what huggingface_hub reads from a repository's README.md
    assert card.data.base_model == "tiny-org/tiny-bert"
    assert card.data.library_name == ("peft" if kind == "peft" else "peft_callbacks")
    assert {"lora", "base_model:adapter:tiny-org/tiny-bert"} <= set(card.data.tags)
    assert MARKER in text and "| default | LoRA | r=4 alpha=8, rank_pattern=2 layer(s) |" in text
    assert "`bert.encoder.layer.1.attention.self.value`" in text  # every target (4 here) is named
    count = count_parameters(model)
    assert f"Trainable parameters: {count.trainable:,} of {count.total:,} ({count.trainable / count.total:.2%})" in text
    assert ("PeftModel.from_pretrained" in text) is (kind == "peft")
    assert "load_adapter" in text or kind == "peft"


@pytest.mark.parametrize("kind", sorted(SAVES))
def test_a_readme_the_user_wrote_is_never_overwritten_or_removed(tmp_path, kind):
    (tmp_path / CARD_FILE).write_bytes(b"# My own notes\n")
    SAVES[kind](tuned_bert(), tmp_path)
    assert (tmp_path / CARD_FILE).read_bytes() == b"# My own notes\n"
    assert (tmp_path / "adapter_model.safetensors").is_file()  # the save itself happened


@pytest.mark.parametrize("kind", sorted(SAVES))
def test_our_card_is_rewritten_but_once_the_user_takes_it_over_it_stays(tmp_path, kind):
    SAVES[kind](tuned_bert(), tmp_path)
    SAVES[kind](tuned_bert(rank=2), tmp_path)  # ours: updated with the new save
    assert "r=2 alpha=8" in (tmp_path / CARD_FILE).read_text()
    edited = (tmp_path / CARD_FILE).read_text().replace(MARKER + "\n", "") + "My results: 91%.\n"
    (tmp_path / CARD_FILE).write_text(edited)  # the marker line deleted: the card is the user's now
    SAVES[kind](tuned_bert(rank=3), tmp_path)
    assert (tmp_path / CARD_FILE).read_text() == edited
    assert CARD_FILE not in (tmp_path / MANIFEST).read_text()  # no later save may remove it as stale


def test_a_multi_adapter_export_has_one_card_at_the_top_naming_each_adapter(tmp_path):
    model = inject_lora(tuned_bert(), rank=2, target_modules=["key"], adapter_name="extra", train_head=False)
    export_peft(model, tmp_path, adapter_name=None)
    text = (tmp_path / CARD_FILE).read_text()
    assert "| default | LoRA | r=4 alpha=8 |" in text and "| extra | LoRA | r=2 alpha=16, train_head=False |" in text
    assert not (tmp_path / "extra" / CARD_FILE).exists()
    assert model_card(model, "peft") == text  # the same model gives the same card


def test_a_save_for_one_adapter_names_only_that_adapter(tmp_path):
    model = inject_lora(tuned_bert(), rank=2, target_modules=["key"], adapter_name="extra", train_head=False)
    save_adapter(model, tmp_path, adapter_name="extra")
    text = (tmp_path / CARD_FILE).read_text()
    assert "| extra | LoRA |" in text and "| default |" not in text
