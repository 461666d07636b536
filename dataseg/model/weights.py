"""Pre-trained backbone weights, imported by explicit name tables.

A name table is a list of `Entry(sources, collection, path, fn)`: the original
checkpoint keys `sources` are combined by `fn` into the array at
`variables[collection][path]` of our modules (backbone.py). Keeping the table as
data makes the mapping testable (tests/test_weights.py writes a checkpoint in each
naming and checks every tensor lands where it should, and that the stem / first
block compute what the original arrays compute).

Supported namings:
  * torchvision / timm ResNet (`conv1.weight`, `bn1.running_mean`,
    `layer1.0.downsample.0.weight`, ...; `fc.*` dropped): `resnet_from_torchvision`.
  * MAE / timm ViT (`patch_embed.proj.weight`, `blocks.N.attn.qkv.weight`,
    `pos_embed`; `cls_token`, final `norm`, `head`, MAE decoder dropped):
    `vit_from_mae`.
  * big_vision ViT `.npz` (`Transformer/encoderblock_N/MultiHeadDotProductAttention_0/
    query/kernel`, `embedding/kernel`, `pos_embedding`; also the scanned
    `Transformer/encoderblock/...` layout): `vit_from_big_vision_npz`.
Conversions return float32 numpy trees; `merge_pretrained` drops them into a full
model's variables at a sub-tree path and reports what was left initialised.
"""

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from flax import traverse_util
from flax.core import meta
import numpy as np

from dataseg.model import backbone as backbone_lib

FROZEN = backbone_lib.FROZEN_COLLECTION


@dataclasses.dataclass(frozen=True)
class Entry:
  sources: tuple[str, ...]
  collection: str
  path: tuple[str, ...]
  fn: Callable[..., np.ndarray] = lambda x: x


@dataclasses.dataclass
class Report:
  """What a conversion or merge did, as '/'-joined paths or checkpoint keys."""
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  dropped: list[str] = dataclasses.field(default_factory=list)
  missing_by_design: list[str] = dataclasses.field(default_factory=list)
  loaded: list[str] = dataclasses.field(default_factory=list)


def oihw_to_hwio(w):
  """torch conv weight [O, I, kh, kw] -> flax kernel [kh, kw, I, O]."""
  return np.transpose(w, (2, 3, 1, 0))


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy arrays (no torch needed)."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  return dict(st_numpy.load_file(path))


def convert(state: Mapping[str, np.ndarray], table: Sequence[Entry],
            drop: Sequence[str] = (), allow_missing: bool = False
            ) -> tuple[dict[str, Any], Report]:
  """Applies a name table: returns ({collection: nested dict}, Report).

  Keys matching a regex in `drop` are discarded by design (classifier heads,
  cls token, ...). Keys neither used nor dropped are `unexpected` (logged).
  A table entry whose sources are absent is `missing`: KeyError unless
  `allow_missing`.
  """
  report, flat, used = Report(), {}, set()
  for e in table:
    if not all(k in state for k in e.sources):
      report.missing.extend(k for k in e.sources if k not in state)
      continue
    arr = e.fn(*(np.asarray(state[k], np.float32) for k in e.sources))
    flat[(e.collection,) + e.path] = np.asarray(arr, np.float32)
    used.update(e.sources)
    report.loaded.append("/".join((e.collection,) + e.path))
  for k in state:
    if k in used:
      continue
    if any(re.search(p, k) for p in drop):
      report.dropped.append(k)
    else:
      report.unexpected.append(k)
  if report.unexpected:
    logging.warning("Unexpected checkpoint keys (ignored): %s",
                    report.unexpected)
  if report.missing:
    msg = f"Checkpoint lacks keys: {report.missing}"
    if not allow_missing:
      raise KeyError(msg)
    logging.warning(msg)
  tree = traverse_util.unflatten_dict(flat)
  return tree, report


def _strip_prefix(state, prefixes=("module.", "model.")):
  for p in prefixes:
    if state and all(k.startswith(p) for k in state):
      return {k[len(p):]: v for k, v in state.items()}
  return dict(state)


# ------------------------------------------------------------------ ResNet


def _bn_entries(torch_name, flax_path):
  return [Entry((f"{torch_name}.{t}",), FROZEN, flax_path + (f,))
          for t, f in (("weight", "scale"), ("bias", "bias"),
                       ("running_mean", "mean"), ("running_var", "var"))]


