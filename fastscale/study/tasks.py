"""The study's built-in tasks: a small CNN on scikit-learn's handwritten digits, and least squares
with Gaussian inputs, whose gradient noise scale is known in closed form.

A task hands the trainer a model, i.i.d. mini-batches and a held-out evaluation. Batches are drawn
uniformly WITH replacement, for every batch size: that is the i.i.d. model behind
E|G_B|² = |G|² + tr(Σ)/B (McCandlish et al. 2018). Without replacement a batch of B out of N
examples has its gradient variance shrunk by (N−B)/(N−1) (0.29 at B = 1024 of the ~1400 digits),
which would bias B_simple at large batches; with replacement any B, even B > N, is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class StudyError(Exception):
    """A user-facing problem (bad input, missing dependency): reported as one line, no traceback."""


@dataclass(frozen=True)
class TaskDefaults:
    """Per-task settings the CLI can override (tuned at the base batch size 8)."""

    lr: float
    momentum: float
    target_loss: float
    max_examples: int
    quick_max_examples: int
    warmup_examples: int  # Goyal et al. 2017 warm up over a fixed amount of data (5 of 90 epochs)
    eval_every_examples: int
    noise_window_examples: int  # B_simple moves fast on least squares: a shorter average lags less


class DigitsTask:
    """8×8 handwritten digits (1797 images, ships with scikit-learn), 80/20 split fixed by seed 0."""

    name = "digits"
    has_accuracy = True
    defaults = TaskDefaults(
        lr=0.02, momentum=0.9, target_loss=0.2, max_examples=12_000, quick_max_examples=5_000, warmup_examples=512,
        eval_every_examples=128, noise_window_examples=4096,
    )

    def __init__(self, model: str = "cnn", device: str = "cpu"):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise StudyError(
                "the digits task needs scikit-learn: pip install 'fastscale[study]' (or: pip install scikit-learn)"
            ) from None
        if model not in ("cnn", "mlp"):
            raise StudyError(f"unknown model {model!r} for task digits (choose cnn or mlp)")
        self.model_name = model
        self.device = torch.device(device)
        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
        y = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        n_test = len(y) // 5
        test, train = order[:n_test], order[n_test:]
        self.x_train, self.y_train = x[train].to(self.device), y[train].to(self.device)
        self.x_test, self.y_test = x[test].to(self.device), y[test].to(self.device)

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "model": self.model_name,
            "train_examples": self.n_train,
            "test_examples": len(self.y_test),
            "sampling": "uniform with replacement (i.i.d. batches; any batch size, even above the train split)",
            "loss": "cross-entropy (held-out split, dropout off)",
        }

    def make_model(self) -> nn.Module:
        if self.model_name == "cnn":
            model = nn.Sequential(
                nn.Conv2d(1, 8, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),  # 8 × 4 × 4
                nn.Flatten(),
                nn.Dropout(0.2),
                nn.Linear(128, 10),
            )
        else:
            model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))
        return model.to(self.device)

    def sample(self, generator: torch.Generator, batch_size: int) -> tuple[Tensor, Tensor]:
        idx = torch.randint(self.n_train, (batch_size,), generator=generator).to(self.device)
        return self.x_train[idx], self.y_train[idx]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        was_training = model.training
        model.eval()
        logits = model(self.x_test)
        model.train(was_training)
        return {
            "loss": F.cross_entropy(logits, self.y_test).item(),
            "accuracy": (logits.argmax(1) == self.y_test).float().mean().item(),
        }


def lstsq_gradient_stats(delta_sq_norm: float, dim: int, sigma: float) -> dict:
    """True |G|², tr(Σ) and B_simple for least squares with x ~ N(0, I_d), y = x·w* + σε.

    Per-example loss ℓ = ½(x·w − y)², so with δ = w − w*: g = ∇ℓ = x(x·δ − σε) and G = E g = δ.
    E|g|² = E[|x|²(x·δ)²] + σ²E|x|² = (d + 2)|δ|² + dσ²  (Isserlis: E[x_i²x_j²] = 1 + 2[i = j]),
    so tr(Σ) = E|g|² − |G|² = (d + 1)|δ|² + dσ², and B_simple = d + 1 + dσ²/|δ|².
    The Hessian is I, so here B_noise = tr(HΣ)/(GᵀHG) equals B_simple exactly.
    """
    g2 = delta_sq_norm
    trace = (dim + 1) * delta_sq_norm + dim * sigma**2
    return {"grad_sq_norm": g2, "trace_cov": trace, "b_simple": trace / g2 if g2 > 0 else math.inf}


class LeastSquaresTask:
    """Linear regression on fresh Gaussian inputs every step: population loss and noise scale are exact."""

    name = "lstsq"
    has_accuracy = False
    # Plain SGD (no momentum), as in McCandlish et al.'s analysis; the Hessian is I, so the largest
    # useful step is 1 and linear scaling from 0.05 at B = 8 overshoots beyond B ≈ 160.
    defaults = TaskDefaults(
        lr=0.05, momentum=0.0, target_loss=0.16, max_examples=4_000, quick_max_examples=2_000, warmup_examples=128,
        eval_every_examples=32, noise_window_examples=512,
    )

    def __init__(self, model: str = "linear", device: str = "cpu", dim: int = 16, sigma: float = 0.5):
        if model not in ("linear",):
            raise StudyError(f"unknown model {model!r} for task lstsq (only linear)")
        self.model_name = model
        self.device = torch.device(device)
        self.dim, self.sigma = dim, sigma
        self.w_star = torch.randn(dim, generator=torch.Generator().manual_seed(0)).to(self.device)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "model": "linear (no bias), w0 = 0",
            "dim": self.dim,
            "sigma": self.sigma,
            "w_star_sq_norm": float(self.w_star.square().sum()),
            "sampling": "fresh x ~ N(0, I_d) every batch; y = x·w* + σ·ε",
            "loss": "exact population loss ½(|w − w*|² + σ²)",
            "b_simple_true": "d + 1 + dσ²/|w − w*|²",
        }

    def make_model(self) -> nn.Module:
        model = nn.Linear(self.dim, 1, bias=False)
        nn.init.zeros_(model.weight)
        return model.to(self.device)

    def sample(self, generator: torch.Generator, batch_size: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(batch_size, self.dim, generator=generator).to(self.device)
        eps = torch.randn(batch_size, generator=generator).to(self.device)
        return x, x @ self.w_star + self.sigma * eps

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return 0.5 * (model(x).squeeze(1) - y).square().mean()

    def delta_sq_norm(self, model: nn.Module) -> float:
        return float((model.weight.detach().reshape(-1) - self.w_star).square().sum())

    def true_stats(self, model: nn.Module) -> dict:
        return lstsq_gradient_stats(self.delta_sq_norm(model), self.dim, self.sigma)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        return {"loss": 0.5 * (self.delta_sq_norm(model) + self.sigma**2), "accuracy": None}


TASKS = {"digits": DigitsTask, "lstsq": LeastSquaresTask}
DEFAULT_MODELS = {"digits": "cnn", "lstsq": "linear"}


def make_task(name: str, model: str | None = None, device: str = "cpu"):
    if name not in TASKS:
        raise StudyError(f"unknown task {name!r} (choose one of {', '.join(TASKS)})")
    return TASKS[name](model or DEFAULT_MODELS[name], device)
