"""fastscale: drop-in torch.optim.SGD with batch-size learning-rate scaling, gradual warmup and
on-device gradient-noise-scale (critical batch size) statistics, fused into one pass."""

from . import ops
from ._extension import build_info

__all__ = ["ops", "build_info"]
__version__ = "0.1.0"
