"""Pre-trained weight import: name tables checked on checkpoints the test writes.

Each test writes a checkpoint in the original naming (random arrays of the real
shapes), converts it, and checks (a) every tensor landed where an independent
rule in this file says it should, and (b) a numpy re-implementation on the
original arrays computes what the Flax model computes after the import.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy
from scipy import special

from dataseg.model import backbone as bb
from dataseg.model import weights

IMG = 64


# ------------------------------------------------------------- numpy reference


def np_conv(x, w, stride=1, pad=0, b=None):
  """x [H, W, I], torch weight w [O, I, kh, kw] -> [H', W', O] (float64)."""
  x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  kh, kw = w.shape[2:]
  win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(0, 1))
  y = np.einsum("hwcij,ocij->hwo", win[::stride, ::stride], w)
  return y if b is None else y + b


def np_bn(x, state, name, eps=1e-5):
  g = lambda k: state[f"{name}.{k}"]
  return (x - g("running_mean")) / np.sqrt(g("running_var") + eps) * g("weight") + g("bias")


def np_maxpool(x, k=3, stride=2, pad=1):
  x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
  win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(0, 1))
  return win[::stride, ::stride].max(axis=(-2, -1))


def np_resnet18(x, s):
  """torchvision resnet18 forward (eval mode) on a torch state dict."""
  relu = lambda v: np.maximum(v, 0)
  x = np_maxpool(relu(np_bn(np_conv(x, s["conv1.weight"], 2, 3), s, "bn1")))
  stem, out = x, {}
  for layer in range(1, 5):
    for b in range(2):
      t = f"layer{layer}.{b}"
      stride = 2 if (layer > 1 and b == 0) else 1
      y = relu(np_bn(np_conv(x, s[f"{t}.conv1.weight"], stride, 1), s, f"{t}.bn1"))
      y = np_bn(np_conv(y, s[f"{t}.conv2.weight"], 1, 1), s, f"{t}.bn2")
      if f"{t}.downsample.0.weight" in s:
        x = np_bn(np_conv(x, s[f"{t}.downsample.0.weight"], stride), s, f"{t}.downsample.1")
      x = relu(x + y)
    out[f"stride{2 ** (layer + 1)}"] = x
  return stem, out


def np_layer_norm(x, w, b, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def np_vit_block(x, s, i, heads, window):
  """MAE/timm block on a [gh, gw, C] grid; ViTDet windows (zero pad) if > 0."""
  t = lambda k: s[f"blocks.{i}.{k}"]
  gh, gw, c = x.shape
  y = np_layer_norm(x, t("norm1.weight"), t("norm1.bias"))
  if window:
    ph, pw = -gh % window, -gw % window
    y = np.pad(y, ((0, ph), (0, pw), (0, 0)))
    nh, nw = y.shape[0] // window, y.shape[1] // window
    groups = [
      y[r * window : (r + 1) * window, q * window : (q + 1) * window].reshape(-1, c)
      for r in range(nh)
      for q in range(nw)
    ]
  else:
    groups = [y.reshape(-1, c)]
  outs = []
  for g in groups:
    qkv = g @ t("attn.qkv.weight").T + t("attn.qkv.bias")
    q, k, v = np.split(qkv, 3, axis=-1)
    hd = c // heads
    o = np.zeros_like(q)
    for h in range(heads):
      sl = slice(h * hd, (h + 1) * hd)
      a = q[:, sl] @ k[:, sl].T / np.sqrt(hd)
      a = np.exp(a - a.max(-1, keepdims=True))
      o[:, sl] = (a / a.sum(-1, keepdims=True)) @ v[:, sl]
    outs.append(o @ t("attn.proj.weight").T + t("attn.proj.bias"))
  if window:
    y = np.zeros((nh * window, nw * window, c))
    for n, o in enumerate(outs):
      r, q = divmod(n, nw)
      y[r * window : (r + 1) * window, q * window : (q + 1) * window] = o.reshape(window, window, c)
    y = y[:gh, :gw]
  else:
    y = outs[0].reshape(gh, gw, c)
  x = x + y
  y = np_layer_norm(x, t("norm2.weight"), t("norm2.bias"))
  y = y @ t("mlp.fc1.weight").T + t("mlp.fc1.bias")
  y = 0.5 * y * (1 + special.erf(y / np.sqrt(2)))  # exact GELU, as timm.
  return x + y @ t("mlp.fc2.weight").T + t("mlp.fc2.bias")


# ------------------------------------------------------ checkpoints in naming


def torchvision_resnet_state(depth, seed=0, width=64):
  """Random torchvision `resnet{depth}` state dict (eval statistics included);
  `width` < 64 gives the same names at small sizes (fast full-model tests)."""
  rng = np.random.default_rng(seed)
  bottleneck = depth >= 50
  layers = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth]
  s = {}

  def conv(name, o, i, k):
    s[f"{name}.weight"] = rng.normal(0, np.sqrt(2 / (i * k * k)), (o, i, k, k)).astype(np.float32)

  def bn(name, c):
    s[f"{name}.weight"] = rng.uniform(0.5, 1.0, c).astype(np.float32)
    s[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    s[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    s[f"{name}.running_var"] = rng.uniform(0.5, 2, c).astype(np.float32)
    s[f"{name}.num_batches_tracked"] = np.array(7, np.int64)

  conv("conv1", width, 3, 7)
  bn("bn1", width)
  inplanes = width
  for li, n in enumerate(layers):
    planes = width * 2**li
    out = planes * (4 if bottleneck else 1)
    for b in range(n):
      t = f"layer{li + 1}.{b}"
      if bottleneck:
        conv(f"{t}.conv1", planes, inplanes, 1)
        conv(f"{t}.conv2", planes, planes, 3)
        conv(f"{t}.conv3", out, planes, 1)
        for k, c in ((1, planes), (2, planes), (3, out)):
          bn(f"{t}.bn{k}", c)
      else:
        conv(f"{t}.conv1", planes, inplanes, 3)
        conv(f"{t}.conv2", planes, planes, 3)
        bn(f"{t}.bn1", planes)
        bn(f"{t}.bn2", planes)
      if b == 0 and (li > 0 or inplanes != out):
        conv(f"{t}.downsample.0", out, inplanes, 1)
        bn(f"{t}.downsample.1", out)
      inplanes = out
  s["fc.weight"] = rng.normal(0, 0.01, (1000, inplanes)).astype(np.float32)
  s["fc.bias"] = np.zeros(1000, np.float32)
  return s


def expected_resnet_location(key):
  """Independent rule: torchvision key -> (collection, flax path, transform)."""
  m = re.fullmatch(
    r"(?:layer(\d)\.(\d+)\.)?(conv\d|bn\d|downsample\.[01])\."
    r"(weight|bias|running_mean|running_var)",
    key,
  )
  assert m, key
  layer, block, mod, leaf = m.groups()
  mod = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(mod, mod)
  prefix = (f"layer{layer}_{block}",) if layer else ()
  if "conv" in mod:
    return "params", prefix + (mod, "kernel"), lambda w: w.transpose(2, 3, 1, 0)
  leaf = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}[leaf]
  return bb.FROZEN_COLLECTION, prefix + (mod, leaf), lambda w: w


def get_path(tree, path):
  for p in path:
    tree = tree[p]
  return np.asarray(tree)


TINY = dict(patch=16, width=64, depth=2, heads=4, mlp=128)


def mae_state(seed=0, grid=IMG // 16, **kw):
  """Random MAE-pretrain / timm ViT state dict (with cls, norm, decoder keys)."""
  cfg = {**TINY, **kw}
  rng = np.random.default_rng(seed)
  c, p = cfg["width"], cfg["patch"]
  r = lambda *shape, std=0.1: rng.normal(0, std, shape).astype(np.float32)
  s = {
    "patch_embed.proj.weight": r(c, 3, p, p, std=0.05),
    "patch_embed.proj.bias": r(c),
    "pos_embed": r(1, 1 + grid * grid, c, std=0.5),
    "cls_token": r(1, 1, c),
    "mask_token": r(1, 1, c),
    "norm.weight": r(c),
    "norm.bias": r(c),
    "decoder_embed.weight": r(32, c),
    "decoder_pred.bias": r(8),
  }
  for i in range(cfg["depth"]):
    t = f"blocks.{i}"
    s.update(
      {
        f"{t}.norm1.weight": 1 + r(c),
        f"{t}.norm1.bias": r(c),
        f"{t}.attn.qkv.weight": r(3 * c, c, std=0.2),
        f"{t}.attn.qkv.bias": r(3 * c),
        f"{t}.attn.proj.weight": r(c, c),
        f"{t}.attn.proj.bias": r(c),
        f"{t}.norm2.weight": 1 + r(c),
        f"{t}.norm2.bias": r(c),
        f"{t}.mlp.fc1.weight": r(cfg["mlp"], c),
        f"{t}.mlp.fc1.bias": r(cfg["mlp"]),
        f"{t}.mlp.fc2.weight": r(c, cfg["mlp"]),
        f"{t}.mlp.fc2.bias": r(c),
      }
    )
  return s


def big_vision_state(mae, heads):
  """The same weights in big_vision's ViT naming (written independently)."""
  c = mae["patch_embed.proj.weight"].shape[0]
  hd = c // heads
  s = {
    "embedding/kernel": mae["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
    "embedding/bias": mae["patch_embed.proj.bias"],
    "pos_embedding": mae["pos_embed"][:, 1:],  # big_vision: no cls entry.
    "cls": mae["cls_token"],
    "head/kernel": np.zeros((c, 10), np.float32),
    "Transformer/encoder_norm/scale": mae["norm.weight"],
  }
  depth = 1 + max(int(k.split(".")[1]) for k in mae if k.startswith("blocks."))
  for i in range(depth):
    m = lambda k: mae[f"blocks.{i}.{k}"]
    t = f"Transformer/encoderblock_{i}"
    a = f"{t}/MultiHeadDotProductAttention_0"
    w_q, w_k, w_v = np.split(m("attn.qkv.weight"), 3, axis=0)  # [C_out, C_in]
    b_q, b_k, b_v = np.split(m("attn.qkv.bias"), 3)
    for n, w, b in (("query", w_q, b_q), ("key", w_k, b_k), ("value", w_v, b_v)):
      s[f"{a}/{n}/kernel"] = w.T.reshape(c, heads, hd)
      s[f"{a}/{n}/bias"] = b.reshape(heads, hd)
    s[f"{a}/out/kernel"] = m("attn.proj.weight").T.reshape(heads, hd, c)
    s[f"{a}/out/bias"] = m("attn.proj.bias")
    s[f"{t}/LayerNorm_0/scale"], s[f"{t}/LayerNorm_0/bias"] = (m("norm1.weight"), m("norm1.bias"))
    s[f"{t}/LayerNorm_1/scale"], s[f"{t}/LayerNorm_1/bias"] = (m("norm2.weight"), m("norm2.bias"))
    s[f"{t}/MlpBlock_0/Dense_0/kernel"] = m("mlp.fc1.weight").T
    s[f"{t}/MlpBlock_0/Dense_0/bias"] = m("mlp.fc1.bias")
    s[f"{t}/MlpBlock_0/Dense_1/kernel"] = m("mlp.fc2.weight").T
    s[f"{t}/MlpBlock_0/Dense_1/bias"] = m("mlp.fc2.bias")
  return s


def _images(b=1, seed=0):
  return np.random.default_rng(seed).normal(size=(b, IMG, IMG, 3)).astype(np.float32)


# ------------------------------------------------------------------ ResNet


def test_resnet50_table_covers_torchvision_and_model(tmp_path):
  state = torchvision_resnet_state(50)
  path = str(tmp_path / "r50.safetensors")
  st_numpy.save_file(state, path)
  loaded = weights.load_safetensors(path)
  params, frozen = weights.resnet_from_torchvision(loaded, depth=50)
  converted = {"params": params, bb.FROZEN_COLLECTION: frozen}
  n_leaves = len(jax.tree.leaves(converted))
  used = [k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
  assert n_leaves == len(used) == 53 + 53 * 4  # 53 convs, 53 BNs.
  for k in used:
    col, p, fn = expected_resnet_location(k)
    np.testing.assert_array_equal(get_path(converted[col], p), fn(state[k]), err_msg=k)
  # Exactly the model's tree: nothing missing, nothing unexpected.
  model = bb.ResNet(depth=50)
  init = jax.eval_shape(
    model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, IMG, IMG, 3), jnp.float32)
  )
  merged, report = weights.merge_pretrained(
    {k: {"backbone": v} for k, v in init.items()}, converted, "backbone", strict=True
  )
  assert not report.missing and not report.unexpected
  assert len(report.loaded) == n_leaves
  leaf = merged["params"]["backbone"]["layer3_2"]["conv2"]["kernel"]
  assert isinstance(leaf, nn.Partitioned)  # Logical axes survive the merge.
  np.testing.assert_array_equal(leaf.value, state["layer3.2.conv2.weight"].transpose(2, 3, 1, 0))


