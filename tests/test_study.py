"""`fastscale study`: the critical batch size measured by branching, its bootstrap intervals, the
report (its first line, its atomic replacement), the tasks (least squares' closed forms, the
character-level LM's data and loss), the CLI's one-line errors."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastscale
from fastscale.study import fit, report
from fastscale.study.cli import main
from fastscale.study.measure import point_name
from fastscale.study.run import StudyConfig, default_batch_sizes, run_task
from fastscale.study.train import smoothed
from fastscale.study.tasks import (
    CHARLM_VOCAB, CharLMTask, LeastSquaresTask, StudyError, encode_text, load_reference_text, lstsq_gradient_stats,
    lstsq_isotropic_stats,
)

ROOT = Path(__file__).resolve().parent.parent


def _env():
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("FASTSCALE_NO_NATIVE", "1")  # no first-use compile inside the test's time
    return env


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fastscale", *args], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=timeout)


TINY = dict(branch_batch_sizes=[8, 16, 32, 64, 128], branch_points=[256], branch_examples=256, seeds=2,
            lr_factors=[0.5, 1.0, 2.0], bootstrap=200, impl="torch")


@pytest.fixture(scope="module")
def tiny_lstsq():
    """The branching measurement on least squares, on a tiny config (under a second)."""
    torch.set_num_threads(1)
    cfg = StudyConfig(tasks=["lstsq"], parts=["critical"], **TINY)
    return run_task("lstsq", cfg)


# ----------------------------------------------------------------- the measurement
def test_branching_measures_the_critical_batch_size(tiny_lstsq):
    crit = tiny_lstsq["critical"]
    (pt,) = crit["points"]
    assert pt["status"] == "measured" and crit["ladder"] == [8, 16, 32, 64, 128]
    assert 0 < pt["target"] < pt["start_loss"]  # the smallest batch size made progress, and that is the target
    ref = pt["rungs"][0]
    # The target is the lowest seed-mean (smoothed) loss of the B_ref branches after branch_examples examples.
    at = 256 / 8
    means = [np.mean([np.interp(at, r["curve"]["steps"], smoothed(r["curve"]["loss"])) for r in runs])
             for runs in ref["runs"]]
    assert pt["target"] == pytest.approx(min(means))
    for rung in pt["rungs"]:
        assert rung["lrs"] == sorted(rung["lrs"]) and len(rung["runs"]) == len(rung["lrs"])
        for runs in rung["runs"]:
            assert [r["seed"] for r in runs] == [r["seed"] for r in rung["runs"][0]]  # same seeds at every lr
            for r in runs:
                if "curve" not in r:  # kept for B_ref and for each batch size's best lr only
                    assert rung["batch_size"] > 8 and runs is not rung["runs"][rung["best"]]
                    continue
                s, loss = r["curve"]["steps"], r["curve"]["loss"]
                smooth = smoothed(loss)  # a centred mean over 5 evaluations, shrunk at the ends
                assert smooth[2] == pytest.approx(sum(loss[:5]) / 5) and smooth[0] == loss[0]
                hit = r["steps_to_target"]
                if hit is not None:  # interpolated between the evaluations around the first crossing
                    i = next(i for i, v in enumerate(smooth) if v <= pt["target"])
                    assert s[i - 1] <= hit <= s[i] and all(v > pt["target"] for v in smooth[:i])
                if rung["batch_size"] > 8 and not r["diverged"]:  # they stop once the smoothed loss is there
                    assert np.mean(loss[-5:]) <= pt["target"] or s[-1] == rung["max_steps"]
                    assert np.mean(loss[-6:-1]) > pt["target"] or len(loss) == 5
        # The best lr: fewest seed-mean steps to target.
        means = [np.mean([r["steps_to_target"] or np.inf for r in runs]) for runs in rung["runs"]]
        assert rung["best"] == int(np.argmin(means)) and rung["steps"] == pytest.approx(min(means))
    # Each grid after the first is centred on the linear-scaling guess from the previous best lr.
    for prev, rung in zip(pt["rungs"], pt["rungs"][1:]):
        guess = prev["lrs"][prev["guide"]] * rung["batch_size"] / prev["batch_size"]
        assert any(lr == pytest.approx(guess) for lr in rung["lrs"])
    # The criterion, recomputed from the steps: examples within 2× B_ref's, crossing in log B.
    ratios = [b * s / (8 * pt["steps"][0]) for b, s in zip(pt["batch_sizes"], pt["steps"])]
    assert pt["criterion"]["ratios"] == pytest.approx(ratios)
    first_fail = next(i for i, r in enumerate(ratios) if r > 2)
    assert pt["criterion"]["largest_passing"] == pt["batch_sizes"][first_fail - 1]
    assert pt["batch_sizes"][first_fail - 1] <= pt["criterion"]["value"] <= pt["batch_sizes"][first_fail]
    # Least squares knows the truth: B_noise in closed form at the branch point, and the measurement
    # sits within a factor of 2 of it on this tiny config.
    assert pt["truth"]["b_noise"] > 0 and pt["truth_at_target"]["b_noise"] > pt["truth"]["b_noise"]
    assert 0.5 < pt["criterion"]["value"] / pt["truth"]["b_noise"] < 2
    c = pt["comparison"]
    assert c["ratio"] == pytest.approx(c["estimate"] / pt["criterion"]["value"])
    lo, hi = pt["bootstrap"]["b_crit"]
    assert c["inside"] == (lo <= c["estimate"] <= hi)


def test_estimate_without_the_optimizers_interval(monkeypatch):
    """A fastscale whose gradient_stats() has no interval, no ready flag: the study uses the range
    over the repeated reference runs as the estimate's interval, and the report says n/a."""
    full = fastscale.FusedScaledSGD.gradient_stats

    def old_api(self):
        return {k: v for k, v in full(self).items() if k in ("steps", "grad_sq_norm", "trace_cov", "b_simple")}

    monkeypatch.setattr(fastscale.FusedScaledSGD, "gradient_stats", old_api)
    cfg = StudyConfig(tasks=["lstsq"], parts=["critical"], **{**TINY, "branch_batch_sizes": [8, 16, 32]})
    res = run_task("lstsq", cfg)
    (pt,) = res["critical"]["points"]
    assert pt["online"]["b_simple_low"] is None and pt["online"]["ready"] is None
    c = pt["comparison"]
    assert c["estimate_interval_kind"] == "the range over repeated trunks"
    assert c["estimate"] == pt["online_median"] and c["estimate_interval"] == tuple(pt["online_range"])
    row = next(line for line in report._critical_section("lstsq", res, []) if line.startswith("| single"))
    assert f"{report._fmt(pt['online']['b_simple'])} n/a |" in row