def resnet_name_table(depth: int) -> list[Entry]:
  """torchvision `resnet{depth}` names -> backbone.ResNet variables."""
  block_cls, layers = backbone_lib.RESNET_LAYERS[depth]
  bottleneck = block_cls is backbone_lib.Bottleneck
  conv = lambda t, f: Entry((f"{t}.weight",), "params", f + ("kernel",),
                            oihw_to_hwio)
  table = [conv("conv1", ("conv1",))] + _bn_entries("bn1", ("bn1",))
  for s, n in enumerate(layers, start=1):
    for b in range(n):
      t, f = f"layer{s}.{b}", f"layer{s}_{b}"
      for k in range(1, 4 if bottleneck else 3):
        table.append(conv(f"{t}.conv{k}", (f, f"conv{k}")))
        table += _bn_entries(f"{t}.bn{k}", (f, f"bn{k}"))
      if b == 0 and (s > 1 or bottleneck):
        table.append(conv(f"{t}.downsample.0", (f, "downsample_conv")))
        table += _bn_entries(f"{t}.downsample.1", (f, "downsample_bn"))
  return table


RESNET_DROP = (r"^fc\.", r"num_batches_tracked$")


def resnet_from_torchvision(state: Mapping[str, np.ndarray], depth: int = 50,
                            allow_missing: bool = False):
  """torchvision/timm ResNet state dict -> (params, frozen_stats) for ResNet.

  `frozen_stats` goes to the 'frozen' collection (backbone.FROZEN_COLLECTION);
  a GN backbone uses only `params` (its norms stay initialised).
  """
  tree, _ = convert(_strip_prefix(state), resnet_name_table(depth),
                    RESNET_DROP, allow_missing)
  return tree.get("params", {}), tree.get(FROZEN, {})


# --------------------------------------------------------------------- ViT


def _grid_pos(pos):
  """[1, (1 +) g*g, D] -> [g, g, D], dropping a cls entry if there is one."""
  pos = pos.reshape(-1, pos.shape[-1])
  g = int(round(np.sqrt(pos.shape[0])))
  if g * g != pos.shape[0]:
    pos, g = pos[1:], int(round(np.sqrt(pos.shape[0] - 1)))
  if g * g != pos.shape[0]:
    raise ValueError(f"position table of {pos.shape[0]} tokens is not square")
  return pos.reshape(g, g, -1)


def _num_blocks(state, pattern):
  ids = [int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m]
  if not ids:
    raise KeyError(f"no transformer blocks matching {pattern!r}")
  return max(ids) + 1


