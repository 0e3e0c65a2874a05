"""Several named base tasks: the accuracy matrix, average accuracy and BWT equal a hand computation (Avalanche /
GEM definitions) on a 3-task toy, one ``ForgettingMonitor`` reused for sequential fine-tunes gives the same matrix as
scoring by hand, and base labels outside the head's classes are an error, not an accuracy of 0."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks.callbacks.forgetting import ForgettingMonitor
from peft_callbacks.forgetting.continual import TaskMatrix


def test_bwt_and_average_accuracy_equal_hand_computation_on_a_three_task_toy():
    r = [  # R[i][j]: accuracy on task j after training task i (Lopez-Paz & Ranzato 2017, §5)
        [0.90, 0.10, 0.20],
        [0.70, 0.80, 0.15],
        [0.60, 0.50, 0.95],
    ]
    matrix = TaskMatrix(["A", "B", "C"])
    matrix.record({"A": 0.30, "B": 0.20, "C": 0.25}, trained=None)  # before any fine-tune
    for i, task in enumerate("ABC"):
        matrix.record(dict(zip("ABC", r[i])), trained=task)
        learned = "ABC"[: i + 1]
        assert matrix.average() == pytest.approx(sum(r[i][: i + 1]) / len(learned))  # A_k: tasks seen so far
    assert matrix.matrix()[1:] == r
    # forgetting: accuracy just after learning the task - accuracy now; none yet for the task just learned
    assert matrix.forgetting("A") == pytest.approx(0.90 - 0.60)
    assert matrix.forgetting("B") == pytest.approx(0.80 - 0.50)
    assert matrix.forgetting("C") is None
    bwt = ((r[2][0] - r[0][0]) + (r[2][1] - r[1][1])) / 2  # GEM: 1/(T-1) Σ_{i<T} R[T,i] - R[i,i]
    assert matrix.bwt() == pytest.approx(bwt) == pytest.approx(-0.30)
    assert matrix.average() == pytest.approx((0.60 + 0.50 + 0.95) / 3)
    assert "backward transfer (BWT): -0.3000" in matrix.summary_table("accuracy")


def test_base_tasks_learned_before_count_from_the_start_row_and_future_tasks_not_at_all():
    matrix = TaskMatrix(["old", "new", "later"])
    matrix.record({"old": 0.9, "new": 0.2, "later": 0.3}, trained=None)
    assert matrix.reference_row("old", training="new") == 0  # learned before the first fine-tune
    assert matrix.reference_row("later", training="new") is None  # not learned yet
    matrix.record({"old": 0.6, "new": 0.8, "later": 0.35}, trained="new")
    assert matrix.forgetting("old") == pytest.approx(0.3) and matrix.forgetting("later") is None
    assert matrix.bwt() == pytest.approx(-0.3) and matrix.average() == pytest.approx(0.7)
    loss = TaskMatrix(["a"], higher_is_better=False)  # a loss that rises is forgetting
    loss.record({"a": 1.0}, trained=None)
    loss.record({"a": 1.5}, trained=None)
    assert loss.forgetting("a") == pytest.approx(0.5) and loss.bwt() == pytest.approx(-0.5)


# -- the monitor over sequential fine-tunes ------------------------------------------------------------------------
class Shared(L.LightningModule):
    """One 6-class head shared by three 2-class tasks (class-incremental): task k has labels 2k, 2k + 1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 6))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def task(k: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 4, generator=g)
    x[:, k] += 3.0  # each task lives in its own corner of the input space
    return DataLoader(TensorDataset(x, 2 * k + (x[:, 3] > 0).long()), batch_size=8)


def hand_accuracy(module: nn.Module, loader: DataLoader) -> float:
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    with torch.no_grad():
        return (module(x).argmax(-1) == y).float().mean().item()


def fit(module, callbacks, train, epochs=3, ckpt_path=None):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    trainer.fit(module, train, ckpt_path=ckpt_path)
    return trainer


def test_one_monitor_over_three_sequential_fine_tunes_reports_the_hand_matrix(tmp_path):
    held_out = {name: task(k, seed=10 + k) for k, name in enumerate("ABC")}
    monitor = ForgettingMonitor(held_out, plot_dir=str(tmp_path))
    module = Shared()
    hand = [[hand_accuracy(module, held_out[n]) for n in "ABC"]]
    for k, name in enumerate("ABC"):
        monitor.task = name
        trainer = fit(module, [monitor], task(k, seed=k))
        hand.append([hand_accuracy(module, held_out[n]) for n in "ABC"])
    for got, want in zip(monitor.matrix.matrix(), hand):
        assert got == pytest.approx(want, abs=1e-6)
    assert [row["trained"] for row in monitor.matrix.rows] == [None, "A", "B", "C"]
    bwt = ((hand[3][0] - hand[1][0]) + (hand[3][1] - hand[2][1])) / 2
    assert monitor.matrix.bwt() == pytest.approx(bwt, abs=1e-6) and bwt < 0  # the toy forgets
    assert monitor.matrix.average() == pytest.approx(sum(hand[3]) / 3, abs=1e-6)
    metrics = trainer.callback_metrics
    assert metrics["forgetting/bwt"].item() == pytest.approx(bwt, abs=1e-6)
    assert metrics["forgetting/A/base_accuracy"].item() == pytest.approx(hand[3][0], abs=1e-6)
    assert metrics["forgetting/A/forgetting"].item() == pytest.approx(hand[1][0] - hand[3][0], abs=1e-6)
    assert "forgetting/C/forgetting" not in metrics or monitor.latest["tasks"]["C"]["forgetting"] is None
    assert monitor.plot_path.endswith("forgetting.png")