def test_lr_grid_is_extended_while_the_best_lr_sits_on_its_edge():
    """A grid far below the best lr: one lr is added above the edge, up to max_extend times."""
    torch.set_num_threads(1)
    cfg = StudyConfig(tasks=["lstsq"], parts=["critical"], lr=0.01, **{**TINY, "branch_batch_sizes": [8, 16]})
    ref = run_task("lstsq", cfg)["critical"]["points"][0]["rungs"][0]
    assert ref["extended"] == 3 and len(ref["lrs"]) == 6
    assert ref["lrs"][-1] == pytest.approx(0.02 * 2**3)  # 0.005, 0.01, 0.02 then ×2 three times
    assert ref["edge"] == "high"


def test_criterion_on_the_mccandlish_model():
    """S = S_min(1 + B_noise/B) gives examples ratio (B_noise + B)/(B_noise + B_ref): the criterion
    with factor 2 crosses at B_noise + 2·B_ref."""
    ladder = [2**k for k in range(3, 14)]
    for b_noise in (30.0, 100.0, 700.0):
        steps = [50 * (1 + b_noise / b) for b in ladder]
        c = fit.critical_batch(ladder, steps, 2.0)
        assert c["status"] == "interpolated"
        assert c["largest_passing"] <= b_noise + 16 <= c["first_failing"]
        # log r is interpolated linearly in log B between the last passing and first failing rung
        lo, hi = c["largest_passing"], c["first_failing"]
        r = [(b_noise + b) / (b_noise + 8) for b in (lo, hi)]
        t = (math.log(2) - math.log(r[0])) / (math.log(r[1]) - math.log(r[0]))
        assert c["value"] == pytest.approx(lo * (hi / lo) ** t, rel=1e-9)
        assert c["value"] == pytest.approx(b_noise + 16, rel=0.03)
    above = fit.critical_batch([8, 16, 32], [400, 200, 100])
    assert above["status"] == "above" and math.isinf(above["value"]) and above["largest_passing"] == 32
    unreached = fit.critical_batch([8, 16, 32], [100, 60, None])
    assert unreached["status"] == "unreached" and unreached["value"] == 16 and unreached["first_failing"] == 32