def mae_name_table(depth: int) -> list[Entry]:
  """MAE / timm ViT names -> backbone.ViTDet variables (pyramid excluded)."""
  p = "params"
  table = [
      Entry(("patch_embed.proj.weight",), p, ("patch_embed", "kernel"),
            oihw_to_hwio),
      Entry(("patch_embed.proj.bias",), p, ("patch_embed", "bias")),
      Entry(("pos_embed",), p, ("pos_embed",), _grid_pos),
  ]
  for i in range(depth):
    t, f = f"blocks.{i}", f"blocks_{i}"
    for tn, fn in (("norm1", "norm1"), ("norm2", "norm2")):
      table.append(Entry((f"{t}.{tn}.weight",), p, (f, fn, "scale")))
      table.append(Entry((f"{t}.{tn}.bias",), p, (f, fn, "bias")))
    for tn, fn in (("attn.qkv", "qkv"), ("attn.proj", "proj"),
                   ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
      table.append(Entry((f"{t}.{tn}.weight",), p, (f, fn, "kernel"),
                         np.transpose))
      table.append(Entry((f"{t}.{tn}.bias",), p, (f, fn, "bias")))
  return table


MAE_DROP = (r"^cls_token$", r"^mask_token$", r"^norm\.", r"^fc_norm\.",
            r"^head\.", r"^decoder")


def vit_from_mae(state: Mapping[str, np.ndarray], allow_missing: bool = False):
  """MAE / timm ViT state dict -> params of ViTDet (without `simfp_*`)."""
  state = _strip_prefix(state)
  table = mae_name_table(_num_blocks(state, r"blocks\.(\d+)\."))
  tree, _ = convert(state, table, MAE_DROP, allow_missing)
  return tree.get("params", {})


def _bv_qkv(q, k, v):
  """Three [D, H, hd] kernels (or [H, hd] biases) -> one timm-ordered qkv."""
  return np.concatenate(
      [x.reshape(x.shape[0], -1) if x.ndim == 3 else x.reshape(-1)
       for x in (q, k, v)], axis=-1)


def big_vision_name_table(depth: int) -> list[Entry]:
  """big_vision ViT (`models/vit.py`) names -> backbone.ViTDet variables."""
  p = "params"
  table = [
      Entry(("embedding/kernel",), p, ("patch_embed", "kernel")),
      Entry(("embedding/bias",), p, ("patch_embed", "bias")),
      Entry(("pos_embedding",), p, ("pos_embed",), _grid_pos),
  ]
  for i in range(depth):
    t, f = f"Transformer/encoderblock_{i}", f"blocks_{i}"
    att = f"{t}/MultiHeadDotProductAttention_0"
    for tn, fn in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
      for x in ("scale", "bias"):
        table.append(Entry((f"{t}/{tn}/{x}",), p, (f, fn, x)))
    for x in ("kernel", "bias"):
      table.append(Entry(tuple(f"{att}/{n}/{x}" for n in ("query", "key", "value")),
                         p, (f, "qkv", x), _bv_qkv))
    table += [
        Entry((f"{att}/out/kernel",), p, (f, "proj", "kernel"),
              lambda w: w.reshape(-1, w.shape[-1])),
        Entry((f"{att}/out/bias",), p, (f, "proj", "bias")),
    ]
    for tn, fn in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
      for x in ("kernel", "bias"):
        table.append(Entry((f"{t}/MlpBlock_0/{tn}/{x}",), p, (f, fn, x)))
  return table


BIG_VISION_DROP = (r"^cls$", r"^head/", r"^Transformer/encoder_norm/",
                   r"^MAPHead_0/", r"^pre_logits/")


def _unscan(state):
  """`Transformer/encoderblock/...` [depth, ...] -> `encoderblock_{i}/...`."""
  out = {}
  for k, v in state.items():
    if k.startswith("Transformer/encoderblock/"):
      rest = k[len("Transformer/encoderblock/"):]
      for i in range(v.shape[0]):
        out[f"Transformer/encoderblock_{i}/{rest}"] = v[i]
    else:
      out[k] = v
  return out


def vit_from_big_vision_npz(path_or_state, allow_missing: bool = False):
  """big_vision ViT `.npz` (path, or its dict) -> params of ViTDet."""
  if isinstance(path_or_state, Mapping):
    state = dict(path_or_state)
  else:
    with np.load(path_or_state) as f:
      state = {k: f[k] for k in f.files}
  state = _unscan(_strip_prefix(state, ("params/",)))
  table = big_vision_name_table(
      _num_blocks(state, r"Transformer/encoderblock_(\d+)/"))
  tree, _ = convert(state, table, BIG_VISION_DROP, allow_missing)
  return tree.get("params", {})


# ------------------------------------------------------------------- merge

# Parts with no pre-trained counterpart: ViTDet's simple feature pyramid.
BY_DESIGN = (r"(^|/)simfp_",)


def merge_pretrained(init_variables: Mapping[str, Any],
                     converted: Mapping[str, Any],
                     prefix: str | Sequence[str] = "",
                     by_design: Sequence[str] = BY_DESIGN,
                     strict: bool = False) -> tuple[dict[str, Any], Report]:
  """Drops converted weights into a model's variables under `prefix`.

  Args:
    init_variables: the full model's `init` output ({collection: tree}); leaves
      may be arrays or flax `Partitioned` boxes (boxes are kept, values replaced).
    converted: {collection: tree} rooted at the backbone, e.g.
      `{'params': params, 'frozen': frozen_stats}`.
    prefix: path of the backbone inside each collection, 'backbone' or
      ('model', 'backbone'); '' for the root.
    by_design: regexes of paths that have no pre-trained counterpart; such
      missing leaves are listed in `missing_by_design`, not `missing`.
    strict: raise ValueError on any unexpected or (non-by-design) missing leaf.

  Returns:
    (variables, Report) with '/'-joined 'collection/path' names.

  Raises:
    ValueError: on a shape mismatch (always), or per `strict`.
  """
  if isinstance(prefix, str):
    prefix = tuple(p for p in prefix.split("/") if p)
  prefix = tuple(prefix)
  flat = traverse_util.flatten_dict(
      {k: dict(v) if hasattr(v, "items") else v
       for k, v in init_variables.items()})
  report, done = Report(), set()
  for col, tree in converted.items():
    for path, value in traverse_util.flatten_dict(tree).items():
      key = (col,) + prefix + path
      name = "/".join(key)
      if key not in flat:
        report.unexpected.append(name)
        continue
      old = flat[key]
      raw = old.unbox() if isinstance(old, meta.AxisMetadata) else old
      if tuple(raw.shape) != tuple(np.shape(value)):
        raise ValueError(f"{name}: model shape {tuple(raw.shape)} != "
                         f"checkpoint shape {np.shape(value)}")
      new = np.asarray(value, dtype=raw.dtype)
      flat[key] = (old.replace_boxed(new) if isinstance(old, meta.AxisMetadata)
                   else new)
      done.add(key)
      report.loaded.append(name)
  for key in flat:
    if key[1:1 + len(prefix)] != prefix or key in done:
      continue
    name = "/".join(key)
    if any(re.search(p, name) for p in by_design):
      report.missing_by_design.append(name)
    else:
      report.missing.append(name)
  if strict and (report.missing or report.unexpected):
    raise ValueError(f"missing: {report.missing}; "
                     f"unexpected: {report.unexpected}")
  return traverse_util.unflatten_dict(flat), report
