"""Small models trained for a few hundred optimizer steps on synthetic data (for tests/test_trained.py)."""

from __future__ import annotations

import math

import torch
from torch import nn

STEPS = 200
CLASSES = 10


class CNN(nn.Module):
    def __init__(self, fixed_bank: bool = False):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1 if fixed_bank else 3, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(32, CLASSES)
        if fixed_bank:  # a bank of fixed, non-trainable filters (oriented derivatives and DCT modes)
            self.features[0].weight.data.copy_(filter_bank(16))
            self.features[0].weight.requires_grad_(False)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def filter_bank(n: int) -> torch.Tensor:
    """n distinct 3×3 filters: the 2-D DCT-II basis (9) and rotated Sobel/Laplacian-like kernels."""
    c = torch.tensor([[math.cos(math.pi * (2 * x + 1) * u / 6) for x in range(3)] for u in range(3)])
    dct = [torch.outer(c[u], c[v]) for u in range(3) for v in range(3)]
    sobel = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
    extra = [sobel, sobel.T, sobel.flip(0).T * 0.5 + sobel * 0.5, torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]),
             torch.tensor([[2.0, -1, -1], [-1, 2, -1], [-1, -1, 2]]), torch.tensor([[-1.0, -1, 2], [-1, 2, -1], [2, -1, -1]]),
             torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 4]
    return torch.stack((dct + extra)[:n]).unsqueeze(1)


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 48, batch_first=True)
        self.fc = nn.Linear(48, CLASSES)

    def forward(self, x):
        return self.fc(self.lstm(x)[0][:, -1])


class Blocks(nn.Module):
    """An input layer, six same-shaped blocks and a head: the blocks are each other's siblings."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.blocks = nn.ModuleList(nn.Linear(64, 64) for _ in range(6))
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def save_with_fresh_layers(model: nn.Module, path, reinit: tuple[str, ...] = ()):
    """Save `model`'s state_dict to `path` with the Linear layers named in `reinit` re-drawn at nn.Linear's default
    (a layer left at its init: not loaded, or re-initialized after loading)."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    for name in reinit:
        fresh = nn.Linear(*reversed(weights[f"{name}.weight"].shape))
        weights[f"{name}.weight"], weights[f"{name}.bias"] = fresh.weight.detach(), fresh.bias.detach()
    torch.save(weights, path)
    return path


def mlp(depth: int = 10, width: int = 64) -> nn.Module:
    """A deep plain ReLU MLP at torch's default init: fresh, the scale rules warn on it."""
    layers: list[nn.Module] = [nn.Linear(32, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, CLASSES))


def _inputs(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "image":
        return torch.randn(n, 3, 8, 8, generator=g)
    if kind == "gray":
        return torch.randn(n, 1, 8, 8, generator=g)
    if kind == "sequence":
        return torch.randn(n, 6, 16, generator=g)
    return torch.randn(n, 32, generator=g)


def synthetic(kind: str, n: int = 1024, rare: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and noisy labels from a random linear teacher (with `rare`, classes 7-9 almost never occur)."""
    g = torch.Generator().manual_seed(seed)
    x = _inputs(kind, n, g)
    teacher = torch.randn(x[0].numel(), CLASSES, generator=g)
    logits = x.flatten(1) @ teacher / math.sqrt(x[0].numel()) * 3 + torch.randn(n, CLASSES, generator=g)
    if rare:
        logits[:, 7:] -= 100
        logits[:3, 7:] += 200  # three samples of the rare classes in all
    return x, logits.argmax(1)


def train(model: nn.Module, kind: str, *, weight_decay: float = 0.0, rare: bool = False, steps: int = STEPS,
          seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Adam(W) on minibatches of synthetic data; returns the model and its optimizer (for checkpoints)."""
    torch.manual_seed(seed)
    x, y = synthetic(kind, rare=rare, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay) if weight_decay else torch.optim.Adam(params, lr=1e-2)
    g = torch.Generator().manual_seed(seed + 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only add overhead
    try:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (32,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), opt


BUILDERS = {
    "mlp": (mlp, "vector", {}),
    "cnn": (CNN, "image", {}),
    "lstm": (LSTMNet, "sequence", {}),
    "weight_decay": (mlp, "vector", {"weight_decay": 0.5}),
    "filter_bank": (lambda: CNN(fixed_bank=True), "gray", {}),
    "rare_classes": (mlp, "vector", {"rare": True}),
}


def fresh(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[name][0]()


def trained(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    build, kind, kwargs = BUILDERS[name]
    return train(fresh(name), kind, **kwargs)
