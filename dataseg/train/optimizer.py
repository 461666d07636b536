"""AdamW with a backbone learning-rate multiplier, decay masks and schedules (optax).

[ours, METHOD.md section 2] Mask2Former's recipe: AdamW, backbone lr x0.1, no weight
decay on norms, biases and embeddings, global-norm clipping, poly or step schedule after
a linear warm-up.

The backbone multiplier exists to keep pretrained features from being washed out by the
randomly initialised heads' large early gradients; a backbone that starts from random
weights has nothing to protect and would only learn 10x slower, so the multiplier
applies only when `config.model.backbone.pretrained` names weights
(`make(..., pretrained_backbone=...)`; the demo's from-scratch model trains at x1.0).
"""

import jax
import jax.numpy as jnp
import optax

BACKBONE_PREFIX = "backbone"


def schedule(opt, total_steps):
  """Learning rate at each step: linear warm-up, then poly / step / cosine / constant."""
  lr, warmup = opt.lr, int(opt.warmup_steps)
  decay_steps = max(1, total_steps - warmup)
  if opt.schedule == "poly":
    main = optax.polynomial_schedule(lr, 0.0, opt.poly_power, decay_steps)
  elif opt.schedule == "step":
    main = optax.piecewise_constant_schedule(
      lr, {int(b * total_steps) - warmup: opt.step_factor for b in opt.step_boundaries}
    )
  elif opt.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps)
  elif opt.schedule == "constant":
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optimizer.schedule {opt.schedule!r}; allowed: poly, step, cosine, constant")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _path_names(path):
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def decay_mask(params):
  """Weight decay only on dense / conv kernels: not on norms, biases, embeddings."""
  return jax.tree_util.tree_map_with_path(
    lambda p, x: _path_names(p)[-1] == "kernel" and jnp.ndim(x) >= 2, params
  )


def backbone_mask(params):
  return jax.tree_util.tree_map_with_path(lambda p, _: BACKBONE_PREFIX in _path_names(p)[0], params)


def backbone_multiplier(opt, pretrained_backbone=True):
  """The backbone's lr factor: opt.backbone_multiplier for pretrained weights, else 1."""
  return float(opt.backbone_multiplier) if pretrained_backbone else 1.0


def make(opt, total_steps, pretrained_backbone=True):
  """(optax transformation, lr schedule). The transformation takes the params tree.

  `pretrained_backbone`: whether the backbone starts from pretrained weights (the
  trainer passes bool(config.model.backbone.pretrained)); False ignores
  opt.backbone_multiplier.
  """
  lr = schedule(opt, total_steps)
  multiplier = backbone_multiplier(opt, pretrained_backbone)
  parts = []
  if opt.clip_norm:
    parts.append(optax.clip_by_global_norm(opt.clip_norm))
  parts.append(
    optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask)
  )
  if multiplier != 1.0:
    parts.append(optax.masked(optax.scale(multiplier), backbone_mask))
  tx = optax.chain(*parts)
  if opt.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(opt.grad_accum_steps))
  return tx, lr
