r"""Model summary: parameters per top-level module and GFLOPs of one forward pass.

  python -m dataseg.model.summary --model=r50 --resolution=1024 [--vocab=133]

Parameters come from `jax.eval_shape(model.init)` (no weights are materialised).
FLOPs come from XLA's cost analysis of the compiled forward pass
(`jax.jit(apply).lower(...).compile().cost_analysis()['flops']`) for a batch of one
image. XLA counts a multiply-add as 2 FLOPs; papers that quote fvcore/detectron2
figures (e.g. Mask2Former's "226 GFLOPs") count it as 1, so compare against
`gmacs` (= gflops / 2) for those.
"""

import math

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from dataseg import cli
from dataseg.model import configs
from dataseg.model import dataseg_model


def _count(tree) -> int:
  leaves = jax.tree.leaves(tree)
  return int(sum(math.prod(x.shape) for x in leaves))


def abstract_variables(model, resolution: int, vocab: int, text_dim: int):
  """ShapeDtypeStructs of the model variables, plus the abstract inputs."""
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.uint8)
  text = jax.ShapeDtypeStruct((vocab, text_dim), jnp.float32)
  valid = jax.ShapeDtypeStruct((vocab,), jnp.bool_)
  variables = jax.eval_shape(
    lambda i, t, v: model.init(jax.random.key(0), i, t, v), images, text, valid
  )
  return variables, (images, text, valid)


def summarize(config, resolution: int = 1024, vocab: int = 133, *, flops: bool = True) -> dict:
  """Returns {'params': {module: count}, 'total_params', 'non_trainable',
  'gflops', 'gmacs'} for one [1, resolution, resolution, 3] image."""
  model = dataseg_model.build_model(config)
  variables, inputs = abstract_variables(model, resolution, vocab, config.classifier.text_dim)
  unboxed = _unbox(variables)
  params = unboxed["params"]
  out = {
    "params": {k: _count(v) for k, v in params.items()},
    "total_params": _count(params),
    "non_trainable": _count({k: v for k, v in unboxed.items() if k != "params"}),
  }
  out["params"]["decoder/head/classifier"] = _count(params["decoder"]["head"]["classifier"])
  pyramid = {k: v for k, v in params["backbone"].items() if k.startswith("simfp_")}
  if pyramid:  # ViTDet: the ViT encoder alone is what papers quote as the backbone size.
    out["params"]["backbone/vit (encoder)"] = _count(params["backbone"]) - _count(pyramid)
    out["params"]["backbone/simfp (pyramid)"] = _count(pyramid)
  if flops:
    lowered = jax.jit(model.apply).lower(unboxed, *inputs)
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # Older jax returned one dict per device.
      cost = cost[0]
    out["gflops"] = float(cost["flops"]) / 1e9
    out["gmacs"] = out["gflops"] / 2
  return out


def _unbox(tree):
  return nn.meta.unbox(tree)


def format_summary(name: str, resolution: int, vocab: int, s: dict) -> str:
  lines = [f"model={name} resolution={resolution} vocab={vocab}"]
  for k, v in s["params"].items():
    lines.append(f"  {k:<26s} {v / 1e6:9.3f} M params")
  lines.append(f"  {'total (trainable)':<26s} {s['total_params'] / 1e6:9.3f} M")
  lines.append(f"  {'non-trainable (frozen BN)':<26s} {s['non_trainable'] / 1e6:9.3f} M")
  if "gflops" in s:
    lines.append(
      f"  forward: {s['gflops']:.1f} GFLOPs (XLA, 2/multiply-add) = {s['gmacs']:.1f} GMACs"
    )
  return "\n".join(lines)


_FLAGS = cli.new_flags()
flags.DEFINE_enum(
  "model", "r50", configs.NAMES, "model size (dataseg/model/configs.py)", flag_values=_FLAGS
)
flags.DEFINE_integer("resolution", 1024, "square input side", flag_values=_FLAGS)
flags.DEFINE_integer("vocab", 133, "vocabulary size", flag_values=_FLAGS)
flags.DEFINE_integer(
  "text_dim", None, "text embedding width (default: the model's)", flag_values=_FLAGS
)
flags.DEFINE_enum(
  "dtype", None, ["float32", "bfloat16"], "compute dtype (default: the model's)", flag_values=_FLAGS
)
flags.DEFINE_bool(
  "no_flops", False, "skip compiling the forward pass for its FLOPs", flag_values=_FLAGS
)


def main(argv=None):
  """`python -m dataseg.model.summary FLAGS`; `argv` holds the flags (default sys.argv[1:])."""
  a = cli.parse(_FLAGS, argv, prog="python -m dataseg.model.summary", doc=__doc__)
  config = configs.model_config(a.model)
  if a.text_dim:
    config.classifier.text_dim = a.text_dim
  if a.dtype:
    config.dtype = a.dtype
  s = summarize(config, a.resolution, a.vocab, flops=not a.no_flops)
  print(format_summary(a.model, a.resolution, a.vocab, s))
  return s


if __name__ == "__main__":
  main()
