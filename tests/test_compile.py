"""A torch.compile'd training step: same result as eager, no recompile when the lr changes.

With a tensor lr (what torch recommends under torch.compile: a float lr is a constant to
dynamo), an lr scheduler editing it and the warmup advancing change only tensor values.
"""

import copy

import torch
from torch._dynamo.testing import CompileCounter

from fastscale import FusedScaledSGD


def test_compiled_step_does_not_recompile_when_lr_changes(impl):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    twin = copy.deepcopy(model)
    kw = dict(momentum=0.9, weight_decay=0.01, batch_size=64, base_batch_size=16, warmup_steps=3,
              noise_scale=True, **impl)
    opt = FusedScaledSGD(model.parameters(), lr=torch.tensor(0.1), **kw)
    eager = FusedScaledSGD(twin.parameters(), lr=torch.tensor(0.1), **kw)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.7) for o in (opt, eager)]
    counter = CompileCounter()

    @torch.compile(backend=counter)
    def compiled_step():
        opt.step()

    frames, lrs = [], []
    for _ in range(6):
        x = torch.randn(8, 4)
        for m, o in ((model, opt), (twin, eager)):
            o.zero_grad()
            m(x).square().mean().backward()
        lrs.append(opt.current_lr()[0])
        compiled_step()
        eager.step()
        frames.append(counter.frame_count)
        for s in scheds:
            s.step()
    # Step 1 creates momentum buffers (its own path); from step 2 on nothing new is compiled
    # although the effective lr differs at every step.
    assert len(set(lrs)) == 6
    assert frames[1:] == [frames[1]] * 5, frames
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)
