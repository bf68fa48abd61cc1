"""The study's built-in tasks, all offline and deterministic:

* ``digits``: a small CNN on scikit-learn's bundled 8×8 handwritten digits;
* ``lstsq``: least squares with anisotropic Gaussian inputs, whose gradient noise scales
  B_simple and B_noise are known in closed form (and differ, because the Hessian is not ∝ I);
* ``charlm``: a small character-level transformer language model on the Python Language
  Reference that ships with CPython (``pydoc_data.topics``, the text of ``help('for')``…).

A task hands the trainer a model, i.i.d. mini-batches and a held-out evaluation. Batches are drawn
uniformly WITH replacement, for every batch size: that is the i.i.d. model behind
E|G_B|² = |G|² + tr(Σ)/B (McCandlish et al. 2018). Without replacement a batch of B out of N
examples has its gradient variance shrunk by (N−B)/(N−1) (0.29 at B = 1024 of the ~1400 digits),
which would bias B_simple at large batches; with replacement any B, even B > N, is allowed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class StudyError(Exception):
    """A user-facing problem (bad input, missing dependency): reported as one line, no traceback."""


@dataclass(frozen=True)
class TaskDefaults:
    """Per-task settings the CLI can override (lr tuned at the base batch size 8)."""

    lr: float
    momentum: float
    target_loss: float
    max_examples: int
    quick_max_examples: int
    warmup_examples: int  # Goyal et al. 2017 warm up over a fixed amount of data (5 of 90 epochs)
    eval_every_examples: int
    noise_window_examples: int  # B_simple moves fast on least squares: a shorter average lags less
    # The from-scratch ladder of the scaling-rule comparison.
    batch_sizes: tuple = (8, 16, 24, 32, 40, 48, 56, 64, 128, 256, 512, 1024)
    quick_batch_sizes: tuple = (8, 32, 128, 512)
    # The critical-batch-size measurement (see measure.py): a reference run ("trunk") at the
    # smallest batch size, branched at these points (examples into the trunk: early, middle, late)
    branch_points: tuple = (512, 2048, 8192)
    quick_branch_points: tuple = (512, 2048, 8192)
    # ...each branch continued at this ladder of batch sizes (the smallest is the reference B_ref)
    branch_batch_sizes: tuple = (8, 16, 32, 64, 128, 256, 512)
    quick_branch_batch_sizes: tuple = (8, 32, 128, 512)
    # ...where the B_ref branch trains for this many examples and its loss there is the target.
    branch_examples: int = 2048
    quick_branch_examples: int = 1024
    branch_eval_every_examples: int = 64  # at least every step for batches above this


# ----------------------------------------------------------------- digits
class DigitsTask:
    """8×8 handwritten digits (1797 images, ships with scikit-learn), 80/20 split fixed by seed 0."""

    name = "digits"
    has_accuracy = True
    example_unit = "image"
    defaults = TaskDefaults(
        lr=0.02, momentum=0.9, target_loss=0.2, max_examples=12_000, quick_max_examples=4_000, warmup_examples=512,
        eval_every_examples=128, noise_window_examples=4096,
        branch_points=(384, 1536, 6144), quick_branch_points=(384, 1536, 6144),
        branch_examples=2048, quick_branch_examples=768,
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


# ----------------------------------------------------------------- least squares
def lstsq_gradient_stats(delta, sigma: float, spectrum=None) -> dict:
    """True |G|², tr(Σ), B_simple and B_noise for least squares with x ~ N(0, Λ), Λ = diag(spectrum),
    y = x·w* + σε, per-example loss ℓ = ½(x·w − y)², at w = w* + δ.

    ``delta`` is δ (a vector); ``spectrum=None`` means Λ = I (see also :func:`lstsq_isotropic_stats`).

    Derivation. g = ∇ℓ = x(xᵀδ − σε), so G = E g = Λδ and H = E xxᵀ = Λ. For Gaussian x,
    E[xxᵀ A xxᵀ] = Λ(A + Aᵀ)Λ + tr(AΛ)Λ (Isserlis), so with A = δδᵀ:
    E[ggᵀ] = 2ΛδδᵀΛ + (δᵀΛδ)Λ + σ²Λ and Σ = E[ggᵀ] − GGᵀ = GGᵀ + (δᵀΛδ + σ²)Λ. With
    2L = δᵀΛδ + σ² (twice the population loss):

        |G|²   = δᵀΛ²δ               tr(Σ)  = δᵀΛ²δ + 2L·tr Λ
        GᵀHG   = δᵀΛ³δ               tr(HΣ) = δᵀΛ³δ + 2L·tr Λ²
        B_simple = tr(Σ)/|G|²  = 1 + 2L·tr Λ  / δᵀΛ²δ
        B_noise  = tr(HΣ)/GᵀHG = 1 + 2L·tr Λ² / δᵀΛ³δ

    With Λ = I both are d + 1 + dσ²/|δ|² (the isotropic case). Early in training δ points
    everywhere and the two are close; later the stiff directions (large λ) have converged, δ
    lives in the soft ones, and B_noise/B_simple grows towards (tr Λ²/tr Λ)/λ_min.
    """
    delta = torch.as_tensor(delta, dtype=torch.float64).reshape(-1)
    lam = torch.ones_like(delta) if spectrum is None else torch.as_tensor(spectrum, dtype=torch.float64).reshape(-1)
    d2 = delta.square()
    quad = [float((d2 * lam.pow(k)).sum()) for k in range(4)]  # δᵀΛᵏδ, k = 0..3
    two_l = quad[1] + sigma**2
    g2, ghg = quad[2], quad[3]
    trace = g2 + two_l * float(lam.sum())
    trace_h = ghg + two_l * float(lam.square().sum())
    return {
        "grad_sq_norm": g2,
        "trace_cov": trace,
        "b_simple": trace / g2 if g2 > 0 else math.inf,
        "ghg": ghg,
        "trace_h_cov": trace_h,
        "b_noise": trace_h / ghg if ghg > 0 else math.inf,
        "loss": 0.5 * two_l,
    }


def lstsq_isotropic_stats(delta_sq_norm: float, dim: int, sigma: float) -> dict:
    """The Λ = I case in closed form: tr(Σ) = (d + 1)|δ|² + dσ², B_simple = B_noise = d + 1 + dσ²/|δ|²."""
    g2 = delta_sq_norm
    trace = (dim + 1) * delta_sq_norm + dim * sigma**2
    b = trace / g2 if g2 > 0 else math.inf
    return {"grad_sq_norm": g2, "trace_cov": trace, "b_simple": b, "b_noise": b}


def default_spectrum(dim: int, condition: float) -> Tensor:
    """λ_i log-spaced from 1 down to 1/condition (the input variances)."""
    if dim == 1:
        return torch.ones(1, dtype=torch.float64)
    return torch.logspace(0.0, -math.log10(condition), dim, dtype=torch.float64)


class LeastSquaresTask:
    """Linear regression on fresh Gaussian inputs every step: population loss and noise scales are exact."""

    name = "lstsq"
    has_accuracy = False
    example_unit = "example"
    # Plain SGD (no momentum), as in McCandlish et al.'s analysis; the largest useful step is
    # ~1/λ_max = 1, and linear scaling from 0.05 at B = 8 overshoots beyond B ≈ 160.
    defaults = TaskDefaults(
        lr=0.2, momentum=0.0, target_loss=0.2, max_examples=6_000, quick_max_examples=3_000, warmup_examples=128,
        eval_every_examples=32, noise_window_examples=512,
        branch_points=(256, 1024, 4096), quick_branch_points=(256, 1024, 4096),
        branch_examples=1024, quick_branch_examples=1024, branch_eval_every_examples=16,
    )

    def __init__(self, model: str = "linear", device: str = "cpu", dim: int = 32, sigma: float = 0.5,
                 condition: float = 100.0):
        if model not in ("linear",):
            raise StudyError(f"unknown model {model!r} for task lstsq (only linear)")
        self.model_name = model
        self.device = torch.device(device)
        self.dim, self.sigma, self.condition = dim, sigma, condition
        self.spectrum = default_spectrum(dim, condition)  # float64, host
        self.scale = self.spectrum.sqrt().float().to(self.device)  # x = z·√λ
        self.w_star = torch.randn(dim, generator=torch.Generator().manual_seed(0)).to(self.device)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "model": "linear (no bias), w0 = 0",
            "dim": self.dim,
            "sigma": self.sigma,
            "input variances": f"λ log-spaced from 1 to 1/{self.condition:g} (Hessian H = diag(λ))",
            "w_star_sq_norm": round(float(self.w_star.square().sum()), 4),
            "sampling": "fresh x ~ N(0, diag(λ)) every batch; y = x·w* + σ·ε",
            "loss": "exact population loss ½(δᵀΛδ + σ²), δ = w − w*",
            "truth": "B_simple = 1 + 2L·tr Λ/δᵀΛ²δ, B_noise = 1 + 2L·tr Λ²/δᵀΛ³δ (closed form, see tasks.py)",
        }

    def make_model(self) -> nn.Module:
        model = nn.Linear(self.dim, 1, bias=False)
        nn.init.zeros_(model.weight)
        return model.to(self.device)

    def sample(self, generator: torch.Generator, batch_size: int) -> tuple[Tensor, Tensor]:
        z = torch.randn(batch_size, self.dim, generator=generator).to(self.device)
        eps = torch.randn(batch_size, generator=generator).to(self.device)
        x = z * self.scale
        return x, x @ self.w_star + self.sigma * eps

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return 0.5 * (model(x).squeeze(1) - y).square().mean()

    def delta(self, model: nn.Module) -> Tensor:
        return (model.weight.detach().reshape(-1) - self.w_star).double().cpu()

    def true_stats(self, model: nn.Module) -> dict:
        return lstsq_gradient_stats(self.delta(model), self.sigma, self.spectrum)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        d = self.delta(model)
        return {"loss": 0.5 * (float((d.square() * self.spectrum).sum()) + self.sigma**2), "accuracy": None}


# ----------------------------------------------------------------- character-level language model
CHARLM_VOCAB = [chr(i) for i in range(32, 127)] + ["\n"]  # printable ASCII and newline; the rest is one token


def load_reference_text() -> tuple[str, str, dict]:
    """The Python Language Reference as pydoc ships it (``pydoc_data.topics``: the text behind
    ``help('for')``, ~460k characters), split by topic: every 8th topic (sorted by name) is held out.
    Returns (train text, held-out text, facts)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise StudyError("the charlm task needs the text CPython ships in pydoc_data.topics, which this Python "
                         "lacks (some distributions strip it): choose --task digits or lstsq") from None
    names = sorted(topics)
    train = "\n\n".join(topics[k] for i, k in enumerate(names) if i % 8 != 0)
    held = "\n\n".join(topics[k] for i, k in enumerate(names) if i % 8 == 0)
    digest = hashlib.sha256((train + "\x00" + held).encode()).hexdigest()[:12]
    return train, held, {"topics": len(names), "sha256": digest}