def test_resnet18_import_computes_torchvision_forward(tmp_path):
  state = torchvision_resnet_state(18, seed=1)
  path = str(tmp_path / "r18.safetensors")
  st_numpy.save_file(state, path)
  params, frozen = weights.resnet_from_torchvision(weights.load_safetensors(path), depth=18)
  model = bb.ResNet(depth=18)
  x = _images()
  init = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  variables, report = weights.merge_pretrained(
    init, {"params": params, bb.FROZEN_COLLECTION: frozen}, strict=True
  )
  out, inter = jax.jit(lambda v, x: model.apply(v, x, mutable="intermediates"))(variables, x)
  stem, want = np_resnet18(x[0].astype(np.float64), state)
  got_stem = inter["intermediates"]["stem"][0][0]
  np.testing.assert_allclose(got_stem, stem, rtol=1e-4, atol=1e-4 * np.abs(stem).max())
  for k, v in want.items():
    np.testing.assert_allclose(out[k][0], v, rtol=1e-4, atol=1e-4 * np.abs(v).max(), err_msg=k)


def test_missing_and_unexpected_keys():
  state = torchvision_resnet_state(18)
  del state["layer2.1.bn2.running_var"]
  state["layer5.0.conv1.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(KeyError, match=r"layer2\.1\.bn2\.running_var"):
    weights.resnet_from_torchvision(state, depth=18)
  _, report = weights.convert(
    state, weights.resnet_name_table(18), weights.RESNET_DROP, allow_missing=True
  )
  assert report.missing == ["layer2.1.bn2.running_var"]
  assert report.unexpected == ["layer5.0.conv1.weight"]
  assert "fc.weight" in report.dropped
  params, frozen = weights.resnet_from_torchvision(state, depth=18, allow_missing=True)
  assert "var" not in frozen["layer2_1"]["bn2"]
  init = {"params": {"conv1": {"kernel": np.zeros((7, 7, 3, 32))}}}
  with pytest.raises(ValueError, match="conv1/kernel"):
    weights.merge_pretrained(init, {"params": params})


@pytest.mark.parametrize("module_prefix", [False, True])
def test_torch_reference_resnet(module_prefix):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  tm = torchvision.models.resnet50().eval()
  state = {
    (("module." if module_prefix else "") + k): v.numpy() for k, v in tm.state_dict().items()
  }
  params, frozen = weights.resnet_from_torchvision(state, 50)
  x = _images()
  model = bb.ResNet(depth=50)
  variables, _ = weights.merge_pretrained(
    jax.eval_shape(model.init, jax.random.PRNGKey(0), x),
    {"params": params, bb.FROZEN_COLLECTION: frozen},
    strict=True,
  )
  out = model.apply(variables, x)
  with torch.no_grad():
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    t = tm.maxpool(tm.relu(tm.bn1(tm.conv1(t))))
    for i, layer in enumerate((tm.layer1, tm.layer2, tm.layer3, tm.layer4)):
      t = layer(t)
      want = t.numpy().transpose(0, 2, 3, 1)
      scale = np.abs(want).max()  # Random init: compare at unit scale.
      np.testing.assert_allclose(out[f"stride{4 * 2**i}"] / scale, want / scale, atol=1e-4)


# --------------------------------------------------------------------- ViT


def _vit_model(**kw):
  # window=3 on the 4x4 grid: block 0 is windowed with padding, block 1 global.
  return bb.ViTDet(
    **{**TINY, "window": 3, "global_blocks": (1,), "pretrain_grid": IMG // 16, "out_dim": 32, **kw}
  )


def _np_vit_trunk(x, s, heads, window, global_blocks):
  """Patch embedding + position + blocks, on the original arrays."""
  p = s["patch_embed.proj.weight"].shape[-1]
  t = np_conv(x, s["patch_embed.proj.weight"], p, 0, s["patch_embed.proj.bias"])
  grid = t.shape[0]
  t = t + s["pos_embed"][0, 1:].reshape(grid, grid, -1)
  outs = []
  depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
  for i in range(depth):
    t = np_vit_block(t, s, i, heads, 0 if i in global_blocks else window)
    outs.append(t)
  return outs


def test_vit_from_mae_computes_the_blocks():
  state = mae_state()
  params = weights.vit_from_mae({f"model.{k}": v for k, v in state.items()})
  np.testing.assert_array_equal(
    params["blocks_0"]["qkv"]["kernel"], state["blocks.0.attn.qkv.weight"].T
  )
  np.testing.assert_array_equal(
    params["patch_embed"]["kernel"], state["patch_embed.proj.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(params["pos_embed"].reshape(-1, 64), state["pos_embed"][0, 1:])
  model = _vit_model()
  x = _images()
  init = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
  variables, report = weights.merge_pretrained(init, {"params": params})
  assert not report.missing and not report.unexpected
  assert report.missing_by_design and all("/simfp_" in k for k in report.missing_by_design)
  _, inter = jax.jit(
    lambda v, x: model.apply(v, x, capture_intermediates=True, mutable="intermediates")
  )(variables, x)
  want = _np_vit_trunk(x[0].astype(np.float64), state, TINY["heads"], 3, (1,))
  for i, w in enumerate(want):
    got = inter["intermediates"][f"blocks_{i}"]["__call__"][0][0]
    np.testing.assert_allclose(
      got, w, rtol=1e-4, atol=1e-4 * np.abs(w).max(), err_msg=f"blocks_{i}"
    )


def test_vit_from_big_vision_npz_matches_mae(tmp_path):
  state = mae_state(seed=3)
  bv = big_vision_state(state, TINY["heads"])
  path = str(tmp_path / "vit.npz")
  np.savez(path, **bv)
  from_mae = weights.vit_from_mae(state)
  from_bv = weights.vit_from_big_vision_npz(path)
  assert jax.tree.structure(from_bv) == jax.tree.structure(from_mae)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), from_bv, from_mae)
  # Scanned layout (`encoderblock/...` with a leading depth axis), as big_vision
  # saves with scan=True, and a 'params/' prefix.
  scanned = {}
  for k, v in bv.items():
    m = re.match(r"Transformer/encoderblock_(\d+)/(.*)", k)
    if m:
      scanned.setdefault(f"Transformer/encoderblock/{m.group(2)}", []).append((int(m.group(1)), v))
    else:
      scanned[k] = v
  scanned = {
    f"params/{k}": (np.stack([a for _, a in sorted(v)]) if isinstance(v, list) else v)
    for k, v in scanned.items()
  }
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
    weights.vit_from_big_vision_npz(scanned),
    from_mae,
  )


def test_torch_bicubic_matrix_matches_torch():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(14, 14)).astype(np.float32)
  for n in (4, 20, 64):
    want = torch.nn.functional.interpolate(
      torch.from_numpy(x)[None, None], size=(n, n), mode="bicubic", align_corners=False
    )[0, 0].numpy()
    m = bb.torch_bicubic_matrix(14, n)
    np.testing.assert_allclose(m @ x @ m.T, want, atol=1e-5)


