"""`fastscale study`: the CLI end to end, its one-line errors, and the math it reports."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastscale
from fastscale.study import fit
from fastscale.study.cli import main
from fastscale.study.run import default_batch_sizes
from fastscale.study.tasks import LeastSquaresTask, lstsq_gradient_stats

ROOT = Path(__file__).resolve().parent.parent
RULES = ["none", "linear", "sqrt", "noise"]


def _env():
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("FASTSCALE_NO_NATIVE", "1")  # no first-use compile inside the test's time
    return env


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fastscale", *args], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=timeout)


# ----------------------------------------------------------------- end to end
@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    out = tmp_path / "report"
    proc = _cli("study", "--quick", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"digits", "lstsq"}
    for name, res in results["tasks"].items():
        sizes = res["batch_sizes"]
        assert sizes == sorted(set(sizes)) and len(sizes) >= 3
        seen = {(r["batch_size"], r["rule"]) for r in res["runs"]}
        assert seen == {(b, rule) for b in sizes for rule in RULES}
        for r in res["runs"]:
            curve = r["curve"]
            assert len(curve["loss"]) == len(curve["examples"]) >= 2
            assert math.isfinite(curve["loss"][0])
            if not r["diverged"]:
                assert math.isfinite(r["final_loss"]) and r["final_loss"] < curve["loss"][0]
            assert curve["examples"] == [s * r["batch_size"] for s in curve["steps"]]
        reference = [r for r in res["runs"] if r["batch_size"] == min(sizes)]
        assert all(r["steps_to_target"] is not None for r in reference)  # the target is reachable
        assert all(r["mismatch"]["mean_abs"] == 0 for r in reference)
        best = res["fits"]["best"]
        assert best is not None and best["b_noise"] is not None and best["b_noise"] > 0
        assert res["b_simple_at_target_median"] > 0
    truth = results["tasks"]["lstsq"]["b_simple_true_at_target"]
    assert truth == pytest.approx(16 + 1 + 16 * 0.25 / (2 * 0.16 - 0.25))
    report = (out / "report.md").read_text()
    for needed in ("## Task `digits`", "## Task `lstsq`", "steps→target", "B_noise (fit)", "Estimator vs truth"):
        assert needed in report
    for png in ("digits_learning_curves", "digits_tradeoff", "digits_b_simple", "lstsq_learning_curves",
                "lstsq_tradeoff", "lstsq_b_simple", "lstsq_estimator_vs_truth"):
        data = (out / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"({png}.png)" in report


def test_same_seed_same_results():
    """Same seed, same numbers (results.json holds no timings); another seed, other numbers."""
    from fastscale.study.report import _clean
    from fastscale.study.run import StudyConfig, run_task

    def once(seed):
        cfg = StudyConfig(tasks=["lstsq"], batch_sizes=[8, 32], rules=["none", "noise"], max_examples=256,
                          min_steps=5, seed=seed, impl="torch")
        return json.dumps(_clean(run_task("lstsq", cfg)), sort_keys=True)

    first = once(0)
    assert once(0) == first
    assert once(1) != first


# ----------------------------------------------------------------- bad input
BAD = [
    (["study", "--task", "imagenet"], "invalid choice"),
    (["study", "--model", "resnet"], "invalid choice"),
    (["study", "--dataset", "mnist"], "invalid choice"),
    (["study", "--batch-sizes", "0"], "> 0"),
    (["study", "--batch-sizes", "8,-4"], "> 0"),
    (["study", "--batch-sizes", "eight"], "integers"),
    (["study", "--rules", "cubic"], "unknown scaling rule"),
    (["study", "--base-batch-size", "0"], "> 0"),
    (["study", "--device", "tpu"], "unknown device"),
    (["study", "--lr", "-1"], "> 0"),
    (["study", "--momentum", "1.5"], "[0, 1)"),
    (["study", "--seed", "x"], "integer"),
    (["nonsense"], "invalid choice"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = main(["study", "--task", "lstsq", "--out", str(blocker / "sub"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and "cannot write to output folder" in err, err


@pytest.mark.parametrize("module,package", [("matplotlib", "matplotlib"), ("tqdm", "tqdm"), ("sklearn", "scikit-learn")])
def test_missing_dependency_is_one_line(module, package, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    code = main(["study", "--task", "digits", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and package in err and "fastscale[study]" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_asked_but_absent(tmp_path, capsys):
    code = main(["study", "--task", "lstsq", "--device", "cuda", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "cuda" in err.lower(), err


def test_real_command_line_error_has_no_traceback():
    proc = _cli("study", "--batch-sizes", "16,0", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------- the math
def test_default_ladder():
    assert default_batch_sizes() == [8, 16, 24, 32, 40, 48, 56, 64, 128, 256, 512, 1024]


@pytest.mark.parametrize("dim,sigma", [(5, 0.7), (16, 0.5), (1, 2.0)])
def test_lstsq_noise_scale_closed_form_matches_monte_carlo(dim, sigma):
    gen = torch.Generator().manual_seed(dim)
    delta = torch.randn(dim, generator=gen, dtype=torch.float64) * 0.6
    n = 400_000
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, generator=gen, dtype=torch.float64)
    # Per-example gradient of ½(x·w − y)² with y = x·w* + σε, δ = w − w*.
    g = x * (x @ delta - sigma * eps).unsqueeze(1)
    mean = g.mean(0)
    trace_mc = (g - mean).square().sum(1).mean().item()
    truth = lstsq_gradient_stats(delta.square().sum().item(), dim, sigma)
    assert mean.sub(delta).norm().item() < 0.02 * (1 + delta.norm().item()) * math.sqrt(dim)
    assert trace_mc == pytest.approx(truth["trace_cov"], rel=0.03)
    assert truth["b_simple"] == pytest.approx(truth["trace_cov"] / delta.square().sum().item())


def test_lstsq_task_gradient_is_the_one_derived():
    task = LeastSquaresTask()
    model = task.make_model()
    with torch.no_grad():
        model.weight.normal_()
    x, y = task.sample(torch.Generator().manual_seed(3), 1)
    task.loss(model, (x, y)).backward()
    w = model.weight.detach().reshape(-1)
    expected = x[0] * (x[0] @ w - y[0])
    torch.testing.assert_close(model.weight.grad.reshape(-1), expected)


def test_optimizer_estimate_matches_lstsq_truth():
    """The optimizer's micro-batch estimate of B_simple at fixed weights (lr = 0) vs the closed form."""
    torch.manual_seed(0)
    task = LeastSquaresTask(dim=8, sigma=0.5)
    model = task.make_model()
    with torch.no_grad():
        model.weight.copy_(task.w_star + 0.3 * torch.randn(8))
    truth = task.true_stats(model)["b_simple"]
    b = 64
    opt = fastscale.FusedScaledSGD(model.parameters(), lr=0.0, batch_size=b, scaling="none", fused=False,
                                   noise_scale=fastscale.NoiseScaleConfig(beta=0.99, per_tensor=False))
    gen = torch.Generator().manual_seed(1)
    for _ in range(500):
        opt.zero_grad()
        for _ in range(2):
            (task.loss(model, task.sample(gen, b // 2)) * 0.5).backward()
            opt.accumulate_grad(batch_size=b // 2, loss_scale=0.5)
        opt.step()
    assert opt.noise_scale() == pytest.approx(truth, rel=0.15)


def test_fit_recovers_b_noise_from_synthetic_steps():
    sizes = default_batch_sizes()
    s_min, b_noise = 40.0, 150.0
    steps = [s_min * (1 + b_noise / b) for b in sizes]
    exact = fit.fit_tradeoff(sizes, steps)
    assert exact["b_noise"] == pytest.approx(b_noise, rel=1e-9)
    assert exact["s_min"] == pytest.approx(s_min, rel=1e-9)
    assert exact["e_min"] == pytest.approx(s_min * b_noise, rel=1e-9)
    # (S/S_min − 1)(E/E_min − 1) = 1 along the fitted curve.
    s_fit, e_fit = fit.tradeoff_curve(exact, sizes)
    for s, e in zip(s_fit, e_fit):
        assert (s / exact["s_min"] - 1) * (e / exact["e_min"] - 1) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = [s * math.exp(rng.normal(0, 0.05)) for s in steps]
    approx = fit.fit_tradeoff(sizes, noisy)
    assert approx["b_noise"] == pytest.approx(b_noise, rel=0.2)
    assert approx["rel_rms"] < 0.1


def test_fit_edge_cases():
    assert fit.fit_tradeoff([8], [100]) is None
    assert fit.fit_tradeoff([8, 16], [None, 50]) is None
    assert math.isinf(fit.fit_tradeoff([8, 16, 32], [400, 200, 100])["b_noise"])  # S ∝ 1/B: no saturation
    assert fit.fit_tradeoff([8, 16, 32], [100, 120, 140])["b_noise"] < 0  # more steps at larger B


def test_crossing_and_mismatch():
    curve = {"steps": [0, 1, 2, 3], "examples": [0, 8, 16, 24], "loss": [2.0, 1.0, 0.5, 0.25]}
    assert fit.crossing(curve, 0.75) == pytest.approx((1.5, 12.0))
    assert fit.crossing(curve, 0.1) is None
    assert fit.curve_mismatch(curve, curve)["mean_abs"] == 0
    shifted = dict(curve, loss=[v + 0.1 for v in curve["loss"]])
    m = fit.curve_mismatch(shifted, curve)
    assert m["mean_abs"] == pytest.approx(0.1) and m["examples"] == 24
