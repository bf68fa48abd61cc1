"""Tests that can fail: each statistics path, broken on purpose by one line, turns a test red.

Every mutant below is applied to a copy of the package (with its built extension) and the tests
named for it run against that copy in a subprocess: the run must fail (pytest exit code 1).
Before any mutant, the same tests run against the unmodified copy and must pass, so a red run
means the mutant was caught, not that the copy is broken. Add a line here with every new path.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (name, file, line as it is, line broken, tests that must catch it)
MUTANTS = [
    ("accumulate: AMP scale not divided out", "fastscale/noise_scale.py",
     "        sq = sq * divisor", "        sq = sq",
     ["tests/test_real_loops.py::test_grad_scaler_scale_is_divided_out"]),
    ("accumulate: loss scale not divided out", "fastscale/noise_scale.py",
     "    return sq / loss_scale**2", "    return sq",
     ["tests/test_real_loops.py::test_clipping_before_step_leaves_the_statistics_alone"]),
    ("accumulate: big-batch norm from the (clipped) .grad", "fastscale/noise_scale.py",
     "        big_pt, present = self.per_tensor(*squared_norms_at([self.snapshots[i] for i in seen], seen))",
     "        big_pt, present = self.per_tensor(*squared_norms_at([self.params[i].grad for i in seen], seen))",
     ["tests/test_real_loops.py::test_clipping_before_step_leaves_the_statistics_alone"]),
    ("accumulate: resets outside the optimizer not detected", "fastscale/noise_scale.py",
     "    kept = {i for i, (ref, _) in seen.items() if ref is not None and ref() is not None and ref() is now.get(i)}",
     "    kept = set(seen)",
     ["tests/test_real_loops.py::test_micro_batches_discarded_mid_step_are_forgotten",
      "tests/test_real_loops.py::test_gradients_reset_outside_the_optimizer"]),
    ("accumulate: late parameters diffed against a stale snapshot", "fastscale/noise_scale.py",
     "        acc.seen = {i: v for i, v in acc.seen.items() if i in kept}  # reset ones are measured afresh",
     "        kept = set(range(len(self.params)))",
     ["tests/test_real_loops.py::test_parameter_whose_grad_appears_in_a_later_micro_batch"]),
    ("accumulate/hooks: cross term g·T left out of |.grad|²", "fastscale/noise_scale.py",
     "            total = torch.where(continuing, big + 2 * d + a, big)  # |T + g|², T = .grad before g",
     "            total = torch.where(continuing, big + a, big)",
     ["tests/test_real_loops.py::test_hooked_norms_equal_the_snapshot_path"]),
    ("accumulate/hooks: a gradient first seen mid-accumulation left out of |.grad|²", "fastscale/noise_scale.py",
     "            acc.big_pt = torch.where(fresh, a, total)", "            acc.big_pt = total",
     ["tests/test_real_loops.py::test_hooked_norms_equal_the_snapshot_path"]),
    ("accumulate/hooks: two gradients in one micro-batch taken for one", "fastscale/noise_scale.py",
     "        if n == 1 and _same(self.after.get(i), grad):", "        if _same(self.after.get(i), grad):",
     ["tests/test_real_loops.py::test_a_gradient_the_hooks_cannot_account_for"]),
    ("accumulate/hooks: .grad written after the backward not noticed", "fastscale/noise_scale.py",
     "    return ref is not None and ref() is grad and sharded.version(grad) == version",
     "    return ref is not None and ref() is grad",
     ["tests/test_real_loops.py::test_a_gradient_the_hooks_cannot_account_for"]),
    ("accumulate/hooks: a first micro-batch's deferred |g|² never taken", "fastscale/noise_scale.py",
     "                late = torch.where(mask, tt, late)", "                pass",
     ["tests/test_real_loops.py::test_hooked_norms_equal_the_snapshot_path"]),
    ("accumulate/hooks: a first micro-batch left in .grad but gone before the next not read", "fastscale/noise_scale.py",
     "                sq = self._direct_sq(still)", "                sq = self._direct_sq(still) * 0",
     ["tests/test_real_loops.py::test_hooked_norms_equal_the_snapshot_path"]),
    ("accumulate/hooks: the gradient the hook added handed on to be added again", "fastscale/noise_scale.py",
     "    return stand_in", "    return None",
     ["tests/test_real_loops.py::test_gradients_the_hooks_add_are_torchs_own"]),
    ("accumulate/hooks: a tensor hook registered later not noticed", "fastscale/noise_scale.py",
     "    if not hooks or next(reversed(hooks)) != cap.pre_ids.get(i):", "    if False:",
     ["tests/test_real_loops.py::test_a_hook_registered_later_turns_the_added_gradient_back_into_autograds"]),
    ("accumulate/hooks: autograd.grad() taken for a micro-batch", "fastscale/noise_scale.py",
     "    if not _knows_node(cap, i):", "    if True:",
     ["tests/test_real_loops.py::test_autograd_grad_between_micro_batches_is_not_a_micro_batch"]),
    ("accumulate/hooks: a parameter's new AccumulateGrad node not followed", "fastscale/noise_scale.py",
     "        fresh = _accumulate_grad_node(cap.params[i])", "        fresh = None",
     ["tests/test_real_loops.py::test_a_parameter_given_new_data_keeps_its_hooks"]),
    ("accumulate/hooks: added into .grad under grad mode (create_graph)", "fastscale/noise_scale.py",
     "    if grad.numel() < _ADD_HERE_MIN_NUMEL or torch.is_grad_enabled():",
     "    if grad.numel() < _ADD_HERE_MIN_NUMEL:",
     ["tests/test_real_loops.py::test_a_hook_registered_later_turns_the_added_gradient_back_into_autograds"]),
    ("accumulate/hooks: added into .grad without knowing the AccumulateGrad node", "fastscale/noise_scale.py",
     "    add = old is not None and _knows_node(cap, i) and _can_add_here(grad, old)",
     "    add = old is not None and _can_add_here(grad, old)",
     ["tests/test_real_loops.py::test_hooks_made_under_inference_mode"]),
    ("accumulate/hooks: a deferred |g|² lost to a .grad reset goes unnoticed", "fastscale/noise_scale.py",
     "                acc.lost = True", "                pass",
     ["tests/test_real_loops.py::test_a_grad_reset_between_micro_batches_costs_that_step_only"]),
    ("accumulate/hooks: a node pre-hook's replacement added on top unnoticed", "fastscale/noise_scale.py",
     "    if stand_in is not None and not stand_in.added:", "    if False:",
     ["tests/test_real_loops.py::test_an_accumulate_grad_pre_hook_that_replaces_the_gradient_fails_loudly"]),
    ("accumulate/hooks: the stand-in refuses to be read by node hooks", "fastscale/noise_scale.py",
     "        return func(*unwrap(args), **unwrap(kwargs))", "        raise RuntimeError(func)",
     ["tests/test_real_loops.py::test_hooks_on_the_accumulate_grad_node_read_the_gradient_itself"]),
    ("measure_every: every step measured", "fastscale/noise_scale.py",
     "        self.measuring = self.config is None or steps % self.config.measure_every == 0",
     "        self.measuring = True",
     ["tests/test_real_loops.py::test_measure_every_measures_one_step_in_n"]),
    ("measure_every: the hooks read gradients on unmeasured steps", "fastscale/noise_scale.py",
     "    if cap is None or not cap.active or not _adds_into_grad(cap, i):",
     "    if cap is None or not _adds_into_grad(cap, i):",
     ["tests/test_real_loops.py::test_measure_every_measures_one_step_in_n"]),
    ("measure_every: the phase not restored by load_state_dict", "fastscale/optimizer.py",
     "            self.statistics.set_steps_taken(measure_steps)", "            pass",
     ["tests/test_real_loops.py::test_measure_every_measures_one_step_in_n"]),
    ("per-example registry: a registered type's rule never found", "fastscale/per_example/registry.py",
     "            return base if type(module).forward is base.forward else None",
     "            return None",
     ["tests/test_per_example.py::test_a_registered_rule_is_all_a_new_layer_needs"]),
    ("per-example GroupNorm: the forward's mean left out of rstd (sum x d - mean sum d)",
     "fastscale/per_example/norm.py",
     "    return ((sxd - mean * sd.reshape(b, mod.num_groups, -1)) * rstd).reshape(b, c), sd",
     "    return (sxd * rstd).reshape(b, c), sd",
     ["tests/test_per_example.py::test_group_norm_from_its_forwards_statistics"]),
    ("per-example fused: every example's weight gradient held until the graph dies",
     "fastscale/per_example/hooks.py",
     "                u.args = u.kwargs = u.kept = u.grad = u.example_grads = u.example_sq = None",
     "                u.args = u.kwargs = u.kept = u.grad = u.example_sq = None",
     ["tests/test_per_example.py::test_fused_example_gradients_are_freed_once_reduced"]),
    ("per-example fused Linear: a call's own norms taken while its layer has other calls",
     "fastscale/per_example/linear.py",
     "        if not torch.is_grad_enabled() and _cpu_kernel(x, weight, grad_out) and call.alone():",
     "        if not torch.is_grad_enabled() and _cpu_kernel(x, weight, grad_out):",
     ["tests/test_per_example.py::test_linear_reused_in_one_forward"]),
    ("per-example fused Linear: the kernel (not differentiable) run under create_graph",
     "fastscale/per_example/linear.py",
     "        if not torch.is_grad_enabled() and _cpu_kernel(x, weight, grad_out) and call.alone():",
     "        if _cpu_kernel(x, weight, grad_out) and call.alone():",
     ["tests/test_per_example.py::test_fused_double_backward"]),
    ("per-example fused Linear: the kernel's norms dropped by the rule", "fastscale/per_example/linear.py",
     "        return uses[0].example_sq", "        return torch.zeros_like(uses[0].example_sq)",
     ["tests/test_per_example.py::test_fused_linear_gradients_equal_plain_backward"]),
    ("per-example fused Linear: the bias's share of the kernel's norms left out", "fastscale/per_example/linear.py",
     "                sq = sq + bias_grads.square().sum(1)", "                pass",
     ["tests/test_per_example.py::test_kernel_takes_weight_and_bias_norms"]),
    ("per-example fused Linear: the kernel's cost rule never applies", "fastscale/per_example/linear.py",
     "    if native and method == \"auto\" and d_in * d_out <= tokens * tokens * (d_in + d_out):",
     "    if False:",
     ["tests/test_per_example.py::test_fused_linear_memory_rule"]),
    ("per-example fused conv: a call's own norms taken while its layer has other calls",
     "fastscale/per_example/conv.py",
     "        if not torch.is_grad_enabled() and ctx.call.alone():",
     "        if not torch.is_grad_enabled():",
     ["tests/test_per_example.py::test_fused_conv_gradients_equal_plain_backward"]),
    ("per-example fused conv: the kernel's norms dropped by the rule", "fastscale/per_example/conv.py",
     "        return sq + uses[0].example_sq", "        return sq",
     ["tests/test_per_example.py::test_kernel_takes_weight_and_bias_norms"]),
    ("per-example fused conv: the bias's share of the kernel's norms left out", "fastscale/per_example/conv.py",
     "                sq = sq + bias_grads.square().sum(1)", "                pass",
     ["tests/test_per_example.py::test_kernel_takes_weight_and_bias_norms"]),
    ("per-example GroupNorm: the kernel's two row sums swapped", "fastscale/per_example/norm.py",
     "        sxd, sd = (t.reshape(b, c) for t in ops.row_dot_sums(x.reshape(b * c, -1), d.reshape(b * c, -1)))",
     "        sd, sxd = (t.reshape(b, c) for t in ops.row_dot_sums(x.reshape(b * c, -1), d.reshape(b * c, -1)))",
     ["tests/test_per_example.py::test_group_norm_from_its_forwards_statistics"]),
    ("per-example fused norms: double backward asks autograd for x and the weight at once",
     "fastscale/per_example/norm.py",
     "        dx = torch.autograd.grad(norm(x, weight), x, grad_out, create_graph=True)[0] if need_x else None",
     "        dx, dw = torch.autograd.grad(norm(x, weight), (x, weight), grad_out, create_graph=True)\n        return dx, dw",
     ["tests/test_per_example.py::test_fused_norm"]),
    ("per-example fused LayerNorm: each example's bias rows not from the kernel's sums", "fastscale/per_example/norm.py",
     "            dx, dw, db = dx.view_as(x), w_rows.sum(0).view_as(weight), b_rows.sum(0).view_as(weight)",
     "            dx, dw, db, b_rows = dx.view_as(x), w_rows.sum(0).view_as(weight), b_rows.sum(0).view_as(weight), w_rows",
     ["tests/test_per_example.py::test_fused_norm"]),
    ("per-example: wrong small batch size", "fastscale/optimizer.py",
     "        self.observe_small_batch_norms(sq, 1, examples, loss_scale, grad_scaler, per_rank=shards is not None)",
     "        self.observe_small_batch_norms(sq, 2, examples, loss_scale, grad_scaler, per_rank=shards is not None)",
     ["tests/test_noise_scale.py::test_per_example_source"]),
    ("per-example/generic: loss scale not divided out of the big-batch norm", "fastscale/optimizer.py",
     "        big_pt = big_pt.double() / loss_scale**2", "        big_pt = big_pt.double()",
     ["tests/test_distributed.py::test_estimate_matches_single_process"]),
    ("replicas: big-batch norm read at step() (after clipping)", "fastscale/distributed.py",
     "                big_per_tensor=big,", "                big_per_tensor=None,",
     ["tests/test_distributed.py::test_estimate_matches_single_process"]),
    ("sharded: shards' norms not summed over the mesh", "fastscale/sharded.py",
     "        dist.all_reduce(vec, group=self.group)", "        pass",
     ["tests/test_fsdp.py::test_statistics_match_single_process"]),
    ("sharded: replicated tensors counted on every replica", "fastscale/sharded.py",
     "        parts = [last_norms.double() * w]",
     "        w = torch.ones_like(w)\n        parts = [last_norms.double() * w]",
     ["tests/test_fsdp.py::test_statistics_match_single_process"]),
    ("sharded: per-example norms not averaged over the data-parallel ranks", "fastscale/sharded.py",
     "            scale = 1.0 / self.data_parallel_size", "            scale = 1.0",
     ["tests/test_fsdp.py::test_statistics_match_single_process"]),
    ("estimator: non-finite steps not masked", "fastscale/noise_scale.py",
     "        ok = present & torch.isfinite(g2) & torch.isfinite(tr)", "        ok = present.clone()",
     ["tests/test_noise_scale.py::test_non_finite_steps_do_not_poison_the_averages"]),
    ("estimator: no trend, so it lags a moving target", "fastscale/noise_scale.py",
     "            return mean, torch.where(sloped, mean * torch.exp((rate * age).clamp(-1.0, 1.0)), mean)",
     "            return mean, mean",
     ["tests/test_estimator.py::test_tracks_a_moving_target_without_lag"]),
    ("estimator: window chosen on B_simple alone, so the long means' lag goes unseen", "fastscale/noise_scale.py",
     "        for value, sd in ((b, sd_b), (g2, sd_g2), (tr, sd_tr)):",
     "        for value, sd in ((b, sd_b),):",
     ["tests/test_estimator.py::test_tracks_a_moving_target_without_lag"]),
    ("estimator: rounding of a noiseless figure taken for drift", "fastscale/noise_scale.py",
     "            half = gamma * sd + 1e-9 * value.abs()  # a figure with no noise (a constant): rounding is no drift",
     "            half = gamma * sd",
     ["tests/test_estimator.py::test_a_figure_whose_interval_includes_zero_is_not_ready"]),
    ("estimator: per-step variance misjudged", "fastscale/noise_scale.py",
     "        sq = torch.stack([d[0] * d[0], d[1] * d[1], d[0] * d[1]]) / 2",
     "        sq = torch.stack([d[0] * d[0], d[1] * d[1], d[0] * d[1]]) / 4",
     ["tests/test_estimator.py::test_interval_covers_the_truth_at_a_fixed_parameter"]),
    ("estimator: covariance of |G|² and tr(Σ) left out", "fastscale/noise_scale.py",
     "        rel = v_tr / (tr * tr) + v_g2 / (g2 * g2) - 2 * c_gt / (tr * g2)",
     "        rel = v_tr / (tr * tr) + v_g2 / (g2 * g2)",
     ["tests/test_estimator.py::test_interval_covers_the_truth_at_a_fixed_parameter"]),
    ("estimator: ready while the interval includes zero", "fastscale/noise_scale.py",
     "                & (est[\"trace_cov\"] > 0) & (est[\"b_simple\"] - z * est[\"b_simple_stderr\"] > 0))",
     "                & (est[\"trace_cov\"] > 0))",
     ["tests/test_estimator.py::test_a_figure_whose_interval_includes_zero_is_not_ready"]),
    ("noise rule: always the fallback", "fastscale/noise_scale.py",
     "        return torch.where(self._ready(est, total), est[\"b_simple\"], fallback)",
     "        return torch.where(self._ready(est, total) & False, est[\"b_simple\"], fallback)",
     ["tests/test_scaling.py::test_noise_rule_follows_the_live_estimate_once_warmed_up"]),
    ("step: group options not validated before the first write", "fastscale/optimizer.py",
     "        self._check_groups()\n        self._check_params()", "        self._check_params()",
     ["tests/test_all_or_nothing.py::test_step_validates_hand_edited_group_options_first"]),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A copy of the package and tests; the mutants' tests must pass on it unmodified."""
    root = tmp_path_factory.mktemp("pristine")
    shutil.copytree(ROOT / "fastscale", root / "fastscale", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", root / "tests", ignore=shutil.ignore_patterns("__pycache__", "test_mutants.py"))
    probe = _run(root, ["-c", "import fastscale; print(fastscale.__file__)"], pytest_args=False)
    assert probe.returncode == 0 and probe.stdout.strip().startswith(str(root)), probe.stdout + probe.stderr
    tests = sorted({t for *_, ts in MUTANTS for t in ts})
    base = _run(root, tests)
    assert base.returncode == 0, base.stdout[-3000:]
    return root


def _run(root, args, pytest_args=True):
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args] if pytest_args else \
        [sys.executable, *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name,path,old,new,tests", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(pristine, tmp_path, name, path, old, new, tests):
    root = tmp_path / "mutant"
    shutil.copytree(pristine, root)
    source = (root / path).read_text()
    assert source.count(old) == 1, f"the line to break is not (once) in {path}: update MUTANTS"
    (root / path).write_text(source.replace(old, new))
    run = _run(root, tests)
    assert run.returncode == 1, f"mutant '{name}' survived {tests}:\n{run.stdout[-2000:]}"
