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
  return ((x - g("running_mean")) / np.sqrt(g("running_var") + eps) * g("weight")
          + g("bias"))


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
      y = relu(np_bn(np_conv(x, s[f"{t}.conv1.weight"], stride, 1), s,
                     f"{t}.bn1"))
      y = np_bn(np_conv(y, s[f"{t}.conv2.weight"], 1, 1), s, f"{t}.bn2")
      if f"{t}.downsample.0.weight" in s:
        x = np_bn(np_conv(x, s[f"{t}.downsample.0.weight"], stride), s,
                  f"{t}.downsample.1")
      x = relu(x + y)
    out[f"stride{2**(layer + 1)}"] = x
  return stem, out


def np_layer_norm(x, w, b, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
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
    groups = [y[r * window:(r + 1) * window, q * window:(q + 1) * window]
              .reshape(-1, c) for r in range(nh) for q in range(nw)]
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
      y[r * window:(r + 1) * window, q * window:(q + 1) * window] = o.reshape(
          window, window, c)
    y = y[:gh, :gw]
  else:
    y = outs[0].reshape(gh, gw, c)
  x = x + y
  y = np_layer_norm(x, t("norm2.weight"), t("norm2.bias"))
  y = y @ t("mlp.fc1.weight").T + t("mlp.fc1.bias")
  y = 0.5 * y * (1 + special.erf(y / np.sqrt(2)))  # exact GELU, as timm.
  return x + y @ t("mlp.fc2.weight").T + t("mlp.fc2.bias")


# ------------------------------------------------------ checkpoints in naming


def torchvision_resnet_state(depth, seed=0):
  """Random torchvision `resnet{depth}` state dict (eval statistics included)."""
  rng = np.random.default_rng(seed)
  bottleneck = depth >= 50
  layers = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth]
  s = {}

  def conv(name, o, i, k):
    s[f"{name}.weight"] = rng.normal(0, np.sqrt(2 / (i * k * k)),
                                     (o, i, k, k)).astype(np.float32)

  def bn(name, c):
    s[f"{name}.weight"] = rng.uniform(0.5, 1.0, c).astype(np.float32)
    s[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    s[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    s[f"{name}.running_var"] = rng.uniform(0.5, 2, c).astype(np.float32)
    s[f"{name}.num_batches_tracked"] = np.array(7, np.int64)

  conv("conv1", 64, 3, 7)
  bn("bn1", 64)
  inplanes = 64
  for li, n in enumerate(layers):
    planes = 64 * 2**li
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
  m = re.fullmatch(r"(?:layer(\d)\.(\d+)\.)?(conv\d|bn\d|downsample\.[01])\."
                   r"(weight|bias|running_mean|running_var)", key)
  assert m, key
  layer, block, mod, leaf = m.groups()
  mod = {"downsample.0": "downsample_conv",
         "downsample.1": "downsample_bn"}.get(mod, mod)
  prefix = (f"layer{layer}_{block}",) if layer else ()
  if "conv" in mod:
    return "params", prefix + (mod, "kernel"), lambda w: w.transpose(2, 3, 1, 0)
  leaf = {"weight": "scale", "bias": "bias", "running_mean": "mean",
          "running_var": "var"}[leaf]
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
  s = {"patch_embed.proj.weight": r(c, 3, p, p, std=0.05),
       "patch_embed.proj.bias": r(c),
       "pos_embed": r(1, 1 + grid * grid, c, std=0.5),
       "cls_token": r(1, 1, c), "mask_token": r(1, 1, c),
       "norm.weight": r(c), "norm.bias": r(c),
       "decoder_embed.weight": r(32, c), "decoder_pred.bias": r(8)}
  for i in range(cfg["depth"]):
    t = f"blocks.{i}"
    s.update({
        f"{t}.norm1.weight": 1 + r(c), f"{t}.norm1.bias": r(c),
        f"{t}.attn.qkv.weight": r(3 * c, c, std=0.2),
        f"{t}.attn.qkv.bias": r(3 * c),
        f"{t}.attn.proj.weight": r(c, c), f"{t}.attn.proj.bias": r(c),
        f"{t}.norm2.weight": 1 + r(c), f"{t}.norm2.bias": r(c),
        f"{t}.mlp.fc1.weight": r(cfg["mlp"], c),
        f"{t}.mlp.fc1.bias": r(cfg["mlp"]),
        f"{t}.mlp.fc2.weight": r(c, cfg["mlp"]), f"{t}.mlp.fc2.bias": r(c)})
  return s


def big_vision_state(mae, heads):
  """The same weights in big_vision's ViT naming (written independently)."""
  c = mae["patch_embed.proj.weight"].shape[0]
  hd = c // heads
  s = {"embedding/kernel": mae["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
       "embedding/bias": mae["patch_embed.proj.bias"],
       "pos_embedding": mae["pos_embed"][:, 1:],  # big_vision: no cls entry.
       "cls": mae["cls_token"], "head/kernel": np.zeros((c, 10), np.float32),
       "Transformer/encoder_norm/scale": mae["norm.weight"]}
  depth = 1 + max(int(k.split(".")[1]) for k in mae if k.startswith("blocks."))
  for i in range(depth):
    m = lambda k: mae[f"blocks.{i}.{k}"]
    t = f"Transformer/encoderblock_{i}"
    a = f"{t}/MultiHeadDotProductAttention_0"
    w_q, w_k, w_v = np.split(m("attn.qkv.weight"), 3, axis=0)  # [C_out, C_in]
    b_q, b_k, b_v = np.split(m("attn.qkv.bias"), 3)
    for n, w, b in (("query", w_q, b_q), ("key", w_k, b_k),
                    ("value", w_v, b_v)):
      s[f"{a}/{n}/kernel"] = w.T.reshape(c, heads, hd)
      s[f"{a}/{n}/bias"] = b.reshape(heads, hd)
    s[f"{a}/out/kernel"] = m("attn.proj.weight").T.reshape(heads, hd, c)
    s[f"{a}/out/bias"] = m("attn.proj.bias")
    s[f"{t}/LayerNorm_0/scale"], s[f"{t}/LayerNorm_0/bias"] = (
        m("norm1.weight"), m("norm1.bias"))
    s[f"{t}/LayerNorm_1/scale"], s[f"{t}/LayerNorm_1/bias"] = (
        m("norm2.weight"), m("norm2.bias"))
    s[f"{t}/MlpBlock_0/Dense_0/kernel"] = m("mlp.fc1.weight").T
    s[f"{t}/MlpBlock_0/Dense_0/bias"] = m("mlp.fc1.bias")
    s[f"{t}/MlpBlock_0/Dense_1/kernel"] = m("mlp.fc2.weight").T
    s[f"{t}/MlpBlock_0/Dense_1/bias"] = m("mlp.fc2.bias")
  return s


def _images(b=1, seed=0):
  return np.random.default_rng(seed).normal(size=(b, IMG, IMG, 3)).astype(
      np.float32)


# ------------------------------------------------------------------ ResNet


def test_resnet50_table_covers_torchvision_and_model(tmp_path):
  state = torchvision_resnet_state(50)
  path = str(tmp_path / "r50.safetensors")
  st_numpy.save_file(state, path)
  loaded = weights.load_safetensors(path)
  params, frozen = weights.resnet_from_torchvision(loaded, depth=50)
  converted = {"params": params, bb.FROZEN_COLLECTION: frozen}
  n_leaves = len(jax.tree.leaves(converted))
  used = [k for k in state if not k.startswith("fc.")
          and not k.endswith("num_batches_tracked")]
  assert n_leaves == len(used) == 53 + 53 * 4  # 53 convs, 53 BNs.
  for k in used:
    col, p, fn = expected_resnet_location(k)
    np.testing.assert_array_equal(get_path(converted[col], p), fn(state[k]),
                                  err_msg=k)
  # Exactly the model's tree: nothing missing, nothing unexpected.
  model = bb.ResNet(depth=50)
  init = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((1, IMG, IMG, 3), jnp.float32))
  merged, report = weights.merge_pretrained(
      {k: {"backbone": v} for k, v in init.items()}, converted, "backbone",
      strict=True)
  assert not report.missing and not report.unexpected
  assert len(report.loaded) == n_leaves
  leaf = merged["params"]["backbone"]["layer3_2"]["conv2"]["kernel"]
  assert isinstance(leaf, nn.Partitioned)  # Logical axes survive the merge.
  np.testing.assert_array_equal(
      leaf.value, state["layer3.2.conv2.weight"].transpose(2, 3, 1, 0))


def test_resnet18_import_computes_torchvision_forward(tmp_path):
  state = torchvision_resnet_state(18, seed=1)
  path = str(tmp_path / "r18.safetensors")
  st_numpy.save_file(state, path)
  params, frozen = weights.resnet_from_torchvision(
      weights.load_safetensors(path), depth=18)
  model = bb.ResNet(depth=18)
  x = _images()
  init = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  variables, report = weights.merge_pretrained(
      init, {"params": params, bb.FROZEN_COLLECTION: frozen}, strict=True)
  out, inter = jax.jit(lambda v, x: model.apply(
      v, x, mutable="intermediates"))(variables, x)
  stem, want = np_resnet18(x[0].astype(np.float64), state)
  got_stem = inter["intermediates"]["stem"][0][0]
  np.testing.assert_allclose(got_stem, stem, rtol=1e-4,
                             atol=1e-4 * np.abs(stem).max())
  for k, v in want.items():
    np.testing.assert_allclose(out[k][0], v, rtol=1e-4,
                               atol=1e-4 * np.abs(v).max(), err_msg=k)


def test_missing_and_unexpected_keys():
  state = torchvision_resnet_state(18)
  del state["layer2.1.bn2.running_var"]
  state["layer5.0.conv1.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(KeyError, match=r"layer2\.1\.bn2\.running_var"):
    weights.resnet_from_torchvision(state, depth=18)
  _, report = weights.convert(state, weights.resnet_name_table(18),
                              weights.RESNET_DROP, allow_missing=True)
  assert report.missing == ["layer2.1.bn2.running_var"]
  assert report.unexpected == ["layer5.0.conv1.weight"]
  assert "fc.weight" in report.dropped
  params, frozen = weights.resnet_from_torchvision(
      state, depth=18, allow_missing=True)
  assert "var" not in frozen["layer2_1"]["bn2"]
  init = {"params": {"conv1": {"kernel": np.zeros((7, 7, 3, 32))}}}
  with pytest.raises(ValueError, match="conv1/kernel"):
    weights.merge_pretrained(init, {"params": params})


@pytest.mark.parametrize("module_prefix", [False, True])
def test_torch_reference_resnet(module_prefix):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  tm = torchvision.models.resnet50().eval()
  state = {(("module." if module_prefix else "") + k): v.numpy()
           for k, v in tm.state_dict().items()}
  params, frozen = weights.resnet_from_torchvision(state, 50)
  x = _images()
  model = bb.ResNet(depth=50)
  variables, _ = weights.merge_pretrained(
      jax.eval_shape(model.init, jax.random.PRNGKey(0), x),
      {"params": params, bb.FROZEN_COLLECTION: frozen}, strict=True)
  out = model.apply(variables, x)
  with torch.no_grad():
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    t = tm.maxpool(tm.relu(tm.bn1(tm.conv1(t))))
    for i, layer in enumerate((tm.layer1, tm.layer2, tm.layer3, tm.layer4)):
      t = layer(t)
      want = t.numpy().transpose(0, 2, 3, 1)
      scale = np.abs(want).max()  # Random init: compare at unit scale.
      np.testing.assert_allclose(out[f"stride{4 * 2**i}"] / scale,
                                 want / scale, atol=1e-4)


# --------------------------------------------------------------------- ViT


def _vit_model(**kw):
  # window=3 on the 4x4 grid: block 0 is windowed with padding, block 1 global.
  return bb.ViTDet(**{**TINY, "window": 3, "global_blocks": (1,),
                      "pretrain_grid": IMG // 16, "out_dim": 32, **kw})


def _np_vit_trunk(x, s, heads, window, global_blocks):
  """Patch embedding + position + blocks, on the original arrays."""
  p = s["patch_embed.proj.weight"].shape[-1]
  t = np_conv(x, s["patch_embed.proj.weight"], p, 0, s["patch_embed.proj.bias"])
  grid = t.shape[0]
  t = t + s["pos_embed"][0, 1:].reshape(grid, grid, -1)
  outs = []
  depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
  for i in range(depth):
    t = np_vit_block(t, s, i, heads,
                     0 if i in global_blocks else window)
    outs.append(t)
  return outs


def test_vit_from_mae_computes_the_blocks():
  state = mae_state()
  params = weights.vit_from_mae({f"model.{k}": v for k, v in state.items()})
  np.testing.assert_array_equal(
      params["blocks_0"]["qkv"]["kernel"], state["blocks.0.attn.qkv.weight"].T)
  np.testing.assert_array_equal(
      params["patch_embed"]["kernel"],
      state["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["pos_embed"].reshape(-1, 64),
                                state["pos_embed"][0, 1:])
  model = _vit_model()
  x = _images()
  init = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
  variables, report = weights.merge_pretrained(init, {"params": params})
  assert not report.missing and not report.unexpected
  assert report.missing_by_design and all(
      "/simfp_" in k for k in report.missing_by_design)
  _, inter = jax.jit(lambda v, x: model.apply(
      v, x, capture_intermediates=True, mutable="intermediates"))(variables, x)
  want = _np_vit_trunk(x[0].astype(np.float64), state, TINY["heads"], 3, (1,))
  for i, w in enumerate(want):
    got = inter["intermediates"][f"blocks_{i}"]["__call__"][0][0]
    np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4 * np.abs(w).max(),
                               err_msg=f"blocks_{i}")


def test_vit_from_big_vision_npz_matches_mae(tmp_path):
  state = mae_state(seed=3)
  bv = big_vision_state(state, TINY["heads"])
  path = str(tmp_path / "vit.npz")
  np.savez(path, **bv)
  from_mae = weights.vit_from_mae(state)
  from_bv = weights.vit_from_big_vision_npz(path)
  assert jax.tree.structure(from_bv) == jax.tree.structure(from_mae)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               from_bv, from_mae)
  # Scanned layout (`encoderblock/...` with a leading depth axis), as big_vision
  # saves with scan=True, and a 'params/' prefix.
  scanned = {}
  for k, v in bv.items():
    m = re.match(r"Transformer/encoderblock_(\d+)/(.*)", k)
    if m:
      scanned.setdefault(f"Transformer/encoderblock/{m.group(2)}", []).append(
          (int(m.group(1)), v))
    else:
      scanned[k] = v
  scanned = {f"params/{k}": (np.stack([a for _, a in sorted(v)])
                             if isinstance(v, list) else v)
             for k, v in scanned.items()}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               weights.vit_from_big_vision_npz(scanned), from_mae)


def test_torch_bicubic_matrix_matches_torch():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(14, 14)).astype(np.float32)
  for n in (4, 20, 64):
    want = torch.nn.functional.interpolate(
        torch.from_numpy(x)[None, None], size=(n, n), mode="bicubic",
        align_corners=False)[0, 0].numpy()
    m = bb.torch_bicubic_matrix(14, n)
    np.testing.assert_allclose(m @ x @ m.T, want, atol=1e-5)


def test_torch_reference_timm_vit():
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  tm = timm.models.vision_transformer.VisionTransformer(
      img_size=IMG, patch_size=16, embed_dim=64, depth=2, num_heads=4,
      mlp_ratio=2.0, class_token=False, global_pool="avg").eval()
  params = weights.vit_from_mae({k: v.numpy() for k, v in
                                 tm.state_dict().items()})
  model = _vit_model(window=0, global_blocks=(0, 1))
  x = _images()
  variables, _ = weights.merge_pretrained(
      jax.eval_shape(model.init, jax.random.PRNGKey(0), x), {"params": params})
  variables = jax.tree.map(
      lambda s: s if isinstance(s, np.ndarray) else np.zeros(s.shape, s.dtype),
      variables)
  _, inter = model.apply(variables, x, capture_intermediates=True,
                         mutable="intermediates")
  with torch.no_grad():
    t = tm.blocks(tm._pos_embed(tm.patch_embed(
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))))
  got = inter["intermediates"]["blocks_1"]["__call__"][0]
  np.testing.assert_allclose(got.reshape(t.shape), t.numpy(), atol=1e-4)
