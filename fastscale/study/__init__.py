"""`fastscale study`: measure the critical batch size and compare lr scaling rules on real tasks.

    pip install 'fastscale[study]'
    fastscale study --quick                 # ~30 s: a short ladder, both tasks
    fastscale study --out my-study          # full ladder (8·k, k=1..7, and 2^n up to 1024)
    python -m fastscale study --task lstsq  # only least squares (known true noise scale)

Modules: tasks (digits CNN, least squares with a known noise scale), train (one run), fit
(targets, curve mismatch, the S/E trade-off fit), run (the ladder), report (files), cli.
"""

from .fit import curve_mismatch, fit_tradeoff
from .run import StudyConfig, default_batch_sizes, run_task
from .tasks import StudyError, lstsq_gradient_stats

__all__ = ["StudyConfig", "StudyError", "curve_mismatch", "default_batch_sizes", "fit_tradeoff",
           "lstsq_gradient_stats", "run_task"]
