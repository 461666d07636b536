"""Backbones: shapes per stride, jit/grad, frozen BN, bf16, logical axes, remat."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dataseg.model import backbone as bb
from dataseg.model import configs

IMG = 64  # Multiple of 32: strides 4..32 give 16, 8, 4, 2.
TINY_VIT = dict(
  name="vitdet",
  patch=16,
  width=64,
  depth=2,
  heads=4,
  mlp=128,
  window=3,
  global_blocks=(1,),
  pretrain_grid=2,
  out_dim=32,
)
# window=3 on a 4x4 grid exercises the padding path; pretrain_grid=2 the resize.

CASES = {
  "r18_frozen": (dict(name="resnet", depth=18, norm="frozen_bn"), (64, 128, 256, 512)),
  "r18_gn": (dict(name="resnet", depth=18, norm="gn"), (64, 128, 256, 512)),
  "r50_frozen": (dict(name="resnet", depth=50, norm="frozen_bn"), (256, 512, 1024, 2048)),
  "r50_gn": (dict(name="resnet", depth=50, norm="gn"), (256, 512, 1024, 2048)),
  "vitdet_tiny": (TINY_VIT, (32,) * 4),
}


def _build(cfg, **over):
  return bb.build_backbone(ml_collections.ConfigDict({**cfg, **over}))


def _images(b=2, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, IMG, IMG, 3))


def random_variables(model, x, seed=0):
  """Boxed variables filled on the host with fan-in-scaled random values.

  Faster than `model.init` on CPU (no random-number program to compile), and
  frozen-BN statistics that are not the identity.
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "'var'" in name:
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    if "'scale'" in name:
      return rng.uniform(0.8, 1.2, s.shape).astype(np.float32)
    std = 0.02 if s.ndim < 2 else 1 / np.sqrt(np.prod(s.shape[:-1]))
    if "pos_embed" in name:
      std = 0.5
    return rng.normal(0, std, s.shape).astype(np.float32)

  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  return jax.tree_util.tree_map_with_path(fill, shapes)


_CACHE = {}


def inited(case):
  """(model, boxed variables, jitted fp32 forward) per case, shared by tests."""
  if case not in _CACHE:
    model = _build(CASES[case][0])
    _CACHE[case] = (model, random_variables(model, _images(1)), jax.jit(model.apply))
  return _CACHE[case]


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_shapes_per_stride(case):
  cfg, channels = CASES[case]
  model = _build(cfg)
  x = jax.ShapeDtypeStruct((2, IMG, IMG, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  out = jax.eval_shape(model.apply, variables, x)
  assert sorted(out) == ["stride16", "stride32", "stride4", "stride8"]
  for i, c in enumerate(channels):
    s = 4 * 2**i
    assert out[f"stride{s}"].shape == (2, IMG // s, IMG // s, c), (case, s)


@pytest.mark.parametrize("case,remat", [("r18_frozen", True), ("vitdet_tiny", False)])
def test_jit_grad_and_remat(case, remat):
  """Gradients reach every parameter; nn.remat changes no value or gradient.

  (One remat comparison: compiling both programs twice costs too much CPU.)
  """
  model, variables, _ = inited(case)
  model_r = _build(CASES[case][0], remat=True)
  assert jax.tree.map(
    jnp.shape, jax.eval_shape(model_r.init, jax.random.PRNGKey(0), _images(1))
  ) == jax.tree.map(jnp.shape, variables)
  variables = nn.unbox(variables)
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss(m, p, x):
    out = m.apply({"params": p, **rest}, x, train=True)
    return sum(jnp.mean(v**2) for v in out.values())

  @jax.jit
  def both(p, x):
    return (
      jax.value_and_grad(lambda p: loss(model, p, x))(p),
      jax.grad(lambda p: loss(model_r if remat else model, p, x))(p),
    )

  # Gradients are checked for correctness, not speed: skip XLA's slow passes.
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    (value, grads), grads_r = both(variables["params"], _images())
  finally:
    jax.config.update("jax_disable_most_optimizations", False)
  assert np.isfinite(value) and value > 0
  for (path, g), g_r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_r)):
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), name
    assert np.any(g != 0), f"no gradient reaches {name}"
    np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-5 * np.abs(g).max(), err_msg=name)


