"""`fastscale study`: measure the critical batch size on real tasks, set it beside the optimizer's
online estimate, and compare lr scaling rules.

    pip install 'fastscale[study]'
    fastscale study --quick                 # under a minute: short ladders, all three tasks
    fastscale study --out my-study          # the full study (minutes)
    python -m fastscale study --task lstsq  # only least squares (known true noise scales)

Modules: tasks (digits CNN, least squares with known B_simple and B_noise, character-level
transformer LM), train (one run: from scratch, trunk, branch), measure (the critical batch size by
branching), fit (targets, criterion, S/E trade-off fit, bootstrap), run (per task), parallel
(worker processes), report (files, written atomically), cli.
"""

from .fit import bootstrap_branch, critical_batch, curve_mismatch, fit_tradeoff
from .measure import MeasureConfig, measure
from .run import StudyConfig, default_batch_sizes, run_task
from .tasks import StudyError, lstsq_gradient_stats

__all__ = ["MeasureConfig", "StudyConfig", "StudyError", "bootstrap_branch", "critical_batch", "curve_mismatch",
           "default_batch_sizes", "fit_tradeoff", "lstsq_gradient_stats", "measure", "run_task"]