# ----------------------------------------------------------------- bootstrap intervals
def test_bootstrap_intervals_cover_and_shrink():
    rng = np.random.default_rng(0)
    ladder = [8, 16, 32, 64, 128, 256, 512]
    b_noise, s_min = 100.0, 20.0
    truth = [s_min * (1 + b_noise / b) for b in ladder]

    def sample(noise, seeds=4):  # [B][lr][seed]: two lrs, the second 30% slower
        return [[[s * f * math.exp(rng.normal(0, noise)) for _ in range(seeds)] for f in (1.0, 1.3)] for s in truth]

    exact = fit.bootstrap_branch(ladder, sample(0.0), n=200)
    assert exact["b_crit"][0] == pytest.approx(exact["b_crit"][1])  # no seed noise: no width
    assert exact["fit_b_noise"][0] == pytest.approx(b_noise)
    widths, covered = [], 0
    for _ in range(12):
        boot = fit.bootstrap_branch(ladder, sample(0.15), n=300, seed=int(rng.integers(1 << 30)))
        lo, hi = boot["fit_b_noise"]
        widths.append(hi - lo)
        covered += lo <= b_noise <= hi
        c_lo, c_hi = boot["b_crit"]
        assert c_lo <= c_hi and boot["replicates"] == 300
    assert covered >= 8  # nominal 90% (percentile intervals from 4 seeds run a little narrow)
    noisier = [np.subtract(*fit.bootstrap_branch(ladder, sample(0.4), n=300)["fit_b_noise"][::-1]) for _ in range(4)]
    assert np.median(noisier) > np.median(widths)
    # A replicate whose B_crit is above the ladder makes the upper bound infinite, not NaN.
    assert fit.interval([10, 20, math.inf, math.inf] * 5, 0.9) == (10, math.inf)


def test_bootstrap_points_for_the_from_scratch_fits():
    ladder = default_batch_sizes()
    rng = np.random.default_rng(1)
    steps = [40 * (1 + 150 / b) * math.exp(rng.normal(0, 0.05)) for b in ladder]
    boot = fit.bootstrap_points(ladder, steps, n=300)
    lo, hi = boot["fit_b_noise"]
    assert lo < fit.fit_tradeoff(ladder, steps)["b_noise"] < hi and lo < 150 < hi
    assert fit.bootstrap_points([8, 16], [100, 50], n=50)["fit_b_noise"] is None  # every replicate too few points
    few = fit.bootstrap_points([8, 16, 32], [100, 60, 45], n=400)  # 7 in 9 replicates miss a batch size
    assert few["fit_b_noise"] is None and few["fit_failed"] > 200