def test_frozen_bn_lives_outside_params():
  model = _build(CASES["r18_frozen"][0])
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), _images(1))
  assert set(variables) == {"params", bb.FROZEN_COLLECTION}
  param_names = {
    "/".join(map(str, p))
    for p, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(variables["params"]))
  }
  assert not [n for n in param_names if "bn" in n], "BN vectors in params"
  frozen = nn.unbox(variables[bb.FROZEN_COLLECTION])
  # Stem + 8 blocks x 2 norms + 3 downsample norms, 4 vectors each.
  assert len(frozen) == 1 + 8
  n_bn = sum(len(v) if "layer" in k else 1 for k, v in frozen.items())
  assert n_bn == 1 + 16 + 3
  for vecs in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, dict) and "mean" in x):
    assert set(vecs) == {"scale", "bias", "mean", "var"}


def test_frozen_bn_is_the_inference_formula():
  rng = np.random.default_rng(0)
  c = 8
  stats = dict(
    scale=rng.uniform(0.5, 2, c),
    bias=rng.normal(size=c),
    mean=rng.normal(size=c),
    var=rng.uniform(0.5, 2, c),
  )
  x = rng.normal(size=(2, 3, 3, c))
  out = bb.FrozenBatchNorm().apply(
    {bb.FROZEN_COLLECTION: {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}},
    jnp.asarray(x),
  )
  want = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * stats["scale"] + stats["bias"]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["r18_frozen", "r18_gn", "vitdet_tiny"])
def test_no_batch_statistics(case):
  """An image's features do not depend on its batch-mates: safe under sharding."""
  _, variables, forward = inited(case)
  x = _images(3)
  a = forward(variables, x[:2])
  b = forward(variables, x[::2])
  for k in a:
    np.testing.assert_allclose(a[k][0], b[k][0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[k][1], b[k][1])


# bf16 compute with fp32 params: error relative to each output's RMS.
BF16_RTOL = 0.03  # Measured ~0.6-1.2% (R18 frozen/GN, tiny ViTDet, 64px).


@pytest.mark.parametrize("case", ["r18_frozen", "r18_gn", "vitdet_tiny"])
def test_bf16_matches_fp32(case):
  model, variables, forward = inited(case)
  model16 = _build(CASES[case][0], dtype="bfloat16")
  x = _images(2)
  out32 = forward(variables, x)
  out16 = jax.jit(model16.apply)(variables, x)
  for k in out32:
    assert out16[k].dtype == jnp.bfloat16
    a, b = np.asarray(out16[k], np.float32), np.asarray(out32[k])
    rel = np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2))
    assert rel < BF16_RTOL, (k, rel)
  for leaf in jax.tree.leaves(jax.eval_shape(model16.init, jax.random.PRNGKey(0), x)):
    assert leaf.dtype == jnp.float32


@pytest.mark.parametrize("case", ["r18_gn", "vitdet_tiny"])
def test_logical_axes_map_to_a_mesh(case):
  _, variables, _ = inited(case)
  for path, leaf in jax.tree_util.tree_leaves_with_path(
    variables, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  ):
    assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == leaf.value.ndim
    assert set(leaf.names) <= set(bb.LOGICAL_AXES), leaf.names
  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  rules = (("mlp", "model"), ("heads_kv", "model"), ("conv_out", "model"))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, rules)
  specs = [s.spec for s in jax.tree.leaves(shardings)]
  assert any("model" in tuple(s) for s in specs)
  placed = jax.device_put(nn.unbox(variables), shardings)
  assert jax.tree.structure(placed) == jax.tree.structure(nn.unbox(variables))


