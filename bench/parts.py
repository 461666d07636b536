r"""Where the train step's time goes, part by part, ours against the reference (CPU).

  bash bench/ref_env.sh      # once: the reference's own venv
  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 0 \
      python bench/parts.py --sizes 256,512 --threads 1

Forward and forward + backward process CPU time (median of `--steps` after a warm-up) of
the R50 train step's parts on batch 2, each part jitted alone with random inputs and
random output cotangents (gradients w.r.t. its parameters and inputs):
  backbone        ResNet-50 (ours: frozen BN; reference: transformers' ResNet, BN in train
                  mode), image -> strides 4..32.
  pixel_decoder   the 6-layer multi-scale deformable encoder + FPN -> memory, mask features.
  full            forward, loss and backward of the whole step (no optimizer update), on
                  the synthetic panoptic batch of bench/train_step.py.
  rest            full - backbone - pixel_decoder: the transformer decoder and the
                  objective (matching and point losses on every layer).
Ours also reports the transformer decoder and the objective alone (the objective on random
[10, B, 100, H/4, W/4] mask logits). A part alone is not its share of the step exactly
(XLA fuses across parts in the full program), but each side is measured the same way.
Reference: bench/reference_mask2former.py --mode parts in bench/.ref_venv (a subprocess,
after ours).
"""

import os
import sys

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from conv_grad import timeit as cpu_time  # pylint: disable=g-import-not-at-top,wrong-import-position
import reference_mask2former as ref  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

from dataseg import cli  # pylint: disable=wrong-import-position
from dataseg.model import backbone as backbone_lib  # pylint: disable=wrong-import-position
from dataseg.model import pixel_decoder as pixel_decoder_lib  # pylint: disable=wrong-import-position
from dataseg.model import transformer_decoder as decoder_lib  # pylint: disable=wrong-import-position
from dataseg.objective import losses  # pylint: disable=wrong-import-position
from dataseg.train import compile_cache  # pylint: disable=wrong-import-position
from dataseg.train import trainer  # pylint: disable=wrong-import-position

_FLAGS = cli.new_flags()
flags.DEFINE_list("sizes", "256", "square image sides", flag_values=_FLAGS)
flags.DEFINE_integer("batch", 2, "images per batch", flag_values=_FLAGS)
flags.DEFINE_integer("steps", 3, "timed repetitions per part (median)", flag_values=_FLAGS)
flags.DEFINE_integer("threads", 1, "torch threads (reference)", flag_values=_FLAGS)
flags.DEFINE_enum(
  "side", "both", ["both", "ours", "reference"], "which side(s) to run", flag_values=_FLAGS
)


def _fwd_and_grad(apply, variables, inputs, rng, n):
  """(outputs, forward seconds, forward + backward seconds) of apply(variables, *inputs)."""
  fwd = jax.jit(apply)
  out = fwd(variables, *inputs)
  cot = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(np.float32)), out)

  def dot(v, *x):
    leaves = zip(jax.tree.leaves(apply(v, *x)), jax.tree.leaves(cot))
    return sum(jnp.vdot(a, c) for a, c in leaves)

  grad = jax.jit(jax.grad(dot, argnums=tuple(range(1 + len(inputs)))))
  return out, cpu_time(fwd, variables, *inputs, n=n), cpu_time(grad, variables, *inputs, n=n)


def time_ours(size, batch, n):
  config = train_step.bench_config(size, batch)
  mc = config.model
  key = jax.random.PRNGKey(0)
  rng = np.random.default_rng(0)
  out = dict(side="ours", size=size, batch=batch)
  images = jnp.asarray(rng.normal(size=(batch, size, size, 3)).astype(np.float32))
  backbone = backbone_lib.build_backbone(mc.backbone)
  variables = backbone.init(key, images)
  frozen = {k: v for k, v in variables.items() if k != "params"}
  features, out["backbone_fwd"], out["backbone"] = _fwd_and_grad(
    lambda p, x: backbone.apply({"params": p, **frozen}, x, train=True),
    variables["params"],
    (images,),
    rng,
    n,
  )
  pixel_decoder = pixel_decoder_lib.build_pixel_decoder(mc.pixel_decoder, jnp.float32, False)
  (memory, mask_features), out["pixel_decoder_fwd"], out["pixel_decoder"] = _fwd_and_grad(
    pixel_decoder.apply, pixel_decoder.init(key, features), (features,), rng, n
  )
  decoder = decoder_lib.build_decoder(mc)
  vocab = train_step.vocab_arrays(mc.classifier.text_dim)
  text, valid = jnp.asarray(vocab["text"]), jnp.asarray(vocab["valid"])
  (class_logits, mask_logits), out["decoder_fwd"], out["decoder"] = _fwd_and_grad(
    lambda p, m, f: decoder.apply(p, m, f, text, valid, train=True),
    decoder.init(key, memory, mask_features, text, valid),
    (memory, mask_features),
    rng,
    n,
  )
  fields, _ = ref.synthetic_panoptic(0, batch, size, config.max_segments)
  batch_arrays = jax.tree.map(jnp.asarray, dict(fields))
  # Random logits: the objective's cost does not depend on the values' source.
  class_logits = jnp.asarray(rng.normal(size=class_logits.shape).astype(np.float32))
  mask_logits = jnp.asarray(3.0 * rng.normal(size=mask_logits.shape).astype(np.float32))

  def objective(c, m):
    outputs = dict(class_logits=c, mask_logits=m)
    return losses.compute_loss(
      outputs,
      batch_arrays,
      task="panoptic",
      vocab_valid=valid,
      is_thing_vocab=vocab["is_thing"],
      config=config.loss,
      rng=jax.random.PRNGKey(1),
    )[0]

  out["objective_fwd"] = cpu_time(jax.jit(objective), class_logits, mask_logits, n=n)
  out["objective"] = cpu_time(jax.jit(jax.grad(objective, (0, 1))), class_logits, mask_logits, n=n)
  s = trainer.setup(config, num_datasets=1, vocab_size=ref.NUM_CLASSES)
  state = trainer.init_state(s)
  step_vocab = jax.device_put(vocab)
  step_batch = trainer.global_batch(fields, s.mesh)

  def loss(params):
    return trainer._loss_fn(  # pylint: disable=protected-access
      s, "panoptic", params, state["frozen"], step_batch, step_vocab, jax.random.PRNGKey(1), 0
    )[0]

  out["full"] = cpu_time(jax.jit(jax.grad(loss)), state["params"], n=n)
  out["rest"] = out["full"] - out["backbone"] - out["pixel_decoder"]
  return out


def main(argv=None):
  args = cli.parse(_FLAGS, argv, prog="python bench/parts.py", doc=__doc__)
  compile_cache.enable(compile_cache.DEFAULT_DIR)
  print(f"# ours: jax {jax.__version__}; reference: torch threads {args.threads}", flush=True)
  for size in (int(x) for x in args.sizes):
    ours, theirs = train_step.side_by_side(
      args.side,
      lambda size=size: time_ours(size, args.batch, args.steps),
      lambda size=size: train_step.run_reference(
        "parts", size, args.batch, args.steps, args.threads
      ),
    )
    if ours and theirs and "full" in theirs:
      for part in ("backbone", "pixel_decoder", "rest", "full"):
        print(
          f"{size}x{size} {part}: ours {ours[part]:.2f} s, reference {theirs[part]:.2f} s "
          f"CPU (forward + backward), ratio {ours[part] / theirs[part]:.2f}",
          flush=True,
        )


if __name__ == "__main__":
  main()