def test_torch_reference_timm_vit():
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  tm = timm.models.vision_transformer.VisionTransformer(
    img_size=IMG,
    patch_size=16,
    embed_dim=64,
    depth=2,
    num_heads=4,
    mlp_ratio=2.0,
    class_token=False,
    global_pool="avg",
  ).eval()
  params = weights.vit_from_mae({k: v.numpy() for k, v in tm.state_dict().items()})
  model = _vit_model(window=0, global_blocks=(0, 1))
  x = _images()
  variables, _ = weights.merge_pretrained(
    jax.eval_shape(model.init, jax.random.PRNGKey(0), x), {"params": params}
  )
  variables = jax.tree.map(
    lambda s: s if isinstance(s, np.ndarray) else np.zeros(s.shape, s.dtype), variables
  )
  _, inter = model.apply(variables, x, capture_intermediates=True, mutable="intermediates")
  with torch.no_grad():
    t = tm.blocks(
      tm._pos_embed(tm.patch_embed(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))))
    )
  got = inter["intermediates"]["blocks_1"]["__call__"][0]
  np.testing.assert_allclose(got.reshape(t.shape), t.numpy(), atol=1e-4)


# ------------------------------- converted files, the config key, the trainer hook
#
# Tolerances of the output comparisons: float32 model vs float64 numpy on random
# weights; rtol 1e-4 with atol 1e-4 x the output's max absolute value, as above
# (float32 rounding through ~50 convolutions stays orders of magnitude below).

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import os  # pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import subprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position

