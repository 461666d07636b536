"""The whole DaTaSeg model: shapes per backbone x pixel decoder, grads, vocabulary
independence, bf16, classifier maths, configs and the parameter budget."""

import copy
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dataseg.model import classifier
from dataseg.model import configs
from dataseg.model import dataseg_model
from dataseg.model import summary

TEXT_DIM = 12


def _tiny_config(backbone="resnet", pixel_decoder="fpn"):
  c = configs.model_config("tiny")
  c.classifier.text_dim = TEXT_DIM
  if backbone == "vitdet":
    c.backbone = dict(
      name="vitdet",
      patch=16,
      width=32,
      depth=2,
      heads=2,
      mlp=64,
      window=2,
      global_blocks=(1,),
      pretrain_grid=4,
      out_dim=32,
      dtype=c.get_ref("dtype"),
      remat=c.get_ref("remat"),
    )
  else:
    c.backbone.norm = "frozen_bn"  # exercises the non-'params' collection
  c.pixel_decoder = dict(name=pixel_decoder, dim=32, layers=1, heads=2, points=2, ffn=32)
  c.decoder.update(num_queries=4, layers=2, heads=2, ffn=32, dim=32)
  return c


def _inputs(b=2, h=64, w=64, v=5, seed=0):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.integers(0, 256, (b, h, w, 3)), jnp.uint8)
  text = jnp.asarray(rng.normal(size=(v, TEXT_DIM)), jnp.float32)
  valid = jnp.arange(v) < v - 1  # last entry is padding
  return images, text, valid


def _fast_init(model, *inputs, seed=0):
  """Variables with the shapes of `model.init`, filled from numpy.

  Compiling `model.init` (hundreds of RNG calls) costs more than the forward pass
  on a CPU, so these tests trace it with `jax.eval_shape` only; the initialisers
  themselves run in test_pixel_decoder.py / test_transformer_decoder.py.
  Kernels ~ N(0, 1/fan_in); norm scales and frozen-BN variances 1; the logit
  scale at its init value.
  """
  rng = np.random.default_rng(seed)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))

  def fill(path, x):
    name = jax.tree_util.keystr(path[-1:])
    if "log_logit_scale" in name:
      return jnp.full(x.shape, math.log(1 / 0.07), x.dtype)
    if "scale" in name or "var" in name:
      return jnp.ones(x.shape, x.dtype)
    fan_in = math.prod(x.shape[:-1]) if "kernel" in name else 1
    return jnp.asarray(rng.normal(size=x.shape) / math.sqrt(fan_in), x.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _loss_fn(model, variables, images, text, valid):
  """A differentiable stand-in for the objective: CE towards class 1 and
  background, plus a mask term. Returns (loss, outputs)."""

  def loss_fn(params):
    out = model.apply({**variables, "params": params}, images, text, valid)
    logp = jax.nn.log_softmax(out["class_logits"], -1)
    ce = -(logp[..., 1].mean() + logp[..., -1].mean())
    return ce + jax.nn.sigmoid(out["mask_logits"]).mean(), out

  return loss_fn


@pytest.fixture(scope="module")
def tiny():
  """A tiny ViTDet + deformable-attention model with one compiled
  forward+backward whose outputs serve as the fp32 reference of the other tests.

  (A 1-block ViT compiles several times faster than ResNet-18 on a CPU; the
  ResNet numerics are tested with the backbone.)
  """
  c = _tiny_config("vitdet", "msdeform")
  c.backbone.depth = 1
  c.decoder.layers = 1  # the multi-layer scale cycle is tested with the decoder
  model = dataseg_model.build_model(c)
  images, text, valid = _inputs()
  variables = _fast_init(model, images, text, valid)
  (loss, out), grads = jax.jit(
    jax.value_and_grad(_loss_fn(model, variables, images, text, valid), has_aux=True)
  )(variables["params"])
  return dict(
    config=c,
    model=model,
    inputs=(images, text, valid),
    variables=variables,
    loss=loss,
    out=out,
    grads=grads,
  )


@pytest.mark.parametrize(
  "backbone,pixel_decoder",
  [("resnet", "fpn"), ("resnet", "msdeform"), ("vitdet", "fpn"), ("vitdet", "msdeform")],
)
def test_output_shapes(backbone, pixel_decoder):
  """Shapes of every backbone x pixel decoder, traced (jax.eval_shape) through
  init and apply; the numerics of the default run in the fixture below."""
  c = _tiny_config(backbone, pixel_decoder)
  c.remat = pixel_decoder == "msdeform"  # remat path traces too
  model = dataseg_model.build_model(c)
  images, text, valid = _inputs(w=96)
  out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), images, text, valid)
  assert set(variables["params"]) == {"backbone", "pixel_decoder", "decoder"}
  if backbone == "resnet":  # frozen BN statistics live outside 'params'
    assert set(variables) == {"params", "frozen"}
  assert out["class_logits"].shape == (3, 2, 4, 6)
  assert out["mask_logits"].shape == (3, 2, 4, 16, 24)
  assert out["class_logits"].dtype == out["mask_logits"].dtype == jnp.float32