def test_several_base_tasks_in_one_fit_and_resume_keeps_the_matrix(tmp_path):
    held_out = {"A": task(0, seed=10), "B": task(1, seed=11)}
    module = Shared()
    fit(module, [ForgettingMonitor({"A": task(0, 0), "B": task(1, 1)}, plot=False)], task(0, seed=0))  # learn A, B
    fit(module, [ForgettingMonitor({"A": task(0, 0)}, plot=False)], task(1, seed=1))
    start = [hand_accuracy(module, held_out[n]) for n in "AB"]

    first = ForgettingMonitor(held_out, plot=False)  # task None: the fit trains C, outside the dict
    fit(copy.deepcopy(module), [first, ModelCheckpoint(dirpath=str(tmp_path), save_last=True)], task(2, 2), epochs=1)
    second = ForgettingMonitor(held_out, plot=False)
    resumed = fit(
        Shared(),
        [second, ModelCheckpoint(dirpath=str(tmp_path), save_last=True)],
        task(2, 2),
        epochs=3,
        ckpt_path=str(tmp_path / "last.ckpt"),
    )
    straight = ForgettingMonitor(held_out, plot=False)
    fit(module, [straight], task(2, seed=2), epochs=3)
    assert second.matrix.rows[0]["values"] == pytest.approx(dict(zip("AB", start)))
    assert [r["trained"] for r in second.matrix.rows] == [None, None]
    for name in "AB":
        assert second.matrix.forgetting(name) == pytest.approx(straight.matrix.forgetting(name), abs=1e-6)
    assert resumed.callback_metrics["forgetting/bwt"].item() == pytest.approx(straight.matrix.bwt(), abs=1e-6)


def test_task_names_and_heads_are_checked():
    loader = task(0, 0)
    with pytest.raises(ValueError, match="`dataloader` is an empty dict"):
        ForgettingMonitor({})
    with pytest.raises(ValueError, match="task names must be non-empty strings without '/'"):
        ForgettingMonitor({"a/b": loader})
    with pytest.raises(TypeError, match=r"`dataloader\['a'\]` must be a DataLoader"):
        ForgettingMonitor({"a": 3})
    with pytest.raises(ValueError, match=r"`base_head` keys must be task names of `dataloader` \(\['a'\]\)"):
        ForgettingMonitor({"a": loader}, base_head={"b": nn.Linear(16, 6)})
    with pytest.raises(TypeError, match="`base_head` is a dict, which needs `dataloader` to be a dict"):
        ForgettingMonitor(loader, base_head={"a": nn.Linear(16, 6)})
    monitor = ForgettingMonitor({"a": loader}, plot=False)
    monitor.task = "z"
    with pytest.raises(ValueError, match=r"`task`='z' is not one of the monitored tasks \['a'\]"):
        fit(Shared(), [monitor], loader, epochs=1)


def test_base_labels_outside_the_head_are_an_error_naming_labels_and_head_size():
    """Before, labels 6 and 9 on a 6-class head were scored as wrong answers: accuracy 0.0 and no error."""
    outside = DataLoader(TensorDataset(torch.randn(8, 4), torch.tensor([0, 1, 6, 9, 2, 3, 6, 1])), batch_size=4)
    with pytest.raises(ValueError, match=r"labels \[6, 9\] are outside the 6 classes \(0..5\) of the model's current"):
        fit(Shared(), [ForgettingMonitor(outside, plot=False)], task(0, 0), epochs=1)
    original = nn.Linear(16, 4)
    with pytest.raises(ValueError, match=r"labels \[6, 9\] are outside the 4 classes .*`base_head`"):
        fit(Shared(), [ForgettingMonitor(outside, base_head=original, plot=False)], task(0, 0), epochs=1)
    for metric in ("loss", "f1"):
        with pytest.raises(ValueError, match=r"labels \[6, 9\] are outside"):
            fit(Shared(), [ForgettingMonitor(outside, metric=metric, plot=False)], task(0, 0), epochs=1)
    ignored = DataLoader(TensorDataset(torch.randn(4, 4), torch.tensor([0, -100, 5, 1])), batch_size=4)
    monitor = ForgettingMonitor(ignored, plot=False)  # -100 is the ignore index, not a class
    fit(Shared(), [monitor], task(0, 0), epochs=1)
    assert monitor.baseline is not None