from dataseg.model import configs as model_configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from dataseg.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]


def np_resnet50(x, s):
  """torchvision resnet50 (v1.5: stride on the 3x3 conv) forward, eval mode."""
  relu = lambda v: np.maximum(v, 0)
  x = np_maxpool(relu(np_bn(np_conv(x, s["conv1.weight"], 2, 3), s, "bn1")))
  out = {}
  for layer, n in enumerate((3, 4, 6, 3), start=1):
    for b in range(n):
      t = f"layer{layer}.{b}"
      stride = 2 if (layer > 1 and b == 0) else 1
      y = relu(np_bn(np_conv(x, s[f"{t}.conv1.weight"]), s, f"{t}.bn1"))
      y = relu(np_bn(np_conv(y, s[f"{t}.conv2.weight"], stride, 1), s, f"{t}.bn2"))
      y = np_bn(np_conv(y, s[f"{t}.conv3.weight"]), s, f"{t}.bn3")
      if f"{t}.downsample.0.weight" in s:
        x = np_bn(np_conv(x, s[f"{t}.downsample.0.weight"], stride), s, f"{t}.downsample.1")
      x = relu(x + y)
    out[f"stride{2 ** (layer + 1)}"] = x
  return out


def _close(got, want, msg=""):
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=msg)


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "dataseg.model.weights", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"),
  )


