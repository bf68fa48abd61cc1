"""`fastscale study`: measure the critical batch size and compare lr scaling rules on real tasks.

Modules: tasks (digits CNN, least squares with a known noise scale), train (one run), fit
(targets, curve mismatch, the S/E trade-off fit), run (the ladder), report (files), cli.
"""

from .fit import curve_mismatch, fit_tradeoff
from .run import StudyConfig, default_batch_sizes, run_task
from .tasks import StudyError, lstsq_gradient_stats

__all__ = ["StudyConfig", "StudyError", "curve_mismatch", "default_batch_sizes", "fit_tradeoff",
           "lstsq_gradient_stats", "run_task"]
