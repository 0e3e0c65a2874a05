"""ForgettingBudget: the controller on toys, the callback holding a budget an unconstrained run breaks, resume, the
normalised penalties, and bad input."""

from __future__ import annotations

import glob
import math
import os
import pickle

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_forgetting_every_method import MERGEABLE
from test_forgetting_every_method import Net as EveryMethodNet
from test_forgetting_every_method import _data as method_data
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks import ForgettingBudget
from peft_callbacks.callbacks.lora import LoRACallback
from peft_callbacks.callbacks.peft import PEFTCallback
from peft_callbacks.callbacks.regularization import EWCCallback, L2SPCallback
from peft_callbacks.forgetting.anchors import UpdateAnchor
from peft_callbacks.forgetting.budget import BudgetController, noise_margin
from peft_callbacks.forgetting.penalties import l2sp_penalty, normalizing_scale, start_square_norm
from peft_callbacks.forgetting.scoring import BaseTaskScorer


class NewTask(L.LightningModule):
    """A backbone with a new 3-class head; the base task goes through ``original_head()`` (5 classes)."""

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def original_head() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(32, 5)


def base_loader(module: NewTask, head: nn.Module, labels: bool = True) -> DataLoader:
    """Base inputs labelled by the original model itself: base accuracy starts at 1."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, generator=g)
    with torch.no_grad():
        y = head(module.net[:4](x)).argmax(-1)
    return DataLoader(TensorDataset(x, y) if labels else TensorDataset(x), batch_size=16)


def train_loader() -> DataLoader:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 8, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=8)


def trainer(tmp_path=None, callbacks=(), **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        max_epochs=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), default_root_dir=tmp_path, **options)


def base_forgetting(module: NewTask, head: nn.Module, loader: DataLoader, baseline: float = 1.0) -> float:
    scorer = BaseTaskScorer(module, metric="accuracy", base_head=head, drift=False)
    return baseline - scorer.score(loader).value


# -- the controller -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "response",
    [
        lambda s: 0.5 / (1 + s / 100),  # λ* ≈ 525
        lambda s: 0.4 * math.exp(-s / 1e5),  # another scale: λ* ≈ 1.6e5
        lambda s: 0.03 + 0.3 / (1 + s),  # λ* ≈ 5
    ],
)
def test_controller_converges_to_its_target_where_forgetting_is_a_known_function_of_the_strength(response):
    controller = BudgetController(max_forgetting=0.1)  # target 0.08
    trajectory = []
    for _ in range(120):
        controller.update(response(controller.multiplier))
        trajectory.append(response(controller.multiplier))
    assert controller.target == pytest.approx(0.08)
    assert trajectory[-1] == pytest.approx(0.08, abs=0.004)
    assert max(trajectory[-20:]) <= 0.1  # it settled under the budget
    assert BudgetController(max_forgetting=0.1).update(0.0) == 0.0  # under budget from the start: no penalty


def test_controller_releases_the_penalty_when_forgetting_is_low():
    controller = BudgetController(max_forgetting=0.1)
    for _ in range(5):
        controller.update(0.3)
    high = controller.multiplier
    for _ in range(40):
        controller.update(0.0)
    assert high > 1.0 and controller.multiplier == 0.0


# -- the callback -----------------------------------------------------------------------------------------------------
def test_budget_keeps_forgetting_under_the_budget_where_the_unconstrained_run_exceeds_it():
    free = NewTask()
    head = original_head()
    trainer().fit(free, train_loader())
    assert base_forgetting(free, head, base_loader(NewTask(), head)) > 0.3

    module = NewTask()
    base = base_loader(module, head)
    budget = ForgettingBudget(base, max_forgetting=0.1, base_head=head, every_n_steps=2)
    fit = trainer(callbacks=[budget])
    fit.fit(module, train_loader())
    assert fit.optimizers[0].param_groups[0]["lr"] == 0.5  # the scaled learning rate was only for the steps
    assert budget.baseline == 1.0
    assert budget.final_forgetting == pytest.approx(base_forgetting(module, head, base))
    assert budget.final_forgetting <= 0.1
    assert max(r["multiplier"] for r in budget.history) > 0
    assert any(r["lr_scale"] < 1 for r in budget.history)  # plain SGD: the penalty alone would be unstable
    # it still learned the new task
    x, y = next(iter(DataLoader(train_loader().dataset, batch_size=64)))
    assert (module(x).argmax(-1) == y).float().mean() > 0.6


def test_budget_with_lora_and_full_fine_tuning_logs_every_reading(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = NewTask(lr=0.2)
    head = original_head()
    budget = ForgettingBudget(base_loader(module, head), max_forgetting=0.05, base_head=head, every_n_steps=4)
    fit = trainer(
        tmp_path, [LoRACallback(rank=2, alpha=4), budget], max_steps=24, logger=CSVLogger(str(tmp_path), name="b")
    )
    fit.fit(module, train_loader())
    # every step over the first every_n_steps · full_every = 20 steps, where forgetting rises fastest; then every 4
    assert [r["step"] for r in budget.history] == [*range(1, 21), 24] and budget.final_forgetting is not None
    copy = pickle.loads(pickle.dumps(budget))  # callbacks pickle (spawned processes, checkpoints of the trainer)
    assert copy.history == budget.history and copy.multiplier == budget.multiplier
    (path,) = glob.glob(os.path.join(str(tmp_path), "b", "*", "metrics.csv"))
    header = open(path).readline()
    for key in ("budget/multiplier", "budget/forgetting", "budget/kl", "budget/final_forgetting"):
        assert key in header


def test_without_base_labels_the_budget_holds_the_feature_drift():
    head = original_head()
    free = NewTask()
    unconstrained = ForgettingBudget(base_loader(free, head, labels=False), 1.0, metric=None, every_n_steps=2)
    trainer(callbacks=[unconstrained]).fit(free, train_loader())  # a budget of 1 never acts: it only measures
    assert unconstrained.multiplier == 0 and unconstrained.final_forgetting > 0.05

    module = NewTask()
    budget = ForgettingBudget(base_loader(module, head, labels=False), 0.02, metric=None, every_n_steps=2)
    trainer(callbacks=[budget]).fit(module, train_loader())
    assert budget.baseline == pytest.approx(1.0)  # the cosine of the starting features with themselves
    assert max(r["multiplier"] for r in budget.history) > 0
    assert budget.final_forgetting <= 0.02 < unconstrained.final_forgetting


def pretrained_base() -> tuple[dict, nn.Module, DataLoader, DataLoader]:
    """A backbone and the original head trained on a base task (5 classes of a linear teacher): its state, the head,
    a held-out base set (128 examples) and the base training set (384, shuffled) to replay."""
    torch.manual_seed(7)
    teacher = torch.randn(8, 5)
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(8))
    y = (x @ teacher).argmax(-1)
    module, head = NewTask(), original_head()
    optimizer = torch.optim.Adam([*module.net[:4].parameters(), *head.parameters()], lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(head(module.net[:4](x[:384])), y[:384]).backward()
        optimizer.step()
    held_out = DataLoader(TensorDataset(x[384:], y[384:]), batch_size=32)
    shuffled = torch.Generator().manual_seed(9)
    train = DataLoader(TensorDataset(x[:384], y[:384]), batch_size=32, shuffle=True, generator=shuffled)
    return module.net[:4].state_dict(), head, held_out, train


def from_base(state: dict, lr: float) -> NewTask:
    module = NewTask(lr=lr)
    module.net[:4].load_state_dict(state)
    return module


def new_task_accuracy(module: NewTask) -> float:
    x, y = next(iter(DataLoader(train_loader().dataset, batch_size=64)))
    with torch.no_grad():
        return float((module(x).argmax(-1) == y).float().mean())


def test_replay_budget_holds_a_fast_rise_on_a_20_step_run_and_keeps_most_of_the_new_task():
    state, head, held_out, train = pretrained_base()
    free = from_base(state, lr=1.5)  # plain SGD at a high rate: forgetting passes 0.3 within 20 steps
    start = new_task_accuracy(free)
    trainer(max_steps=20).fit(free, train_loader())
    baseline = BaseTaskScorer(from_base(state, 1.5), metric="accuracy", base_head=head, drift=False).score(held_out)
    free_gain = new_task_accuracy(free) - start
    assert base_forgetting(free, head, held_out, baseline.value) > 0.3 and free_gain > 0.1

    module = from_base(state, lr=1.5)
    budget = ForgettingBudget(held_out, 0.1, base_head=head, every_n_steps=2, replay=train, restore=False)
    trainer(callbacks=[budget], max_steps=20).fit(module, train_loader())
    assert budget.final_forgetting == pytest.approx(base_forgetting(module, head, held_out, baseline.value))
    assert budget.final_forgetting <= 0.1  # held by the controller alone (no end-of-fit restore)
    assert [r["step"] for r in budget.history][:10] == list(range(1, 11))  # every step at the start
    shares = [r["replay_share"] for r in budget.history]
    assert all(0.0 <= s <= 0.8 for s in shares) and max(shares) > 0.5  # it raised the share when forgetting rose
    assert new_task_accuracy(module) - start > 0.75 * free_gain  # most of the new task's progress kept


def test_the_margin_comes_from_the_split_to_split_noise_of_the_base_score():
    module, head = NewTask(), original_head()
    budget = ForgettingBudget(base_loader(module, head), 0.1, base_head=head, every_n_steps=2)
    trainer(callbacks=[budget], max_steps=2).fit(module, train_loader())
    assert budget.target == pytest.approx((1 - noise_margin(0.1, 64)) * 0.1)  # 64 base examples
    assert 0.5 < budget.target / 0.1 < 0.7
    fixed = ForgettingBudget(base_loader(module, head), 0.1, base_head=head, margin=0.2)
    trainer(callbacks=[fixed], max_steps=2).fit(NewTask(), train_loader())
    assert fixed.target == pytest.approx(0.08)


def test_a_final_state_over_the_budget_is_restored_to_the_latest_state_that_met_it():
    state, head, held_out, _ = pretrained_base()
    kept: dict[int, dict] = {}

    class Keep(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            kept[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    # readings at steps 1-3 only: the controller cannot act on the rest, the end-of-fit check must
    budget = ForgettingBudget(held_out, 0.1, base_head=head, every_n_steps=1000, dense_steps=3, margin=0.0)
    module = from_base(state, lr=3.0)
    trainer(callbacks=[budget, Keep()], max_steps=20).fit(module, train_loader())
    met = [r["step"] for r in budget.history if r["measured_forgetting"] is not None and r["forgetting"] <= 0.1]
    assert met and budget.restored_step == met[-1]  # the latest full score that met it
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, kept[budget.restored_step][name], msg=name)
    assert budget.final_forgetting <= 0.1
    free = ForgettingBudget(held_out, 0.1, base_head=head, every_n_steps=1000, dense_steps=3, restore=False)
    trainer(callbacks=[free], max_steps=20).fit(from_base(state, lr=3.0), train_loader())
    assert free.final_forgetting > 0.1 and free.restored_step is None  # without restore: over the budget


def _fit_with_checkpoints(
    tmp_path, name: str, ckpt_path=None, metric: str | None = "accuracy", replay: bool = False
) -> tuple[ForgettingBudget, NewTask]:
    module = NewTask()
    head = original_head()
    data = base_loader(module, head, labels=metric is not None)
    bound = 0.1 if metric else 0.02
    options = {"replay": base_loader(module, head)} if replay else {}  # in order: the stream resumes in place
    budget = ForgettingBudget(data, max_forgetting=bound, base_head=head, every_n_steps=2, metric=metric, **options)
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / name), every_n_train_steps=16, save_top_k=-1)
    fit = trainer(tmp_path, [budget, checkpoints], max_epochs=5, enable_checkpointing=True)
    fit.fit(module, train_loader(), ckpt_path=ckpt_path)
    return budget, module


@pytest.mark.parametrize(
    "metric, replay", [("accuracy", False), (None, False), ("accuracy", True)], ids=["accuracy", "drift", "replay"]
)
def test_resume_mid_fit_gives_the_same_trajectory(tmp_path, metric, replay):
    whole, module = _fit_with_checkpoints(tmp_path, "whole", metric=metric, replay=replay)
    # at the end of an epoch: a plain DataLoader cannot resume inside one at the same batch
    (middle,) = glob.glob(str(tmp_path / "whole" / "*step=16.ckpt"))
    saved = torch.load(middle, weights_only=True)  # plain tensors and numbers only
    assert any(k.startswith("ForgettingBudget") for k in saved["callbacks"])
    resumed, again = _fit_with_checkpoints(tmp_path, "resumed", ckpt_path=middle, metric=metric, replay=replay)
    assert len(resumed.history) == len(whole.history) == 25  # every step up to step 10, then every 2 of 40
    assert any(r["multiplier"] > 0 for r in whole.history[:8])  # the saved state held a live controller
    for one, two in zip(whole.history, resumed.history):
        assert one.keys() == two.keys()
        for key, value in one.items():
            assert two[key] == (None if value is None else pytest.approx(value, rel=1e-5, abs=1e-9)), (one["step"], key)
    for (name, a), b in zip(module.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()), msg=name)


# -- normalised penalties ---------------------------------------------------------------------------------------------
def _perturbed_anchor(width: int) -> UpdateAnchor:
    torch.manual_seed(width)
    net = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
    anchor = UpdateAnchor(net)
    anchor.capture()
    with torch.no_grad():
        for p in net.parameters():  # the same relative change in every tensor
            p.add_(0.1 * p.std() * torch.randn_like(p))
    return anchor


def test_normalised_l2sp_gives_the_same_penalty_scale_on_a_small_and_a_4x_larger_model():
    small, large = _perturbed_anchor(32), _perturbed_anchor(64)  # 64² = 4 × 32² weights per layer
    raw = [float(l2sp_penalty(a, 1.0)) for a in (small, large)]
    normalised = [float(l2sp_penalty(a, 1.0, normalizing_scale(a))) for a in (small, large)]
    assert raw[1] / raw[0] > 1.5  # the plain sum grows with the model
    assert normalised[1] / normalised[0] == pytest.approx(1.0, abs=0.1)
    assert normalised[0] == pytest.approx(0.5 * 0.01, rel=0.2)  # α/2 · (relative update)²


def test_l2sp_and_ewc_normalize_options_divide_by_the_start_size():
    # two steps: the term of step 2 is on the update of step 1, which no penalty touched (it is 0 at the start)
    module, head = NewTask(), original_head()
    terms = {}
    for normalize in (False, True):
        l2sp = L2SPCallback(weight=1.0, base_head=head, normalize=normalize)
        trainer(callbacks=[l2sp], max_steps=2).fit(NewTask(), train_loader())
        terms[normalize] = l2sp.last_term
    start = sum(float(p.pow(2).sum()) for p in NewTask().net[:4].parameters())  # the head is left out
    assert terms[True] == pytest.approx(terms[False] / start, rel=1e-4) and terms[True] > 0
    ewc = {}
    for normalize in (True, "start"):
        cb = EWCCallback(base_loader(module, head), weight=1.0, base_head=head, normalize=normalize)
        trainer(callbacks=[cb], max_steps=2).fit(NewTask(), train_loader())
        ewc[normalize] = cb
    fisher = ewc["start"].fisher
    anchor = UpdateAnchor(NewTask().net[:4])
    anchor.capture()
    weighted = start_square_norm(anchor, {k.removeprefix("net."): v for k, v in fisher.items()})
    mean = sum(float(f.sum()) for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    assert ewc["start"].last_term == pytest.approx(ewc[True].last_term * mean / weighted, rel=1e-4)
    with pytest.raises(ValueError, match=r"`normalize` must be True, False or 'start', got 'begin'"):
        EWCCallback(base_loader(module, head), normalize="begin")


# -- bad input --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_max_forgetting_outside_0_1_is_refused(value):
    with pytest.raises(ValueError, match=rf"`max_forgetting` must be in \[0.0, 1.0\], got {value}"):
        ForgettingBudget(base_loader(NewTask(), original_head()), max_forgetting=value)


def test_no_base_data_is_refused():
    with pytest.raises(ValueError, match="`dataloader` is None: ForgettingBudget needs base-task data"):
        ForgettingBudget(None, max_forgetting=0.1)
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="`dataloader` yielded no batches"):
        trainer(callbacks=[ForgettingBudget(empty, 0.1, base_head=original_head())], max_steps=2).fit(
            NewTask(), train_loader()
        )


def test_a_head_that_does_not_match_is_refused():
    module = NewTask()
    loader = base_loader(module, original_head())
    wrong_features = ForgettingBudget(loader, 0.1, base_head=nn.Linear(7, 5))
    with pytest.raises(ValueError, match="`base_head`=Linear does not fit the model"):
        trainer(callbacks=[wrong_features], max_steps=2).fit(module, train_loader())
    too_few_classes = ForgettingBudget(loader, 0.1, base_head=nn.Linear(32, 2))
    with pytest.raises(ValueError, match=r"outside the 2 classes .* `base_head`"):
        trainer(callbacks=[too_few_classes], max_steps=2).fit(NewTask(), train_loader())


def test_a_metric_that_cannot_be_computed_is_refused():
    head = original_head()
    with pytest.raises(ValueError, match="`metric` must be one of"):
        ForgettingBudget(base_loader(NewTask(), head), 0.1, metric="bleu")
    with pytest.raises(ValueError, match="`features` must be one of"):
        ForgettingBudget(base_loader(NewTask(), head), 0.1, metric=None, features="pooled")
    unlabelled = ForgettingBudget(base_loader(NewTask(), head, labels=False), 0.1, base_head=head)
    with pytest.raises(ValueError, match="metric='accuracy' needs base-task labels"):
        trainer(callbacks=[unlabelled], max_steps=2).fit(NewTask(), train_loader())


class _ForceStrength(Callback):
    """Start the budget's controller at ``λ = 100``, so its penalty acts from the first step."""

    def __init__(self, budget: ForgettingBudget) -> None:
        self.budget = budget

    def on_train_start(self, trainer, pl_module) -> None:
        controller = self.budget.budget.controller
        controller.integral, controller.multiplier = math.log(100.0), 100.0


@pytest.mark.parametrize("config", [None, *MERGEABLE], ids=lambda c: "full" if c is None else c.values[0])
def test_budget_penalty_acts_on_the_update_of_every_method_and_full_fine_tuning(config):
    module = EveryMethodNet()
    budget = ForgettingBudget(method_data(1), max_forgetting=0.1, every_n_steps=2, dense_steps=0)
    surgery = [] if config is None else [PEFTCallback(config.replace(train_head=False), merge_on_train_end=False)]
    L.seed_everything(0, verbose=False)
    trainer(callbacks=[*surgery, budget, _ForceStrength(budget)], max_steps=4).fit(module, method_data(0))
    assert budget.last_term > 0 and math.isfinite(budget.last_term)
    assert len(budget.history) == 2 and all(math.isfinite(r["kl"]) for r in budget.history)