def _joint_r50_small(pretrained):
  """configs/joint_r50.py with the R50's names and structure at 1/8 width and a
  small head: the paper config's path through the trainer, in seconds."""
  from configs import joint_r50  # pylint: disable=g-import-not-at-top

  c = joint_r50.get_config("res=64,batch=1,fp32")
  c.model.backbone.width = 8
  c.model.pixel_decoder = model_configs.model_config("tiny").pixel_decoder
  c.model.decoder = model_configs.model_config("tiny").decoder
  c.model.decoder.num_queries = 4
  c.model.backbone.pretrained = pretrained
  return c


def _multipliers(s):
  """Backbone / head update ratio of the setup's optimizer on zero parameters (no
  weight decay term), unit gradients: Adam's first step is lr x sign for both."""
  params = {"backbone": {"b": np.zeros(3, np.float32)}, "head": {"b": np.zeros(3, np.float32)}}
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = s.tx.update(grads, s.tx.init(params), params)
  return float(updates["backbone"]["b"][0] / updates["head"]["b"][0])


def test_paper_config_missing_file_names_it_and_the_command():
  from configs import joint_r50  # pylint: disable=g-import-not-at-top

  c = joint_r50.get_config()
  want = model_configs.PRETRAINED["r50"]
  assert c.model.backbone.pretrained == want.file
  if os.path.exists(want.file):
    pytest.skip(f"{want.file} exists here")
  with pytest.raises(weights.MissingWeightsError) as e:
    weights.check_pretrained(c)
  msg = str(e.value)
  assert want.file in msg and want.url in msg
  assert (
    f"python -m dataseg.model.weights --from torchvision --input "
    f"{want.original} --output {want.file}"
  ) in msg


