"""LoRA-Pro: the equivalent-gradient maths, the per-step applier and the callback option."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks import LoRACallback
from peft_callbacks.methods.lora import (
    LoRAProAdamW,
    apply_lora_pro,
    equivalent_gradient,
    inject_lora,
    lora_layers,
    lora_pro_gradients,
    solve_sylvester,
)

SCALING = 1.7


def _problem(m=9, n=11, r=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(r, n, generator=gen, dtype=dtype)
    b = torch.randn(m, r, generator=gen, dtype=dtype)
    g = torch.randn(m, n, generator=gen, dtype=dtype)
    return a, b, g


def _lora_grads(a, b, g, s=SCALING):
    return s * b.T @ g, s * g @ a.T  # what backward gives A and B when dL/dW = g


def _projection(a, b, g):
    p_b = b @ torch.linalg.pinv(b)
    p_a = torch.linalg.pinv(a) @ a
    return p_b @ g + (torch.eye(len(g), dtype=g.dtype) - p_b) @ g @ p_a


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equivalent_gradient_is_the_least_squares_projection(seed):
    a, b, g = _problem(seed=seed)
    new_a, new_b = lora_pro_gradients(a, b, *_lora_grads(a, b, g), SCALING)
    residual = g - equivalent_gradient(a, b, new_a, new_b, SCALING)
    # orthogonal to both parameter directions: to B·Y for every Y, and to Z·A for every Z
    torch.testing.assert_close(b.T @ residual, torch.zeros_like(a), atol=1e-10, rtol=0)
    torch.testing.assert_close(residual @ a.T, torch.zeros_like(b), atol=1e-10, rtol=0)
    torch.testing.assert_close(g - residual, _projection(a, b, g), atol=1e-10, rtol=0)


def test_no_other_gradient_pair_does_better_and_plain_lora_does_worse():
    a, b, g = _problem(seed=3)
    grad_a, grad_b = _lora_grads(a, b, g)
    new_a, new_b = lora_pro_gradients(a, b, grad_a, grad_b, SCALING)
    best = (g - equivalent_gradient(a, b, new_a, new_b, SCALING)).norm()
    gen = torch.Generator().manual_seed(4)
    for _ in range(50):
        da = torch.randn(new_a.shape, generator=gen, dtype=a.dtype) * 0.1
        db = torch.randn(new_b.shape, generator=gen, dtype=a.dtype) * 0.1
        assert (g - equivalent_gradient(a, b, new_a + da, new_b + db, SCALING)).norm() >= best - 1e-12
    # plain LoRA with its best step size along its own direction is still worse
    plain = equivalent_gradient(a, b, grad_a, grad_b, SCALING)
    step = (plain * g).sum() / (plain * plain).sum()
    assert (g - step * plain).norm() > best * 1.05


def test_sylvester_choice_is_closest_to_the_plain_gradients():
    """Theorem 2.2: among the pairs (ĝ_A + Y·A, ĝ_B − B·Y), all with the same equivalent gradient, Y = 0 is closest."""
    a, b, g = _problem(seed=5)
    grad_a, grad_b = _lora_grads(a, b, g)
    new_a, new_b = lora_pro_gradients(a, b, grad_a, grad_b, SCALING)

    def distance(y):
        return (new_a + y @ a - grad_a).pow(2).sum() + (new_b - b @ y - grad_b).pow(2).sum()

    gen = torch.Generator().manual_seed(6)
    for _ in range(30):
        y = torch.randn(3, 3, generator=gen, dtype=a.dtype) * 0.05
        torch.testing.assert_close(
            equivalent_gradient(a, b, new_a + y @ a, new_b - b @ y, SCALING),
            equivalent_gradient(a, b, new_a, new_b, SCALING),
        )
        assert distance(y) > distance(torch.zeros(3, 3, dtype=a.dtype))


@pytest.mark.parametrize("rank_p", [4, 2, 0])
def test_sylvester_solution_satisfies_its_equation(rank_p):
    gen = torch.Generator().manual_seed(rank_p)
    f = torch.randn(7, rank_p, generator=gen, dtype=torch.float64)
    h = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    p, q = f.T @ f if rank_p == 4 else torch.zeros(4, 4, dtype=torch.float64), h.T @ h
    if rank_p == 2:
        p = torch.block_diag(f.T @ f, torch.zeros(2, 2, dtype=torch.float64))
    c = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    x = solve_sylvester(p, q, c)
    if rank_p == 4:
        torch.testing.assert_close(p @ x + x @ q, c)
    else:  # q is singular (rank 3 of 5) and so is p: least-squares solution, residual orthogonal to the range
        residual = p @ x + x @ q - c
        x2 = x + 1e-3 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        assert residual.norm() <= (p @ x2 + x2 @ q - c).norm()


def test_zero_b_at_initialisation():
    a, b, g = _problem(seed=7)
    b = torch.zeros_like(b)
    new_a, new_b = lora_pro_gradients(a, b, *_lora_grads(a, b, g), SCALING)
    assert torch.isfinite(new_a).all() and torch.isfinite(new_b).all()
    assert torch.count_nonzero(new_a) == 0
    torch.testing.assert_close(
        equivalent_gradient(a, b, new_a, new_b, SCALING), g @ torch.linalg.pinv(a) @ a, atol=1e-10, rtol=0
    )


def test_float32_in_float32_out():
    a, b, g = _problem(seed=8, dtype=torch.float32)
    new_a, new_b = lora_pro_gradients(a, b, *_lora_grads(a, b, g), SCALING)
    assert new_a.dtype == new_b.dtype == torch.float32
    ref = lora_pro_gradients(a.double(), b.double(), *_lora_grads(a.double(), b.double(), g.double()), SCALING)
    torch.testing.assert_close(new_a.double(), ref[0], rtol=1e-4, atol=1e-5)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(self.conv(x).mean((2, 3)))))


def _full_gradients(model, x):
    """dL/dW of every LoRA layer's merged weight W = W0 + s·B·A, from a copy where W is a plain parameter."""
    merged = copy.deepcopy(model)
    weights = {}
    for path, layer in lora_layers(merged).items():
        base = layer.base_layer
        base.weight = nn.Parameter(layer.merged_weight().detach())
        parent, _, name = path.rpartition(".")
        setattr(merged.get_submodule(parent), name, base)
        weights[path] = base.weight
    merged(x).pow(2).sum().backward()
    return {path: w.grad for path, w in weights.items()}


