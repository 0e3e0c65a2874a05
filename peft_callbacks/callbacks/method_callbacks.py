"""The typed callbacks of the methods that need no hooks of their own: :class:`~peft_callbacks.PEFTCallback` with each
method's settings as typed ``__init__`` keywords, so LightningCLI checks them in YAML::

    trainer:
      callbacks:
        - class_path: peft_callbacks.OFTCallback
          init_args: {oft_block_size: 16, target_modules: [query, value]}

Each class is its docstring and one :func:`~peft_callbacks.callbacks.options.typed_callback` line: its arguments are
the fields of the method's config and of :class:`~peft_callbacks.callbacks.options.CallbackOptions`, declared there
once. LoRA and AdaLoRA, which act on the optimizer and the schedule too, have files of their own
(:mod:`~peft_callbacks.callbacks.lora`, :mod:`~peft_callbacks.callbacks.adalora`).
"""

from __future__ import annotations

from peft_callbacks.callbacks.options import typed_callback
from peft_callbacks.callbacks.peft import PEFTCallback
from peft_callbacks.methods.bottleneck.method import BottleneckConfig
from peft_callbacks.methods.ia3 import IA3Config
from peft_callbacks.methods.loha import LoHaConfig
from peft_callbacks.methods.lokr import LoKrConfig
from peft_callbacks.methods.oft import OFTConfig
from peft_callbacks.methods.prompts.soft import PromptTuningConfig
from peft_callbacks.methods.prompts.visual import VisualPromptConfig
from peft_callbacks.methods.vera import VeRAConfig

__all__ = [
    "AdapterCallback",
    "IA3Callback",
    "LoHaCallback",
    "LoKrCallback",
    "OFTCallback",
    "PromptTuningCallback",
    "VeRACallback",
    "VisualPromptCallback",
]


# -- layer methods: merged into a plain model at the end --------------------------------------------------------------
@typed_callback(IA3Config)
class IA3Callback(PEFTCallback):
    """Fine-tune with IA3: learned vectors rescale each adapted layer, merged into a plain model at the end.

    IA3 (Liu et al. 2022): one learned vector per adapted layer rescales its output (its input for feed-forward
    layers); only the vectors (+ the task head) train, and they fold into the base weights when training ends.

    See :mod:`peft_callbacks.methods.ia3` for the method and :class:`~peft_callbacks.PEFTCallback` for what happens
    when.

    Example::

        >>> from peft_callbacks.demo import ImageClassifier, quiet_trainer, random_loader  # any LightningModule, data
        >>> module, ia3 = ImageClassifier("test_vit", num_classes=3), IA3Callback(target_modules=["qkv", "fc2"])
        >>> quiet_trainer(max_steps=2, callbacks=[ia3]).fit(module, random_loader(8, shape=(3, 32, 32), classes=3))
        >>> ia3.parameter_count.percent < 5, type(module.model.blocks[0].attn.qkv).__name__  # merged at the end
        (True, 'Linear')
    """


@typed_callback(LoHaConfig)
class LoHaCallback(PEFTCallback):
    """Fine-tune with LoHa: a Hadamard product of two low-rank updates, merged into a plain model at the end.

    Only its tensors (+ the task head) train.

    See :mod:`peft_callbacks.methods.loha` for the method and :class:`~peft_callbacks.PEFTCallback` for what happens
    when.

    Example::

        >>> from peft_callbacks.demo import ImageClassifier, quiet_trainer, random_loader
        >>> loha = LoHaCallback(rank=4, alpha=8, train_bn=True)  # timm's zero-initialised BatchNorm scales may move
        >>> quiet_trainer(max_steps=2, callbacks=[loha]).fit(ImageClassifier("test_resnet", num_classes=3),
        ...                                                   random_loader(8, shape=(3, 32, 32), classes=3))
        >>> loha.parameter_count.percent < 25
        True
    """


@typed_callback(LoKrConfig)
class LoKrCallback(PEFTCallback):
    """Fine-tune with LoKr: a Kronecker product of a small and a low-rank matrix, merged at the end.

    Only its tensors (+ the task head) train.

    See :mod:`peft_callbacks.methods.lokr` for the method and :class:`~peft_callbacks.PEFTCallback` for what happens
    when.

    Example::

        >>> from peft_callbacks import adapter_names
        >>> from peft_callbacks.demo import ImageClassifier, quiet_trainer, random_loader
        >>> lokr, module = LoKrCallback(rank=4, merge_on_train_end=False), ImageClassifier("test_vit", num_classes=3)
        >>> quiet_trainer(max_steps=2, callbacks=[lokr]).fit(module, random_loader(8, shape=(3, 32, 32), classes=3))
        >>> adapter_names(module)  # left unmerged: the adapter stays in the model
        ['default']
    """


