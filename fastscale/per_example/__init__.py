"""Per-example squared gradient norms, from layer activations and output gradients.

For the noise-scale estimate with B_small = 1 (McCandlish et al. 2018, App. A) the optimizer
needs |g_i|^2, the squared norm of the gradient of each example's own loss l_i, summed over
all trainable parameters. Hooks collect each layer's input a (forward) and output gradient
delta (backward) during an ordinary ``loss.backward()`` and reduce them to a [B] vector
without materialising per-example gradients where an identity is cheaper
(Goodfellow 2015, "Efficient per-example gradient computations"; Li et al. 2022,
"Large language models can be strong differentially private learners" for the Gram form):

* ``nn.Linear`` on [B, d]: the per-example weight gradient is the outer product
  delta_i a_i^T, so its squared norm is |a_i|^2 |delta_i|^2; the bias adds |delta_i|^2.
* ``nn.Linear`` on [B, T, d] (extra dims flattened into T): g_i = sum_t delta_t a_t^T and
  |g_i|^2 = sum_{t,s} (a_t.a_s)(delta_t.delta_s). The Gram form costs ~B T^2 (d_in + d_out),
  materialising g_i (one bmm) ~B T d_in d_out; each layer takes the cheaper one. While
  attached, a call that materialises (within ``linear.FUSE_MEMORY_FACTOR``: where the
  unfused rule would) does so inside the layer's own backward and returns their sum as the
  weight gradient, which saves the extra product (``fused_linear=True``, the default).
* ``nn.Conv1d``/``nn.Conv2d``: the same two forms, one "token" per output position, per
  group: the Gram form on im2col patches; the materialised form as one weight-gradient
  convolution with the batch folded into the groups. While attached, a conv call that
  materialises runs through an autograd function whose backward returns the sum of the
  per-example weight gradients as the weight gradient, so autograd does not compute the
  weight gradient a second time (``fused_conv=True``, the default).
* ``nn.Embedding``: g_i has one row per distinct token id, the sum of that id's delta rows;
  repeated ids are summed before squaring (sorting, no host sync).
* ``nn.LayerNorm``/``nn.RMSNorm``/``nn.GroupNorm`` affine parameters: the weight gradient
  is sum over positions of xhat * delta, with xhat recomputed from the saved input; for
  GroupNorm rstd (sum x delta - mean sum delta) per channel, with the forward's own mean and
  rstd per (example, group), so xhat is never formed.

Loss reduction
--------------
The hooks see the gradient of the loss that ``backward`` was called on. With
``loss_reduction="mean"`` the loss is taken to be L = (1/B) sum_i l_i, where B is the size of
dim 0 of the layer inputs, so every output gradient carries a 1/B factor and the norms are
multiplied by B^2 to give |grad l_i|^2. A loss averaged over all B*T tokens of equal-length
examples is also "mean" (l_i is then the mean over example i's tokens). With
``loss_reduction="sum"`` (L = sum_i l_i) nothing is rescaled. Any other factor on the loss
(a GradScaler scale s, a gradient-accumulation 1/k) is left in the result, multiplied in
squared (s^2); divide it out or pass it to the consumer (``loss_scale``).

Limitations (each raises a clear error unless noted)
----------------------------------------------------
* The batch is dim 0 of every hooked layer's input (``batch_first`` layouts).
* Layers that mix examples (BatchNorm in training) have no per-example gradient; they are
  unsupported and the functorch fallback refuses them.
* A parameter shared by two modules (weight tying) is refused: its cross terms are not
  computed. A module called several times in one forward is handled exactly (its uses
  are concatenated along the token axis before squaring).
* A parameter that is used without its module's forward running (e.g. ``F.linear(x,
  lin.weight)``) is detected when it is the only use and raises; if the module's forward
  also ran, the extra functional use is not seen (not detectable cheaply).
* Each grad-enabled forward of the attached model starts a new step: call ``backward``
  before the next forward.
"""

from . import conv, embedding, linear, norm  # noqa: F401  (each registers its layer types)
from .hooks import PerExampleGradNorms

__all__ = ["PerExampleGradNorms"]