def test_window_partition_roundtrip_and_padding():
  x = jnp.arange(2 * 5 * 7 * 3, dtype=jnp.float32).reshape(2, 5, 7, 3)
  w = bb.window_partition(x, 3)
  assert w.shape == (2 * 2 * 3, 9, 3)
  # Second window of the first image covers rows 0..2, columns 3..5.
  np.testing.assert_array_equal(w[1].reshape(3, 3, 3), x[0, 0:3, 3:6])
  # Last window of the first image: rows 3..4 (+1 pad), column 6 (+2 pad).
  last = w[5].reshape(3, 3, 3)
  np.testing.assert_array_equal(last[:2, :1], x[0, 3:5, 6:7])
  assert not np.any(last[2]) and not np.any(last[:, 1:])
  np.testing.assert_array_equal(bb.window_unpartition(w, 3, (5, 7), 2), x)


def test_window_covering_the_grid_is_global_attention():
  block = lambda window: bb.ViTBlock(width=32, heads=4, mlp=64, window=window)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 32))
  params = nn.unbox(random_variables(block(0), x))
  windowed, full = jax.jit(lambda p, x: (block(4).apply(p, x), block(0).apply(p, x)))(params, x)
  np.testing.assert_allclose(windowed, full, rtol=1e-5, atol=1e-5)


def test_build_backbone_rejects_unknown():
  with pytest.raises(ValueError, match="allowed.*resnet.*vitdet"):
    _build(dict(name="swin"))
  with pytest.raises(ValueError, match="depht"):
    _build(dict(name="resnet", depht=50))
  with pytest.raises(ValueError, match="frozen_bn"):
    jax.eval_shape(
      _build(dict(name="resnet", depth=18, norm="bn")).init, jax.random.PRNGKey(0), _images(1)
    )


def test_default_configs_parameter_counts():
  """The paper models' backbones.

  R50 without fc: torchvision's 23,508,032 (conv params + BN scale/bias).
  """
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  v = nn.unbox(
    jax.eval_shape(
      bb.build_backbone(configs.model_config("r50").backbone).init, jax.random.PRNGKey(0), x
    )
  )
  bn_affine = count(v[bb.FROZEN_COLLECTION]) // 2  # scale + bias of 4 vectors.
  assert count(v["params"]) + bn_affine == 23_508_032
  v = nn.unbox(
    jax.eval_shape(
      bb.build_backbone(configs.model_config("vitdet_b").backbone).init, jax.random.PRNGKey(0), x
    )
  )
  vit = {k: p for k, p in v["params"].items() if not k.startswith("simfp")}
  # timm vit_base_patch16_224 without head: 86,567,656 - 769,000; then minus
  # cls token (768), its position entry (768) and the final norm (1,536).
  assert count(vit) == 86_567_656 - 769_000 - 768 - 768 - 1_536


def test_vitdet_l_encoder_is_vit_l16():
  """model_config('vitdet_l')'s ViT: timm vit_large_patch16_224 (304,326,632 params)
  without its head (1,025,000), cls token and its position entry (1,024 each) and
  final norm (2,048) = 303,297,536, within 0.3% of the ~304M quoted for ViT-L in
  ViTDet's comparisons; the simple pyramid comes on top."""
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
  cfg = configs.model_config("vitdet_l").backbone
  assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp, cfg.window, tuple(cfg.global_blocks)) == (
    1024,
    24,
    16,
    4096,
    14,
    (5, 11, 17, 23),
  )
  v = nn.unbox(
    jax.eval_shape(
      bb.build_backbone(cfg).init,
      jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
    )
  )
  vit = {k: p for k, p in v["params"].items() if not k.startswith("simfp")}
  assert count(vit) == 304_326_632 - 1_025_000 - 1_024 - 1_024 - 2_048
  assert abs(count(vit) / 304e6 - 1) < 0.02