def test_joint_r50_through_trainer_missing_then_converted(tmp_path, capsys):
  """The trainer's path: a missing file stops init_state before it compiles; the
  file written by the conversion loads every backbone tensor into the trainer's
  state, the backbone then computes what torchvision's ResNet-50 computes on those
  weights, and the backbone lr multiplier is 0.1 only with weights."""
  from dataseg.train import trainer  # pylint: disable=g-import-not-at-top

  out = str(tmp_path / "r50_small.safetensors")
  s = trainer.setup(_joint_r50_small(out), 3, 8)
  with pytest.raises(
    weights.MissingWeightsError,
    match=r"r50_small\.safetensors' does not exist.*"
    r"python -m dataseg\.model\.weights --from torchvision",
  ):
    trainer.init_state(s)

  state_dict = torchvision_resnet_state(50, seed=4, width=8)
  src = str(tmp_path / "resnet50_small_original.safetensors")
  st_numpy.save_file(state_dict, src)
  _, arch, n = weights.convert_file("torchvision", src, out)  # the command's body.
  assert (arch, n) == ("resnet50", 265)

  # init_state = check (above) + jit(init_fn) + load_pretrained; the jit compiles the
  # whole model's init (minutes on a loaded 2-core machine), so the fresh state here
  # is zeros in the state's own shapes and shardings.
  fresh = jax.tree.map(
    lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), s.abstract_state
  )
  capsys.readouterr()
  state = weights.load_pretrained(s.config, fresh)
  log = capsys.readouterr().out
  assert (
    "loaded 265 of 265 backbone tensors (frozen 212, params 53): every backbone "
    "tensor; missing 0; unexpected 0" in log
  ), log
  assert "dropped at conversion by design (55)" in log  # fc.* + num_batches_tracked.
  model = bb.ResNet(depth=50, width=8)
  x = _images(seed=2)
  got = jax.jit(model.apply)(
    {
      "params": state["params"]["backbone"],
      bb.FROZEN_COLLECTION: state["frozen"][bb.FROZEN_COLLECTION]["backbone"],
    },
    x,
  )
  want = np_resnet50(x[0].astype(np.float64), state_dict)
  for k, v in want.items():
    _close(np.asarray(got[k][0]), v, k)

  assert _multipliers(s) == pytest.approx(0.1, rel=1e-5)
  scratch = trainer.setup(_joint_r50_small(""), 3, 8)
  assert _multipliers(scratch) == pytest.approx(1.0, rel=1e-5)


def _vit_config(path):
  return ml_collections.ConfigDict(
    {
      "model": {
        "backbone": {
          **TINY,
          "name": "vitdet",
          "window": 3,
          "global_blocks": (1,),
          "pretrain_grid": IMG // 16,
          "out_dim": 32,
          "pretrained": path,
        }
      },
      "optimizer": {"backbone_multiplier": 0.1},
    }
  )


def _vit_state(model, x):
  """A trainer-like state of jax arrays (random values of the init's shapes: no
  init compile), the ViT as 'backbone'."""
  rng = np.random.default_rng(0)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  fresh = lambda: jax.tree.map(
    lambda a: jax.device_put(rng.normal(size=a.shape).astype(a.dtype)),
    {"backbone": shapes["params"], "head": {"b": jax.ShapeDtypeStruct((3,), jnp.float32)}},
  )
  return {"params": fresh(), "frozen": {}, "ema": fresh()}


