"""fastscale: drop-in torch.optim.SGD with batch-size learning-rate scaling, gradual warmup and
on-device gradient-noise-scale (critical batch size) statistics, fused into one pass."""

from . import _extension, ops
from ._extension import build_info
from .noise_scale import NoiseScaleConfig
from .optimizer import FusedScaledSGD
from .per_example import PerExampleGradNorms
from .schedules import (AdaptiveBatchSize, BatchSizeSampler, BatchSizeSchedule, LinearRampBatchSize,
                        StepBatchSize)

__all__ = ["AdaptiveBatchSize", "BatchSizeSampler", "BatchSizeSchedule", "FusedScaledSGD", "LinearRampBatchSize",
           "NoiseScaleConfig", "PerExampleGradNorms", "StepBatchSize", "build_info", "ops"]
__version__ = "0.1.0"

_extension.load()  # registers the compiled kernels now, before any op is called (never silently skipped)
