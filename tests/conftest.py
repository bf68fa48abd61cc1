import pytest
import torch

import fastscale

# Each test runs the optimizer on both implementations where it matters, chosen with torch's
# flags: fused=False (the pure-torch twins) and the default fused=None (the compiled kernel
# where one is built for the device, else the twin). ``impl`` is the keyword arguments.
IMPLS = {"torch": dict(fused=False), "auto": dict()}


@pytest.fixture(params=list(IMPLS))
def impl(request):
    return IMPLS[request.param]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def native_cpu() -> bool:
    return "cpu" in fastscale._extension.native_device_types()


def make_params(dtype=torch.float32, device="cpu", shapes=((7, 5), (5,), (3, 4, 2), (), (0,), (1,))):
    """Fresh random parameters of mixed shapes, including 0-dim and empty."""
    return [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_(True) for p in params]


def launch_ranks(script: str, out, world: int, timeout: float, **env) -> list:
    """Run ``script --worker OUT`` as ``world`` gloo ranks on 127.0.0.1 and load what each saved
    (``OUT/rank{r}.pt``); a rank that fails or a launch past ``timeout`` seconds fails the test."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), **env)
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # stay on the loopback interface
    procs = [subprocess.Popen([sys.executable, os.path.abspath(script), "--worker", str(out)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"DDP workers did not finish in {timeout:g} s")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def error_of(fn, *types) -> str | None:
    """``"Type: message"`` of the error of one of ``types`` that ``fn()`` raises, None if none: for
    per-rank programs, which report errors back instead of failing."""
    try:
        fn()
    except types as err:
        return f"{type(err).__name__}: {err}"
    return None


def gloo_rank(out_dir, scenarios, timeout_s: float) -> None:
    """The per-rank side of :func:`launch_ranks`: join the gloo group, run ``scenarios(rank)``
    (a dict of what to compare) and save it as ``OUT/rank{r}.pt``."""
    import datetime
    import os
    import warnings

    import torch.distributed as dist

    warnings.simplefilter("ignore")  # the pure-torch fallback warning, once per process
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    results = scenarios(rank)
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def step_both(ref_opt, params, opt, ours, steps):
    """``steps`` steps of two optimizers over twin parameters, on the same fresh random grads."""
    for _ in range(steps):
        for a, b in zip(params, ours):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ref_opt.step()
        opt.step()
