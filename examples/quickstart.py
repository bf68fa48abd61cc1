"""Train a small MLP with FusedScaledSGD: linear lr scaling, warmup, gradient accumulation and
the live noise-scale estimate. Runs in a few seconds on a CPU.

    python examples/quickstart.py
"""

import torch
from torch import nn

import fastscale

torch.manual_seed(0)
# A synthetic regression task: y = tanh(x·W*) + noise.
w_true = torch.randn(32, 4)
x_all = torch.randn(8192, 32)
y_all = torch.tanh(x_all @ w_true) + 0.3 * torch.randn(8192, 4)

model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
batch, micro_batches = 256, 4  # each step: 4 micro-batches of 64
opt = fastscale.FusedScaledSGD(
    model.parameters(),
    lr=0.05,                # tuned at base_batch_size
    momentum=0.9,
    batch_size=batch,
    base_batch_size=64,
    scaling="sqrt",         # or "linear", "noise", "none"
    warmup_steps=50,        # ramp from 0.05 to 0.05·√4 per step (Goyal et al.)
    noise_scale=True,       # estimate B_simple = tr(Σ)/|G|² on the fly
)
loss_fn = nn.MSELoss()

for step in range(300):
    idx = torch.randint(0, len(x_all), (batch,))
    opt.zero_grad()
    for x, y in zip(x_all[idx].chunk(micro_batches), y_all[idx].chunk(micro_batches)):
        loss = loss_fn(model(x), y) / micro_batches  # mean loss, divided by the micro-batch count
        loss.backward()
        opt.accumulate_grad(loss_scale=1 / micro_batches)  # one fused pass: micro-batch |g|²
    opt.step()
    if step % 50 == 0 or step == 299:
        # Reading statistics is the only host-device sync; do it rarely.
        stats = opt.gradient_stats()
        print(
            f"step {step:3d}  loss {loss.item() * micro_batches:.4f}  lr {opt.current_lr()[0]:.4f}  "
            f"B_simple {stats['b_simple']:.1f}"
        )

stats = opt.gradient_stats()
print(f"noise scale B_simple ≈ {stats['b_simple']:.0f} examples; at batch {batch} a step needs "
      f"{stats['steps_over_min']:.2f}× the minimum steps and {stats['examples_over_min']:.2f}× the minimum examples")
print("native kernels:", fastscale.build_info())