def encode_text(text: str) -> Tensor:
    index = {c: i for i, c in enumerate(CHARLM_VOCAB)}
    unknown = len(CHARLM_VOCAB)
    return torch.tensor([index.get(c, unknown) for c in text], dtype=torch.long)


class _Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention and a 4× GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """A GPT in miniature: token and position embeddings, ``layers`` blocks, a linear read-out."""

    def __init__(self, vocab: int, context: int, dim: int = 32, layers: int = 1, heads: int = 4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)
        self.register_buffer("positions", torch.arange(context), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(self.positions[: idx.shape[1]])
        return self.head(self.ln(self.blocks(x)))


class CharLMTask:
    """Next-character prediction on the Python Language Reference; one example = one window of
    ``context`` characters (a batch of B is B windows, B·context predictions)."""

    name = "charlm"
    has_accuracy = True
    example_unit = "sequence"
    defaults = TaskDefaults(
        lr=0.3, momentum=0.9, target_loss=2.2, max_examples=8_000, quick_max_examples=1_500, warmup_examples=256,
        eval_every_examples=128, noise_window_examples=4096,
        batch_sizes=(8, 16, 32, 64, 128, 256), quick_batch_sizes=(8, 32, 128),
        branch_points=(512, 2048, 8192), quick_branch_points=(512, 2048),
        branch_batch_sizes=(8, 16, 32, 64, 128, 256), quick_branch_batch_sizes=(8, 32, 128),
        branch_examples=1024, quick_branch_examples=384, branch_eval_every_examples=64,
    )

    def __init__(self, model: str = "transformer", device: str = "cpu", context: int = 32, eval_windows: int = 256):
        if model not in ("transformer",):
            raise StudyError(f"unknown model {model!r} for task charlm (only transformer)")
        self.model_name = model
        self.device = torch.device(device)
        self.context = context
        train, held, self.facts = load_reference_text()
        self.train = encode_text(train).to(self.device)
        held_ids = encode_text(held)
        self.vocab = len(CHARLM_VOCAB) + 1
        # A fixed held-out set: eval_windows windows at seeded positions (every run sees the same).
        starts = torch.randint(len(held_ids) - context - 1, (eval_windows,), generator=torch.Generator().manual_seed(0))
        span = torch.arange(context)
        self.x_test = held_ids[starts[:, None] + span].to(self.device)
        self.y_test = held_ids[starts[:, None] + span + 1].to(self.device)
        self.n_train_chars, self.n_held_chars = len(train), len(held)
        self._span = span.to(self.device)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "model": f"character-level transformer: 1 block, width 32, 4 heads, context {self.context}",
            "text": f"the Python Language Reference as pydoc ships it (pydoc_data.topics, {self.facts['topics']} "
                    f"topics, sha256 {self.facts['sha256']}); every 8th topic held out",
            "train_characters": self.n_train_chars,
            "held_out": f"{len(self.y_test)} windows of {self.context} characters from {self.n_held_chars} held-out",
            "vocabulary": f"{self.vocab} (printable ASCII, newline, one token for anything else)",
            "sampling": "windows at uniform random positions, with replacement; one example = one window",
            "loss": "cross-entropy per character, nats (held-out)",
        }

    def make_model(self) -> nn.Module:
        return CharTransformer(self.vocab, self.context).to(self.device)

    def sample(self, generator: torch.Generator, batch_size: int) -> tuple[Tensor, Tensor]:
        starts = torch.randint(len(self.train) - self.context - 1, (batch_size, 1), generator=generator).to(self.device)
        idx = starts + self._span
        return self.train[idx], self.train[idx + 1]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x).reshape(-1, self.vocab), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        logits = model(self.x_test)
        return {
            "loss": F.cross_entropy(logits.reshape(-1, self.vocab), self.y_test.reshape(-1)).item(),
            "accuracy": (logits.argmax(-1) == self.y_test).float().mean().item(),
        }


TASKS = {"digits": DigitsTask, "lstsq": LeastSquaresTask, "charlm": CharLMTask}
DEFAULT_MODELS = {"digits": "cnn", "lstsq": "linear", "charlm": "transformer"}


def make_task(name: str, model: str | None = None, device: str = "cpu"):
    if name not in TASKS:
        raise StudyError(f"unknown task {name!r} (choose one of {', '.join(TASKS)})")
    return TASKS[name](model or DEFAULT_MODELS[name], device)
