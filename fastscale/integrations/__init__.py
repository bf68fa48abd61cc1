"""Where users train: Lightning, the Hugging Face Trainer, loggers (TensorBoard, W&B).

Each integration lives in its own module and imports its framework only there:

- :mod:`fastscale.integrations.logging`: :func:`~fastscale.integrations.logging.figures`, the
  applied learning rate and the noise-scale estimate as device tensors (no sync until logged).
- :mod:`fastscale.integrations.lightning`: ``NoiseScaleCallback`` for ``lightning.Trainer``
  (``pip install fastscale[lightning]``).
- :mod:`fastscale.integrations.hf`: ``NoiseScaleTrainer`` for ``transformers.Trainer``
  (``pip install fastscale[hf]``).

See docs/integrations.md.
"""