@typed_callback(OFTConfig)
class OFTCallback(PEFTCallback):
    """Fine-tune with OFT: a learned orthogonal rotation of each adapted layer's input, merged at the end.

    The rotation is block-diagonal, each block the Cayley transform of a skew-symmetric matrix; only the rotations
    (+ the task head) train.

    See :mod:`peft_callbacks.methods.oft` for the method and :class:`~peft_callbacks.PEFTCallback` for what happens
    when.

    Example::

        >>> oft = OFTCallback(oft_block_size=8, coft=True, target_modules=["qkv"])
        >>> oft.config.coft, oft.merge_on_train_end  # constrained OFT, merged into plain layers when training ends
        (True, True)
    """


@typed_callback(VeRAConfig)
class VeRACallback(PEFTCallback):
    """Fine-tune with VeRA: two trained vectors per layer around shared frozen random projections, merged at the end.

    Each Linear / ``Conv1D`` layer gets the vectors; the random projections are shared by all adapted layers
    (:mod:`peft_callbacks.methods.vera`).

    The projections are drawn from ``projection_prng_key`` and never stored: the adapter file holds the vectors and
    the seed (a reload draws the same projections). Layers are chosen as by :class:`~peft_callbacks.LoRACallback`,
    Linear and ``Conv1D`` only (as in HF PEFT); the task head trains in full by default.

    Example::

        >>> from peft_callbacks.demo import ImageClassifier, quiet_trainer, random_loader
        >>> vera = VeRACallback(rank=32)
        >>> trainer = quiet_trainer(max_steps=2, callbacks=[vera])
        >>> trainer.fit(ImageClassifier("test_vit", num_classes=3), random_loader(8, shape=(3, 32, 32), classes=3))
        >>> vera.parameter_count.trainable  # the vectors of every Linear layer + the 3-class head
        4035
    """


# -- module methods: they stay in the model ---------------------------------------------------------------------------
@typed_callback(BottleneckConfig)
class AdapterCallback(PEFTCallback):
    """Fine-tune with bottleneck adapters: only the adapters (+ the task head, + norms if asked) are trained.

    Adapters are inserted after the attention and MLP sub-layers of every transformer block (``"houlsby"``) or after
    the MLP only (``"pfeiffer"``) of the timm / transformers models inside the LightningModule, found by their block
    structure (see :mod:`peft_callbacks.methods.bottleneck.points`). Surgery runs right after ``configure_model``,
    before a checkpoint is restored and optimizers are built. Adapters cannot be merged: they stay in the model after
    training, and are what an adapter file stores.

    Example::

        >>> from peft_callbacks.demo import ImageClassifier, quiet_trainer, random_loader  # any LightningModule, data
        >>> deit = dict(img_size=32, depth=2, embed_dim=32, num_heads=2)  # a tiny DeiT: 2 blocks of width 32
        >>> module = ImageClassifier("deit_tiny_patch16_224", num_classes=3, model_kwargs=deit)
        >>> data = random_loader(8, shape=(3, 32, 32), classes=3, batch_size=4)
        >>> adapters = AdapterCallback(bottleneck=4, placement="pfeiffer")
        >>> trainer = quiet_trainer(max_steps=2, callbacks=[adapters])
        >>> trainer.fit(module, data)
        >>> adapters.parameter_count.trainable  # 2 adapters x (2*32*4 + 32 + 4) + head 32*3 + 3
        683
    """


@typed_callback(PromptTuningConfig)
class PromptTuningCallback(PEFTCallback):
    """Prompt tuning (Lester et al. 2021) for the transformers models inside a LightningModule.

    ``num_virtual_tokens`` learned embeddings are put in front of every input; ``attention_mask``,
    ``token_type_ids``, ``position_ids`` and token-level ``labels`` (``-100``) are extended inside the model call
    and the prompt positions are dropped from token-level ``logits``, so the module's ``training_step`` stays as it
    is. The rest of the model is frozen (the task head stays trainable unless ``train_head=False``). For timm Vision
    Transformers use :class:`VisualPromptCallback`: the two take different settings and work on different families,
    so a YAML file says which one it means.

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


@typed_callback(VisualPromptConfig)
class VisualPromptCallback(PEFTCallback):
    """Visual prompt tuning (VPT, Jia et al. 2022) for the timm Vision Transformers inside a LightningModule.

    Learned tokens go after the class/register tokens before the first block (shallow) or before every block
    (deep) and are taken out after the last block, so pooling and the head see what they saw before. The rest of
    the model is frozen (the classifier stays trainable unless ``train_head=False``). For transformers text models
    use :class:`PromptTuningCallback`.

    Example::

        >>> cb = VisualPromptCallback(num_virtual_tokens=10, deep=True)
        >>> cb.num_virtual_tokens, cb.deep
        (10, True)
    """