def test_applier_on_linear_and_conv_projects_the_full_gradient():
    torch.manual_seed(0)
    model = inject_lora(_Net(), rank=2, alpha=3, target_modules=["conv", "fc"])
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.adapters["default"].lora_B.weight)
    x = torch.randn(4, 3, 5, 5)
    full = _full_gradients(model, x)
    model(x).pow(2).sum().backward()
    layers = {path: layer.adapters["default"] for path, layer in lora_layers(model).items()}
    for path, layer in layers.items():  # backward's convention: g_A = s·Bᵀg, g_B = s·g·Aᵀ on flattened kernels
        a, b, g = (t.detach().flatten(1) for t in (layer.lora_A.weight, layer.lora_B.weight, full[path]))
        torch.testing.assert_close(layer.lora_A.weight.grad.flatten(1), layer.scaling * b.T @ g, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.weight.grad.flatten(1), layer.scaling * g @ a.T, atol=1e-5, rtol=1e-4)
    assert apply_lora_pro(model) == 2
    for path, layer in layers.items():
        a, b = (t.detach().flatten(1).double() for t in (layer.lora_A.weight, layer.lora_B.weight))
        g = full[path].flatten(1).double()
        grad_a, grad_b = (t.grad.flatten(1).double() for t in (layer.lora_A.weight, layer.lora_B.weight))
        equiv = equivalent_gradient(a, b, grad_a, grad_b, layer.scaling)
        torch.testing.assert_close(equiv, _projection(a, b, g), atol=1e-4, rtol=1e-4)


def test_applier_rejects_dora_and_bad_rcond():
    model = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2, use_dora=True)
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(TypeError, match="DoRA"):
        apply_lora_pro(model)
    with pytest.raises(ValueError, match="rcond"):
        apply_lora_pro(model, rcond=0.0)