@jax.jit
def _vit_blocks(params, x):
  _, inter = _vit_model().apply(
    {"params": params}, x, capture_intermediates=True, mutable="intermediates"
  )
  return [inter["intermediates"][f"blocks_{i}"]["__call__"][0] for i in range(TINY["depth"])]


def _check_vit(model, x, state, mae, lines):
  del model  # _vit_blocks builds the same one inside jit.
  got = _vit_blocks(state["params"]["backbone"], x)
  want = _np_vit_trunk(x[0].astype(np.float64), mae, TINY["heads"], 3, (1,))
  for i, w in enumerate(want):
    _close(np.asarray(got[i][0]), w, f"blocks_{i}")
  text = "\n".join(lines)
  n = 3 + 12 * TINY["depth"]
  assert f"loaded {n} of " in text and "missing 0; unexpected 0" in text, text
  assert "fresh by design" in text and "simfp_" in text


def test_mae_layout_round_trip_file_and_config_key(tmp_path):
  mae = mae_state(seed=5)
  src = str(tmp_path / "mae_original.safetensors")  # MAE nests under 'model'.
  st_numpy.save_file({f"model.{k}": v for k, v in mae.items()}, src)
  out = str(tmp_path / "vit_mae.safetensors")
  report, arch, n = weights.convert_file("mae", src, out)
  assert arch == "vit width 64 depth 2" and n == 3 + 12 * TINY["depth"]
  assert report.reshaped == ["params/pos_embed: (1, 17, 64) -> (4, 4, 64)"]
  assert {"cls_token", "mask_token", "norm.weight", "decoder_embed.weight"} <= set(report.dropped)
  tensors, meta = weights.read_tensors(out)
  assert meta["format"] == weights.CONVERTED_FORMAT and meta["source"] == "mae"
  assert json.loads(meta["reshaped"]) == report.reshaped
  np.testing.assert_array_equal(
    tensors["params/blocks_1/fc1/kernel"], mae["blocks.1.mlp.fc1.weight"].T
  )

  model, x = _vit_model(), _images(seed=3)
  fresh = _vit_state(model, x)
  lines = []
  state = weights.load_pretrained(_vit_config(out), fresh, log=lines.append)
  _check_vit(model, x, state, mae, lines)
  leaf, old = (
    state["params"]["backbone"]["blocks_0"]["qkv"]["kernel"],
    fresh["params"]["backbone"]["blocks_0"]["qkv"]["kernel"],
  )
  assert isinstance(leaf, jax.Array) and leaf.sharding == old.sharding
  np.testing.assert_array_equal(state["ema"]["backbone"]["blocks_0"]["qkv"]["kernel"], leaf)
  assert state["ema"]["backbone"]["blocks_0"]["qkv"]["kernel"] is not leaf
  np.testing.assert_array_equal(  # The pyramid keeps its fresh initialisation.
    state["params"]["backbone"]["simfp_4"]["lateral"]["kernel"],
    fresh["params"]["backbone"]["simfp_4"]["lateral"]["kernel"],
  )


def test_timm_and_big_vision_layouts(tmp_path):
  mae = mae_state(seed=6)
  timm = dict(
    mae, **{"head.weight": np.zeros((10, 64), np.float32), "head.bias": np.zeros(10, np.float32)}
  )
  timm_file = str(tmp_path / "timm.safetensors")
  st_numpy.save_file(timm, timm_file)
  from_timm = str(tmp_path / "from_timm.safetensors")
  weights.convert_file("timm", timm_file, from_timm)

  npz = str(tmp_path / "big_vision.npz")
  np.savez(npz, **big_vision_state(mae, TINY["heads"]))
  from_bv = str(tmp_path / "from_bv.safetensors")
  report, _, _ = weights.convert_file("big_vision", npz, from_bv)
  assert any(r.startswith("params/blocks_0/qkv/kernel") for r in report.reshaped)
  a, b = weights.read_tensors(from_timm)[0], weights.read_tensors(from_bv)[0]
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-6, err_msg=k)

  # The .npz itself through the config key: converted in memory, no file written.
  model, x = _vit_model(), _images(seed=4)
  lines = []
  state = weights.load_pretrained(_vit_config(npz), _vit_state(model, x), log=lines.append)
  assert "from in memory" in lines[0]
  _check_vit(model, x, state, mae, lines)


