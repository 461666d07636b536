r"""How fast can a small CNN learn the synthetic things' shapes? A baseline for issue 14.

  python launch/shape_learnability.py --lr=1e-3 --steps=1000

Cuts a 48x48 crop centred on every thing of the first 600 train / 100 validation images of
shapes_panoptic (generated in memory, the same generator as the TFDS builder), and trains a
5-layer GroupNorm CNN with global average pooling to name the shape, 12 crops per step (about
the number of things one joint demo step sees), printing the validation accuracy. It says
whether the shapes are learnable in a given number of steps when a network does nothing else;
launch/class_accuracy.py says what the joint model learned.
"""

import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from input_pipeline import synthetic

_LR = flags.DEFINE_float("lr", 1e-3, "AdamW learning rate")
_STEPS = flags.DEFINE_integer("steps", 1000, "training steps")
_BATCH = flags.DEFINE_integer("batch", 12, "crops per step")
_EVERY = flags.DEFINE_integer("every", 250, "steps between validation accuracies")

NAME = "shapes_panoptic"
CROP = 48


def crops(split, num_images):
  """Centred crops of the things (crowd and < 30-pixel segments skipped), their classes."""
  xs, ys = [], []
  for i in range(num_images):
    ex = synthetic.generate_example(NAME, split, i)
    image = np.pad(ex["image"], ((CROP // 2,) * 2, (CROP // 2,) * 2, (0, 0)))
    for s, (cls, crowd) in enumerate(zip(ex["seg_class"], ex["seg_is_crowd"])):
      rows, cols = np.nonzero(ex["segment_map"] == s)
      if cls >= 4 or crowd or len(rows) < 30:  # classes 0-3 are the things.
        continue
      cy, cx = int(rows.mean()), int(cols.mean())
      xs.append(image[cy : cy + CROP, cx : cx + CROP])
      ys.append(cls)
  return np.stack(xs).astype(np.float32) / 255.0, np.array(ys)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    for width, stride in ((32, 2), (32, 1), (64, 2), (64, 1), (128, 2)):
      x = nn.relu(nn.GroupNorm(num_groups=32)(nn.Conv(width, (3, 3), strides=stride)(x)))
    return nn.Dense(4)(x.mean((1, 2)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  x_train, y_train = crops("train", 600)
  x_val, y_val = crops("validation", 100)
  print(f"{len(y_train)} train crops, {len(y_val)} validation crops", flush=True)
  model = CNN()
  params = model.init(jax.random.PRNGKey(0), x_train[:1])
  tx = optax.adamw(_LR.value)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply(p, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  predict = jax.jit(lambda p, x: jnp.argmax(model.apply(p, x), -1))
  rng = np.random.RandomState(0)
  start = time.time()
  for i in range(_STEPS.value + 1):
    if i % _EVERY.value == 0:
      acc = float(np.mean(np.asarray(predict(params, x_val)) == y_val))
      print(
        f"step {i}: validation accuracy {acc:.2f} (chance 0.25), {time.time() - start:.0f} s",
        flush=True,
      )
    idx = rng.randint(0, len(y_train), _BATCH.value)
    params, opt_state, _ = step(params, opt_state, x_train[idx], y_train[idx])


if __name__ == "__main__":
  app.run(main)