def test_jit_and_grad_are_finite(tiny):
  out = tiny["out"]
  assert out["class_logits"].shape == (2, 2, 4, 6)
  assert out["mask_logits"].shape == (2, 2, 4, 16, 16)
  assert np.isfinite(tiny["loss"]) and np.isfinite(out["mask_logits"]).all()
  np.testing.assert_array_equal(out["class_logits"][..., 4], classifier.PAD_LOGIT)
  probs = jax.nn.softmax(out["class_logits"], -1)
  np.testing.assert_array_equal(probs[..., 4], 0.0)  # padded class: prob 0
  grads = nn.meta.unbox(tiny["grads"])
  for module in ("backbone", "pixel_decoder", "decoder"):
    leaves = jax.tree.leaves(grads[module])
    assert all(np.isfinite(g).all() for g in leaves), module
    assert sum(float(np.abs(g).sum()) for g in leaves) > 0, module
  cls_grads = grads["decoder"]["head"]["classifier"]
  assert float(np.abs(cls_grads["log_logit_scale"])) > 0
  assert float(np.abs(cls_grads["background"]).sum()) > 0


def test_vocabulary_change_needs_no_new_params(tiny):
  model, variables, out5 = tiny["model"], tiny["variables"], tiny["out"]
  images, text, valid = tiny["inputs"]
  # A different, larger vocabulary, per example [B, V, D], sharing class 2.
  rng = np.random.default_rng(9)
  text9 = rng.normal(size=(2, 9, TEXT_DIM)).astype(np.float32)
  text9[:, 6] = np.asarray(text[2])
  valid9 = np.ones((2, 9), bool)
  valid9[1, 7:] = False
  out9 = jax.jit(model.apply)(variables, images, jnp.asarray(text9), jnp.asarray(valid9))
  assert out9["class_logits"].shape == (2, 2, 4, 10)
  np.testing.assert_allclose(
    out9["class_logits"][..., 6], out5["class_logits"][..., 2], rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(
    out9["class_logits"][..., -1],  # background
    out5["class_logits"][..., -1],
    rtol=1e-4,
    atol=1e-4,
  )
  np.testing.assert_allclose(out9["mask_logits"], out5["mask_logits"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out9["class_logits"][:, 1, :, 7:9], classifier.PAD_LOGIT)
  shapes9 = jax.eval_shape(
    model.init, jax.random.key(0), images, jnp.asarray(text9), jnp.asarray(valid9)
  )
  assert jax.tree.map(lambda x: x.shape, nn.meta.unbox(shapes9)) == jax.tree.map(
    lambda x: x.shape, variables
  )


def test_bfloat16_matches_float32(tiny):
  """bf16 compute with the same fp32 params, against the fp32 outputs.

  Tolerances: bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2%) and
  the error compounds through ~40 layers of a randomly initialised net, so mask
  logits must agree to 2% of their spread on average and 25% at worst, class
  probabilities to 0.05.
  """
  c16 = copy.deepcopy(tiny["config"])
  c16.dtype = "bfloat16"
  assert c16.backbone.dtype == "bfloat16"  # the reference follows
  out32 = tiny["out"]
  out16 = jax.jit(dataseg_model.build_model(c16).apply)(tiny["variables"], *tiny["inputs"])
  assert out16["mask_logits"].dtype == jnp.float32
  m32, m16 = np.asarray(out32["mask_logits"]), np.asarray(out16["mask_logits"])
  err = np.abs(m16 - m32) / m32.std()
  print("bf16 mask-logit error / std: mean", err.mean(), "max", err.max())
  assert err.mean() <= 0.02 and err.max() <= 0.25
  p32 = jax.nn.softmax(out32["class_logits"], -1)
  p16 = jax.nn.softmax(out16["class_logits"], -1)
  print("bf16 max class-prob error", np.abs(np.asarray(p16 - p32)).max())
  assert np.abs(np.asarray(p16 - p32)).max() <= 0.05


def test_classifier_matches_numpy_and_clips_scale():
  rng = np.random.default_rng(4)
  q = rng.normal(size=(2, 3, 8)).astype(np.float32)
  text = rng.normal(size=(4, 6)).astype(np.float32)
  valid = np.array([True, True, False, True])
  clf = classifier.TextClassifier(text_dim=6)
  params = nn.meta.unbox(clf.init(jax.random.key(0), q, text, valid)["params"])
  assert np.isclose(params["log_logit_scale"], math.log(1 / 0.07))
  got = np.asarray(clf.apply({"params": params}, q, text, valid))

  def ref(log_scale):
    e = q @ np.asarray(params["proj"]["kernel"]) + np.asarray(params["proj"]["bias"])
    e /= np.linalg.norm(e, axis=-1, keepdims=True)
    t = np.concatenate([text, np.asarray(params["background"])[None]], 0)
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    out = min(np.exp(log_scale), 100.0) * e @ t.T
    out[..., 2] = -1e9
    return out

  np.testing.assert_allclose(got, ref(math.log(1 / 0.07)), rtol=1e-4, atol=1e-4)
  params["log_logit_scale"] = jnp.asarray(math.log(500.0))
  got = np.asarray(clf.apply({"params": params}, q, text, valid))
  np.testing.assert_allclose(got, ref(math.log(500.0)), rtol=1e-4, atol=1e-4)
  assert np.abs(got[..., [0, 1, 3, 4]]).max() <= 100.0 + 1e-3


def test_configs():
  with pytest.raises(ValueError, match="r50.*vitdet_b.*tiny"):
    configs.model_config("r51")
  for name in configs.NAMES:
    c = configs.model_config(name)
    assert c.dtype == "float32" and c.backbone.dtype == "float32"
  c = configs.model_config("r50")
  assert (
    c.decoder.num_queries,
    c.decoder.layers,
    c.pixel_decoder.layers,
    c.classifier.text_dim,
  ) == (100, 9, 6, 512)
  c.classifier.text_dim = 384  # MiniLM
  c.remat = True
  assert c.backbone.remat


def _mask2former_r50_params(num_classes=133):
  """Mask2Former-R50 (COCO panoptic), counted from its modules' shapes
  (detectron2 FrozenBN stats are buffers, not parameters)."""
  conv = lambda i, o, k=1, bias=False: i * o * k * k + (o if bias else 0)
  lin = lambda i, o: i * o + o
  # torchvision/detectron2 ResNet-50 convolutions.
  backbone, cin = conv(3, 64, 7), 64
  for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
    for b in range(blocks):
      backbone += conv(cin, width) + conv(width, width, 3) + conv(width, 4 * width)
      if b == 0:
        backbone += conv(cin, 4 * width)
      cin = 4 * width
  d, gn = 256, 2 * 256
  msda = lin(d, 8 * 3 * 4 * 2) + lin(d, 8 * 3 * 4) + 2 * lin(d, d)
  enc_layer = msda + lin(d, 1024) + lin(1024, d) + 2 * gn
  pixel = (
    sum(conv(c, d, 1, True) + gn for c in (512, 1024, 2048))
    + 3 * d
    + 6 * enc_layer
    + conv(256, d)
    + gn
    + conv(d, d, 3)
    + gn
    + conv(d, d, 1, True)
  )
  mha = 3 * lin(d, d) + lin(d, d)
  dec_layer = 2 * (mha + gn) + lin(d, 2048) + lin(2048, d) + gn
  decoder = 9 * dec_layer + 2 * 100 * d + 3 * d + gn + lin(d, num_classes + 1) + 3 * lin(d, d)
  return backbone, pixel, decoder


def test_r50_parameter_count_matches_mask2former():
  c = configs.model_config("r50")
  s = summary.summarize(c, resolution=256, vocab=133, flops=False)
  backbone, pixel, decoder = _mask2former_r50_params()
  total = backbone + pixel + decoder
  assert abs(total - 43.97e6) / 43.97e6 < 0.005  # the reference is right
  # Same backbone and pixel decoder; the decoder differs only by the classifier:
  # Dense(256 -> 512) + background (512) + logit scale vs Linear(256 -> 134).
  assert s["params"]["backbone"] == backbone
  assert s["params"]["pixel_decoder"] == pixel
  assert s["params"]["decoder"] - decoder == (256 * 512 + 512 + 512 + 1) - (256 * 134 + 134)
  assert abs(s["total_params"] - total) / total < 0.02
  assert s["non_trainable"] == 4 * 26560  # frozen BN: scale, bias, mean, var


def test_summary_counts_and_flops():
  c = _tiny_config("vitdet", "fpn")
  c.backbone.depth = 1
  c.decoder.layers = 1
  s = summary.summarize(c, resolution=64, vocab=5)
  model = dataseg_model.build_model(c)
  images, text, valid = _inputs(b=1)
  params = _fast_init(model, images, text, valid)["params"]
  assert s["total_params"] == sum(x.size for x in jax.tree.leaves(params))
  for k in ("backbone", "pixel_decoder", "decoder"):
    assert s["params"][k] == sum(x.size for x in jax.tree.leaves(params[k]))
  # The patch embedding alone is 2 * (4*4 patches) * (16*16*3) * 32 FLOPs.
  assert s["gflops"] * 1e9 > 2 * 16 * 16 * 16 * 3 * 32
  assert s["gmacs"] == s["gflops"] / 2