def test_timm_resnet_and_layout_mismatch(tmp_path):
  src = str(tmp_path / "r18.safetensors")
  st_numpy.save_file(torchvision_resnet_state(18), src)
  _, arch, n = weights.convert_file("timm", src, str(tmp_path / "a.safetensors"))
  assert arch == "resnet18" and n == 20 + 20 * 4
  with pytest.raises(weights.PretrainedError, match="--from mae.*resnet"):
    weights.convert_file("mae", src, str(tmp_path / "b.safetensors"))


def test_errors_name_what_did_not_load(tmp_path):
  mae = mae_state(seed=7)
  src = str(tmp_path / "mae.safetensors")
  st_numpy.save_file(mae, src)
  out = str(tmp_path / "vit.safetensors")
  weights.convert_file("mae", src, out)
  tensors, meta = weights.read_tensors(out)
  model, x = _vit_model(), _images()
  fresh = _vit_state(model, x)

  def load_with(edit, name):
    t = dict(tensors)
    edit(t)
    path = str(tmp_path / name)
    st_numpy.save_file(t, path, metadata=meta)
    return weights.load_pretrained(_vit_config(path), fresh, log=lambda _: None)

  with pytest.raises(
    weights.PretrainedError,
    match=r"1 of the model's \d+ backbone tensors not in the file "
    r"\(params/backbone/blocks_1/norm2/bias\)",
  ):
    load_with(lambda t: t.pop("params/blocks_1/norm2/bias"), "missing.safetensors")
  with pytest.raises(
    weights.PretrainedError,
    match=r"1 tensors of the file not in the model "
    r"\(params/backbone/blocks_9/fc1/kernel\)",
  ):
    load_with(
      lambda t: t.update({"params/blocks_9/fc1/kernel": np.zeros(2, np.float32)}),
      "extra.safetensors",
    )

  small = str(tmp_path / "grid2.safetensors")
  weights.convert_file("mae", _save(tmp_path, mae_state(grid=2)), small)
  with pytest.raises(weights.PretrainedError, match="pretrain_grid"):
    weights.load_pretrained(_vit_config(small), fresh, log=lambda _: None)

  pth = str(tmp_path / "weights.pth")
  pathlib.Path(pth).write_bytes(b"not read")
  with pytest.raises(
    weights.PretrainedError,
    match=r"training reads \.safetensors.*python -m dataseg\.model\.weights",
  ):
    weights.load_pretrained(_vit_config(pth), fresh, log=lambda _: None)

  # A checkpoint name with no place in the model stops the conversion, unless dropped
  # knowingly (ViTDet's relative position tables: our ViTDet has none).
  rel = dict(mae, **{"blocks.0.attn.rel_pos_h": np.zeros((27, 16), np.float32)})
  with pytest.raises(weights.PretrainedError, match=r"rel_pos_h.*--drop"):
    weights.convert_file("mae", _save(tmp_path, rel), str(tmp_path / "c.safetensors"))
  report, _, _ = weights.convert_file(
    "mae", _save(tmp_path, rel), str(tmp_path / "c.safetensors"), drop=("rel_pos",)
  )
  assert "blocks.0.attn.rel_pos_h" in report.dropped


def _save(tmp_path, state):
  path = str(tmp_path / f"state_{len(list(tmp_path.iterdir()))}.safetensors")
  st_numpy.save_file(state, path)
  return path


def test_pth_conversion_says_it_needs_torch(tmp_path):
  try:
    import torch  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import

    pytest.skip("torch is installed here")
  except ImportError:
    pass
  pth = tmp_path / "resnet50.pth"
  pth.write_bytes(b"\x80\x02}q\x00.")  # never unpickled without torch.
  proc = _cli(
    "--from", "torchvision", "--input", str(pth), "--output", str(tmp_path / "r50.safetensors")
  )
  assert proc.returncode != 0
  assert "needs torch, for this one-off conversion only" in proc.stderr


def test_backbone_multiplier_only_with_pretrained_weights():
  opt = ml_collections.ConfigDict(
    dict(
      lr=1e-3,
      weight_decay=0.0,
      backbone_multiplier=0.1,
      schedule="constant",
      poly_power=0.9,
      warmup_steps=0,
      step_boundaries=(),
      step_factor=0.1,
      clip_norm=0.0,
      grad_accum_steps=1,
      ema_decay=0.0,
      b1=0.9,
      b2=0.999,
    )
  )
  for pretrained, want in ((True, 0.1), (False, 1.0)):
    tx, _ = optimizer_lib.make(opt, 10, pretrained_backbone=pretrained)
    s = type("S", (), {"tx": tx})
    assert _multipliers(s) == pytest.approx(want, rel=1e-5)
  from configs import demo  # pylint: disable=g-import-not-at-top

  assert not weights.pretrained_path(demo.get_config("smoke"))