# ----------------------------------------------------------------- too few points
def test_fit_with_too_few_points_says_so():
    two = fit.fit_tradeoff([8, 16, 16], [100, 60, 61])
    assert not two["ok"] and two["b_noise"] is None and two["rel_rms"] is None
    assert "too few points to fit: 2 batch sizes reached the target" in two["note"]
    assert "1 batch size reached" in fit.fit_tradeoff([8, 16], [100, None])["note"]
    three = fit.fit_tradeoff([8, 16, 32], [100, 60, 45])
    assert three["ok"] and three["rel_rms"] > 1e-6  # three points: a residual that means something
    # In the report: the note, never the residual of a two-point fit.
    md = "\n".join(report.fit_table({"none": two, "best": three}, ["none", "best"]))
    none_row, best_row = md.splitlines()[2:4]
    assert "too few points to fit: 2 batch sizes" in none_row and "e-1" not in none_row
    assert none_row.count("—") == 4 and report._fmt(three["rel_rms"]) in best_row


def test_too_few_points_in_the_branch_report(tiny_lstsq):
    """A branch point where only two batch sizes reached the target: the table says why, no fit."""
    res = json.loads(json.dumps(report._clean(tiny_lstsq)))
    pt = res["critical"]["points"][0]
    for rung in pt["rungs"][2:]:
        rung["steps"], rung["best"] = None, None
    pt["steps"] = [r["steps"] for r in pt["rungs"]]
    pt["fit"] = fit.fit_tradeoff(pt["batch_sizes"], pt["steps"])
    md = "\n".join(report._critical_section("lstsq", res, []))
    assert "too few points to fit: 2 batch sizes reached the target" in md
    assert "relative RMS" not in md.split("#### Single branch point")[1]