def test_applier_skips_layers_outside_params_and_without_grads():
    model = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
    assert apply_lora_pro(model) == 0  # no backward yet
    model(torch.randn(2, 4)).sum().backward()
    assert apply_lora_pro(model, params=list(model[0].parameters())) == 1


class _Module(L.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_callback_steps_along_lora_pro_gradients():
    torch.manual_seed(0)
    net = inject_lora(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), rank=2, alpha=4)
    nn.init.normal_(net[0].adapters["default"].lora_B.weight, std=0.5)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    reference = copy.deepcopy(net)
    nn.functional.mse_loss(reference(x), y).backward()
    apply_lora_pro(reference)
    with torch.no_grad():
        for p in reference.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad

    callback = LoRACallback(lora_pro=True, merge_on_train_end=False)
    trainer = L.Trainer(
        max_steps=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = _Module(net)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    for name, p in reference.named_parameters():
        torch.testing.assert_close(module.net.get_parameter(name), p, atol=1e-6, rtol=1e-5)


def test_full_adam_first_step_follows_the_adam_direction_of_the_equivalent_gradient():
    torch.manual_seed(0)
    net = inject_lora(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), rank=2, alpha=4)
    layer = net[0].adapters["default"]
    optimizer = LoRAProAdamW(net, lr=1e-2, eps=1e-12)
    nn.functional.mse_loss(net(torch.randn(16, 6)), torch.randn(16, 3)).backward()
    a, b, s = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone(), layer.scaling
    pro_a, pro_b = lora_pro_gradients(a, b, layer.lora_A.weight.grad, layer.lora_B.weight.grad, s)
    direction = equivalent_gradient(a, b, pro_a, pro_b, s).sign()  # Adam's first step: m̂/√v̂ = sign
    head_before = net[2].weight.detach().clone()
    optimizer.step()
    torch.testing.assert_close(layer.lora_A.weight, a)  # B = 0: A gets no LoRA-Pro gradient
    projector = torch.linalg.pinv(a) @ a
    torch.testing.assert_close(s * layer.lora_B.weight @ a, -1e-2 * direction @ projector, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(net[2].weight, head_before - 1e-2 * net[2].weight.grad.sign(), atol=1e-6, rtol=1e-4)


def test_full_adam_trains_and_rejects_dora():
    torch.manual_seed(0)
    net = inject_lora(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), rank=2)
    optimizer = LoRAProAdamW(net, lr=1e-2, weight_decay=0.01)
    x, y = torch.randn(64, 6), torch.randn(64, 3)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert torch.count_nonzero(net[0].adapters["default"].lora_B.weight) > 0
    dora = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2, use_dora=True)
    with pytest.raises(TypeError, match="DoRA"):
        LoRAProAdamW(dora)
    with pytest.raises(ValueError, match="lr"):
        LoRAProAdamW(net, lr=0)


class _AdamModule(_Module):
    def __init__(self, net, optimizer):
        super().__init__(net)
        self.optimizer_name = optimizer

    def configure_optimizers(self):
        if self.optimizer_name == "lora_pro_adamw":
            return LoRAProAdamW(self, lr=1e-2)
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _fit(module, callback, steps=2):
    data = DataLoader(TensorDataset(torch.randn(16, 6), torch.randn(16, 3)), batch_size=8)
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)


def test_full_adam_from_configure_optimizers_with_the_callback():
    module = _AdamModule(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), "lora_pro_adamw")
    _fit(module, LoRACallback(rank=2), steps=3)
    assert isinstance(module.net[0], nn.Linear) and not lora_layers(module)  # trained, then merged
    module = _AdamModule(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), "lora_pro_adamw")
    with pytest.raises(ValueError, match="LoRAProAdamW"):
        _fit(module, LoRACallback(rank=2, lora_pro=True))


def test_gradient_replacement_with_adam_warns():
    module = _AdamModule(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), "adamw")
    with pytest.warns(UserWarning, match="LoRAProAdamW"):
        _fit(module, LoRACallback(rank=2, lora_pro=True), steps=1)