# ----------------------------------------------------------------- the report's answer
def test_report_opens_with_the_recommendation(tiny_lstsq, tmp_path):
    results = {"command": "fastscale study (test)", "config": {"seed": 0, "crit_factor": 2.0},
               "environment": {"torch": torch.__version__, "device": "cpu", "threads": 1, "jobs": 1, "ops": "test"},
               "tasks": {"lstsq": tiny_lstsq}}
    written = report.write_report(results, tmp_path / "out", 1.0)
    md = (tmp_path / "out" / "report.md").read_text()
    lines = md.splitlines()
    assert lines[2] == "## Recommendation"
    rec = tiny_lstsq["critical"]["recommendation"]
    pt = tiny_lstsq["critical"]["points"][0]
    # X: the largest batch size that passes the criterion at every point, its tuned lr, Z: B_crit.
    x = pt["criterion"]["largest_passing"]
    assert rec["batch_size"] == x and pt["criterion"]["ratios"][pt["batch_sizes"].index(x)] <= 2
    assert rec["lr"] == pt["best_lrs"][pt["batch_sizes"].index(x)]
    expected = (f"- **lstsq**: use batch size **{x:g}** with lr **{report._fmt(rec['lr'])}** (plain SGD); above "
                f"**{report._fmt(pt['criterion']['value'], 2)}** the extra examples buy little.")
    assert lines[4] == expected
    assert "online B_simple / measured B_crit" in md and "single" == point_name(0, 1)
    for png in ("lstsq_critical", "lstsq_estimate_vs_measured", "lstsq_branches"):
        data = (tmp_path / "out" / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and f"({png}.png)" in md
    assert {p.name for p in written} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_recommendation_when_the_critical_batch_is_above_the_ladder():
    res = {"example_unit": "sequence", "critical": {
        "momentum": 0.9, "ladder": [8, 16, 32],
        "recommendation": {"ok": True, "batch_size": 32, "lr": 0.5, "above": math.inf, "above_censored": True,
                           "largest_tried": 32, "b_crit_by_point": [math.inf]}}}
    line = report.recommendation_line("charlm", res)
    assert line.startswith("**charlm**: use batch size **32** sequences with lr **0.5** (SGD, momentum 0.9); up to 32")
    assert "B_crit is above the ladder" in line


# ----------------------------------------------------------------- the report folder, replaced atomically
def _results():
    return {"command": "fastscale study (test)", "config": {"seed": 0},
            "environment": {"torch": "x", "device": "cpu", "threads": 1, "ops": "test"}, "tasks": {}}


def _siblings(out: Path):
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_second_run_leaves_no_file_of_the_first(tmp_path):
    out = tmp_path / "study"
    report.write_report(_results(), out, 1.0)
    (out / "old_plot.png").write_bytes(b"stale")  # a plot the next run does not make
    first = (out / "report.md").read_text()
    report.write_report({**_results(), "command": "second"}, out, 2.0)
    assert not (out / "old_plot.png").exists()
    assert (out / "report.md").read_text() != first and "second" in (out / "report.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == [".fastscale-study", "report.md", "results.json"]
    assert _siblings(out) == []  # no temporary folder left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the temporary folder's 0700


def test_interrupted_run_leaves_the_old_report(tmp_path, monkeypatch):
    out = tmp_path / "study"
    report.write_report(_results(), out, 1.0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(results, where, wall):
        (where / "results.json").write_text("{half")
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "_write_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(_results(), out, 1.0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _siblings(out) == []


def test_interrupt_between_the_two_renames_is_held(tmp_path, monkeypatch):
    """Where the file system cannot exchange two folders, the swap is two renames; a Ctrl-C
    arriving between them is delivered only after the new report is in place."""
    out = tmp_path / "study"
    report.write_report(_results(), out, 1.0)
    monkeypatch.setattr(report, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        real_rename(src, dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after the old folder moved away

    monkeypatch.setattr(report.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        report.write_report({**_results(), "command": "new"}, out, 1.0)
    assert len(calls) == 2 and calls[1][1] == "study"
    assert "new" in (out / "report.md").read_text()
    assert _siblings(out) == []


def test_out_folder_checks(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("do not delete")
    with pytest.raises(StudyError, match="not a fastscale study report"):
        report.check_out(str(other))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StudyError, match="it is a file"):
        report.check_out(str(blocker))
    with pytest.raises(StudyError, match="cannot write to output folder"):
        report.check_out(str(blocker / "sub"))
    assert report.check_out(str(tmp_path / "new" / "deeper")) == tmp_path / "new" / "deeper"


# ----------------------------------------------------------------- the character-level language model
def test_charlm_data_and_loss():
    train, held, facts = load_reference_text()
    assert len(train) > 300_000 and len(held) > 30_000 and facts["topics"] > 50
    assert held not in train and train[:2000] not in held  # topics held out whole
    ids = encode_text("for x in y:\n\té")
    assert ids.tolist()[:4] == [CHARLM_VOCAB.index(c) for c in "for "] and ids[-1] == len(CHARLM_VOCAB)
    task = CharLMTask()
    x, y = task.sample(torch.Generator().manual_seed(0), 5)
    assert x.shape == y.shape == (5, task.context) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next characters
    torch.manual_seed(0)
    model = task.make_model()
    first = task.evaluate(model)
    assert first == task.evaluate(model)  # a fixed held-out set
    assert first["loss"] == pytest.approx(math.log(task.vocab), rel=0.1)  # untrained: about uniform
    loss = task.loss(model, (x, y))
    assert loss.ndim == 0 and loss.item() == pytest.approx(
        torch.nn.functional.cross_entropy(model(x).reshape(-1, task.vocab), y.reshape(-1)).item())
    opt = fastscale.FusedScaledSGD(model.parameters(), lr=0.3, momentum=0.9, fused=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        opt.zero_grad()
        task.loss(model, task.sample(gen, 16)).backward()
        opt.step()
    assert task.evaluate(model)["loss"] < first["loss"] - 1.0


def test_charlm_without_the_text(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)
    with pytest.raises(StudyError, match="pydoc_data.topics"):
        load_reference_text()


# ----------------------------------------------------------------- end to end
def test_cli_end_to_end_and_rerun(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    out = tmp_path / "report"
    args = ["study", "--task", "lstsq", "--out", str(out), "--no-progress", "--jobs", "1",
            "--branch-batch-sizes", "8,16,32", "--branch-points", "256", "--branch-examples", "256", "--seeds", "2",
            "--lr-factors", "0.5,1,2", "--bootstrap", "100", "--batch-sizes", "8,32", "--rules", "none,linear",
            "--max-examples", "512", "--min-steps", "10", "--impl", "torch"]
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "use batch size" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    res = results["tasks"]["lstsq"]
    assert res["critical"]["ladder"] == [8, 16, 32] and res["rules"]["batch_sizes"] == [8, 32]
    assert {(r["batch_size"], r["rule"]) for r in res["rules"]["runs"]} == {(b, r) for b in (8, 32)
                                                                          for r in ("none", "linear")}
    md = (out / "report.md").read_text()
    assert md.splitlines()[4].startswith("- **lstsq**: use batch size")
    (out / "stale.png").write_bytes(b"old")
    assert main([*args, "--skip", "rules"]) == 0  # again, in this process, without the from-scratch part
    assert not (out / "stale.png").exists() and (out / "report.md").exists()
    assert json.loads((out / "results.json").read_text())["tasks"]["lstsq"]["critical"]["points"] == \
        results["tasks"]["lstsq"]["critical"]["points"]  # same seed, same numbers


def test_worker_processes_give_the_same_results():
    from fastscale.study.parallel import Runner

    task = LeastSquaresTask()
    torch.manual_seed(0)
    state = task.make_model().state_dict()
    # The first job is the longest: with two workers it finishes last, out of submission order.
    jobs = [("branch_run", ("lstsq", None, "cpu"), dict(state=state, batch_size=b, lr=0.2, momentum=0.0, seed=b,
                                                        max_steps=steps, eval_every=2, target=None,
                                                        divergence_loss=1e9, impl="torch"))
            for b, steps in ((8, 400), (16, 10), (32, 10), (64, 10))]
    with Runner(1) as one, Runner(2) as two:
        assert one.map(jobs) == two.map(jobs)


def test_same_seed_same_results():
    """Same seed, same numbers (results.json holds no timings); another seed, other numbers."""
    def once(seed):
        cfg = StudyConfig(tasks=["lstsq"], parts=["rules"], batch_sizes=[8, 32], rules=["none", "noise"],
                          max_examples=256, min_steps=5, seed=seed, impl="torch", bootstrap=50)
        return json.dumps(report._clean(run_task("lstsq", cfg)), sort_keys=True)

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
    (["study", "--branch-batch-sizes", "0"], "> 0"),
    (["study", "--lr-factors", "1,-2"], "> 0"),
    (["study", "--crit-factor", "1"], "> 1"),
    (["study", "--skip", "everything"], "unknown part"),
    (["study", "--rules", "cubic"], "unknown scaling rule"),
    (["study", "--base-batch-size", "0"], "> 0"),
    (["study", "--device", "tpu"], "unknown device"),
    (["study", "--lr", "-1"], "> 0"),
    (["study", "--momentum", "1.5"], "[0, 1)"),
    (["study", "--seed", "x"], "integer"),
    (["study", "--jobs", "0"], "> 0"),
    (["nonsense"], "invalid choice"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line(argv, message, tmp_path, capsys):
    if argv[0] == "study":  # should the check go, fail fast ("at least 2 batch sizes") rather than run a study
        argv = ["study", "--branch-batch-sizes", "16", "--out", str(tmp_path / "out"), *argv[1:]]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("argv,message", [
    (["--branch-batch-sizes", "16"], "at least 2 batch sizes"),
    (["--skip", "critical,rules"], "nothing to do"),
])
def test_bad_config_is_one_line(argv, message, tmp_path, capsys):
    code = main(["study", "--task", "lstsq", "--out", str(tmp_path), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


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


# ----------------------------------------------------------------- least squares: the truth
def test_default_ladder():
    assert default_batch_sizes() == [8, 16, 24, 32, 40, 48, 56, 64, 128, 256, 512, 1024]


@pytest.mark.parametrize("dim,sigma,condition", [(5, 0.7, 1.0), (16, 0.5, 10.0), (8, 0.3, 100.0)])
def test_lstsq_noise_scales_closed_form_match_monte_carlo(dim, sigma, condition):
    """B_simple = tr(Σ)/|G|² and B_noise = tr(HΣ)/(GᵀHG) with x ~ N(0, diag(λ)), against sampled
    per-example gradients g = x(x·δ − σε)."""
    from fastscale.study.tasks import default_spectrum

    gen = torch.Generator().manual_seed(dim)
    lam = default_spectrum(dim, condition)
    delta = torch.randn(dim, generator=gen, dtype=torch.float64) * 0.6
    n = 400_000
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64) * lam.sqrt()
    eps = torch.randn(n, generator=gen, dtype=torch.float64)
    g = x * (x @ delta - sigma * eps).unsqueeze(1)
    mean = g.mean(0)
    cov = torch.cov(g.T, correction=0)
    truth = lstsq_gradient_stats(delta, sigma, lam)
    torch.testing.assert_close(mean, lam * delta, atol=0.02 * (1 + delta.norm().item()), rtol=0)
    assert cov.trace().item() == pytest.approx(truth["trace_cov"], rel=0.03)
    assert (lam * cov.diagonal()).sum().item() == pytest.approx(truth["trace_h_cov"], rel=0.03)
    g_true = lam * delta
    assert truth["b_simple"] == pytest.approx(truth["trace_cov"] / g_true.square().sum().item())
    assert truth["b_noise"] == pytest.approx(truth["trace_h_cov"] / (g_true.square() * lam).sum().item())
    if condition == 1.0:  # H = I: the two coincide, and equal the isotropic formula
        assert truth["b_noise"] == pytest.approx(truth["b_simple"])
        assert truth["b_simple"] == pytest.approx(lstsq_isotropic_stats(delta.square().sum().item(), dim, sigma)["b_simple"])
    else:
        assert abs(truth["b_noise"] / truth["b_simple"] - 1) > 0.01


def test_lstsq_noise_scales_part_late_in_training():
    """Once the stiff directions have converged (δ in the soft ones), B_noise ≫ B_simple."""
    task = LeastSquaresTask()
    delta = torch.zeros(task.dim, dtype=torch.float64)
    delta[-1] = 0.3  # only the softest direction (λ = 1/100) is left
    t = lstsq_gradient_stats(delta, task.sigma, task.spectrum)
    assert t["b_noise"] > 5 * t["b_simple"]


def test_lstsq_task_gradient_and_loss_are_the_ones_derived():
    task = LeastSquaresTask()
    model = task.make_model()
    with torch.no_grad():
        model.weight.normal_()
    x, y = task.sample(torch.Generator().manual_seed(3), 1)
    task.loss(model, (x, y)).backward()
    w = model.weight.detach().reshape(-1)
    torch.testing.assert_close(model.weight.grad.reshape(-1), x[0] * (x[0] @ w - y[0]))
    xs, ys = task.sample(torch.Generator().manual_seed(4), 200_000)
    empirical = 0.5 * (xs @ w - ys).square().mean().item()
    assert task.evaluate(model)["loss"] == pytest.approx(empirical, rel=0.02)  # ½(δᵀΛδ + σ²)


def test_optimizer_estimate_matches_lstsq_truth():
    """The optimizer's micro-batch estimate of B_simple at fixed weights (lr = 0) vs the closed form."""
    torch.manual_seed(0)
    task = LeastSquaresTask(dim=8, sigma=0.5, condition=10.0)
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
    assert opt.gradient_stats()["b_simple"] == pytest.approx(truth, rel=0.15)


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
    assert not fit.fit_tradeoff([8], [100])["ok"]
    assert not fit.fit_tradeoff([8, 16], [None, 50])["ok"]
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


# ----------------------------------------------------------------- the adaptive arm (issue #12)
def _acfg(**kw):
    from fastscale.study.adaptive import AdaptiveConfig

    return AdaptiveConfig(**{**dict(min_batch_size=8, max_batch_size=64, multiple=8, factor=2.0, check_every=5,
                                    max_growth=4.0, rule="linear", rewarmup_steps=0), **kw})


def _fixed(b, rule, steps):
    return {"batch_size": b, "rule": rule, "steps_to_target": steps,
            "examples_to_target": None if steps is None else b * steps}


def _adaptive_run(steps, examples, target=1.0):
    # evaluations at 0 and at (steps, examples) with the loss crossing the target exactly there
    return {"curve": {"steps": [0, steps], "examples": [0, examples], "loss": [2.0, target]}}


@pytest.mark.parametrize("steps, examples, met, why", [
    (50, 1000, True, None),  # ≤ 1.1 × 960 examples, 50 ≤ 0.8 × 64 steps (B=16: 64 steps, 1024 examples)
    (60, 1000, False, "took 0.94× the steps"),
    (40, 1100, False, "used 1.15× the smallest batch's examples"),
])
def test_adaptive_criterion(steps, examples, met, why):
    from fastscale.study.adaptive import compare

    fixed = [_fixed(8, "none", 120), _fixed(16, "linear", 64), _fixed(64, "linear", 20), _fixed(32, "sqrt", None)]
    c = compare(_adaptive_run(steps, examples), fixed, 1.0, _acfg())
    assert c["met"] is met
    # B=64 takes fewer steps but 1280 examples > 1.1 × 960: not a fair comparison, left out
    assert c["best_fixed"]["batch_size"] == 16 and c["example_budget"] == pytest.approx(1056)
    assert (why is None and c["why"] is None) or why in c["why"]


def test_adaptive_criterion_without_a_reference():
    from fastscale.study.adaptive import compare

    c = compare(_adaptive_run(50, 1000), [_fixed(8, "none", None), _fixed(16, "linear", 64)], 1.0, _acfg())
    assert not c["met"] and "smallest batch size (8) never reached" in c["why"]
    c = compare({"curve": {"steps": [0, 5], "examples": [0, 40], "loss": [2.0, 1.5]}}, [_fixed(8, "none", 120)], 1.0,
                _acfg())
    assert not c["met"] and c["why"] == "the adaptive run never reached the target loss"


def test_adaptive_crossing_interpolates_examples():
    # the batch grew from 8 to 32 between the evaluations: examples are not steps × one batch
    assert fit.crossing({"steps": [0, 10, 20], "examples": [0, 80, 400], "loss": [3.0, 2.0, 1.0]}, 1.5) == (15.0, 240.0)


def test_adaptive_arm_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = StudyConfig(tasks=["lstsq"], parts=["rules", "adaptive"], batch_sizes=[8, 32, 128], rules=["none", "linear"],
                      max_examples=1024, min_steps=5, impl="torch", bootstrap=20)
    res = run_task("lstsq", cfg)
    a = res["adaptive"]
    sizes = a["run"]["curve"]["batch_size"]
    assert sizes[0] == 8 and max(sizes) > 8  # it grew on least squares, whose noise scale grows
    assert all(b % 8 == 0 and 8 <= b <= 128 for b in sizes) and sizes == sorted(sizes)
    assert a["run"]["examples"] >= 1024
    assert len(a["fixed"]) == 5 and set(a["comparison"]) >= {"met", "why", "example_budget", "best_fixed"}
    # the lr followed the linear rule: lr = 0.2 × B/8 once any re-warmup is over
    c = a["run"]["curve"]
    assert c["lr"][-1] == pytest.approx(0.2 * c["batch_size"][-1] / 8)
    files = report.write_report({"tasks": {"lstsq": res}, "environment": {"torch": "x", "device": "cpu", "threads": 1,
                                                                          "ops": "x"},
                                 "config": {"seed": 0, "crit_factor": 2.0}, "command": "x"}, tmp_path / "r", 1.0)
    assert tmp_path / "r" / "lstsq_adaptive.png" in files
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Adaptive batch size" in md and "**Criterion**" in md
