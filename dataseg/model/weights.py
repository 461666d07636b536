"""Pre-trained backbone weights, imported by explicit name tables.

A name table is a list of `Entry(sources, collection, path, fn)`: the original checkpoint
keys `sources` are combined by `fn` into `variables[collection][path]` of backbone.py's
modules. Why tables: the mapping is data, so tests/test_weights.py checks every tensor's
destination and that the stem / first block compute what the original arrays compute.
Namings: torchvision / timm ResNet, MAE / timm ViT, big_vision ViT `.npz` (`SOURCES`).

`python -m dataseg.model.weights --from SOURCE --input FILE --output FILE.safetensors`
converts once (torch needed only for a `.pth`); `config.model.backbone.pretrained` names the
output, which `trainer.init_state` merges (`load_pretrained`, reporting every name). The
README's "Pretrained backbones" section has the commands. Training reads no pickle.
"""

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from flax import traverse_util
from flax.core import meta
import numpy as np

from dataseg import config_lib
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
  # 'name: source shape(s) -> shape' where a table entry changed more than the axis
  # order (cls row dropped from a position table, big_vision q/k/v fused, ...).
  reshaped: list[str] = dataclasses.field(default_factory=list)


def oihw_to_hwio(w):
  """torch conv weight [O, I, kh, kw] -> flax kernel [kh, kw, I, O]."""
  return np.transpose(w, (2, 3, 1, 0))


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy arrays (no torch needed)."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

  return dict(st_numpy.load_file(path))


def convert(
  state: Mapping[str, np.ndarray],
  table: Sequence[Entry],
  drop: Sequence[str] = (),
  allow_missing: bool = False,
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
    name = "/".join((e.collection,) + e.path)
    report.loaded.append(name)
    shapes = [tuple(np.shape(state[k])) for k in e.sources]
    if len(shapes) > 1 or sorted(shapes[0]) != sorted(np.shape(arr)):
      report.reshaped.append(f"{name}: {' + '.join(map(str, shapes))} -> {tuple(np.shape(arr))}")
  for k in state:
    if k in used:
      continue
    if any(re.search(p, k) for p in drop):
      report.dropped.append(k)
    else:
      report.unexpected.append(k)
  if report.unexpected:
    logging.warning("Unexpected checkpoint keys (ignored): %s", report.unexpected)
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
      return {k[len(p) :]: v for k, v in state.items()}
  return dict(state)


# ------------------------------------------------------------------ ResNet


def _bn_entries(torch_name, flax_path):
  return [
    Entry((f"{torch_name}.{t}",), FROZEN, flax_path + (f,))
    for t, f in (
      ("weight", "scale"),
      ("bias", "bias"),
      ("running_mean", "mean"),
      ("running_var", "var"),
    )
  ]


def resnet_name_table(depth: int) -> list[Entry]:
  """torchvision `resnet{depth}` names -> backbone.ResNet variables."""
  block_cls, layers = backbone_lib.RESNET_LAYERS[depth]
  bottleneck = block_cls is backbone_lib.Bottleneck
  conv = lambda t, f: Entry((f"{t}.weight",), "params", f + ("kernel",), oihw_to_hwio)
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


def resnet_from_torchvision(
  state: Mapping[str, np.ndarray], depth: int = 50, allow_missing: bool = False
):
  """torchvision/timm ResNet state dict -> (params, frozen_stats) for ResNet.

  `frozen_stats` goes to the 'frozen' collection (backbone.FROZEN_COLLECTION);
  a GN backbone uses only `params` (its norms stay initialised).
  """
  tree, _ = convert(_strip_prefix(state), resnet_name_table(depth), RESNET_DROP, allow_missing)
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
    Entry(("patch_embed.proj.weight",), p, ("patch_embed", "kernel"), oihw_to_hwio),
    Entry(("patch_embed.proj.bias",), p, ("patch_embed", "bias")),
    Entry(("pos_embed",), p, ("pos_embed",), _grid_pos),
  ]
  for i in range(depth):
    t, f = f"blocks.{i}", f"blocks_{i}"
    for tn, fn in (("norm1", "norm1"), ("norm2", "norm2")):
      table.append(Entry((f"{t}.{tn}.weight",), p, (f, fn, "scale")))
      table.append(Entry((f"{t}.{tn}.bias",), p, (f, fn, "bias")))
    for tn, fn in (
      ("attn.qkv", "qkv"),
      ("attn.proj", "proj"),
      ("mlp.fc1", "fc1"),
      ("mlp.fc2", "fc2"),
    ):
      table.append(Entry((f"{t}.{tn}.weight",), p, (f, fn, "kernel"), np.transpose))
      table.append(Entry((f"{t}.{tn}.bias",), p, (f, fn, "bias")))
  return table


MAE_DROP = (r"^cls_token$", r"^mask_token$", r"^norm\.", r"^fc_norm\.", r"^head\.", r"^decoder")


def vit_from_mae(state: Mapping[str, np.ndarray], allow_missing: bool = False):
  """MAE / timm ViT state dict -> params of ViTDet (without `simfp_*`)."""
  state = _strip_prefix(state)
  table = mae_name_table(_num_blocks(state, r"blocks\.(\d+)\."))
  tree, _ = convert(state, table, MAE_DROP, allow_missing)
  return tree.get("params", {})


def _bv_qkv(q, k, v):
  """Three [D, H, hd] kernels (or [H, hd] biases) -> one timm-ordered qkv."""
  return np.concatenate(
    [x.reshape(x.shape[0], -1) if x.ndim == 3 else x.reshape(-1) for x in (q, k, v)], axis=-1
  )


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
      table.append(
        Entry(tuple(f"{att}/{n}/{x}" for n in ("query", "key", "value")), p, (f, "qkv", x), _bv_qkv)
      )
    table += [
      Entry((f"{att}/out/kernel",), p, (f, "proj", "kernel"), lambda w: w.reshape(-1, w.shape[-1])),
      Entry((f"{att}/out/bias",), p, (f, "proj", "bias")),
    ]
    for tn, fn in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
      for x in ("kernel", "bias"):
        table.append(Entry((f"{t}/MlpBlock_0/{tn}/{x}",), p, (f, fn, x)))
  return table


BIG_VISION_DROP = (
  r"^cls$",
  r"^head/",
  r"^Transformer/encoder_norm/",
  r"^MAPHead_0/",
  r"^pre_logits/",
)


def _unscan(state):
  """`Transformer/encoderblock/...` [depth, ...] -> `encoderblock_{i}/...`."""
  out = {}
  for k, v in state.items():
    if k.startswith("Transformer/encoderblock/"):
      rest = k[len("Transformer/encoderblock/") :]
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
  table = big_vision_name_table(_num_blocks(state, r"Transformer/encoderblock_(\d+)/"))
  tree, _ = convert(state, table, BIG_VISION_DROP, allow_missing)
  return tree.get("params", {})


# ------------------------------------------------------------------- merge

# Parts with no pre-trained counterpart: ViTDet's simple feature pyramid.
BY_DESIGN = (r"(^|/)simfp_",)


def merge_pretrained(
  init_variables: Mapping[str, Any],
  converted: Mapping[str, Any],
  prefix: str | Sequence[str] = "",
  by_design: Sequence[str] = BY_DESIGN,
  strict: bool = False,
  put: Callable[[np.ndarray, Any], Any] | None = None,
) -> tuple[dict[str, Any], Report]:
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
    put: `put(value, old_leaf) -> new_leaf`; default: a numpy array of the old
      leaf's dtype. `load_pretrained` passes one that builds a jax.Array in the
      old leaf's sharding.

  Returns:
    (variables, Report) with '/'-joined 'collection/path' names.

  Raises:
    ValueError: on a shape mismatch (always), or per `strict`.
  """
  if isinstance(prefix, str):
    prefix = tuple(p for p in prefix.split("/") if p)
  prefix = tuple(prefix)
  flat = traverse_util.flatten_dict(
    {k: dict(v) if hasattr(v, "items") else v for k, v in init_variables.items()}
  )
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
        raise ValueError(
          f"{name}: model shape {tuple(raw.shape)} != checkpoint shape {np.shape(value)}"
        )
      new = put(value, raw) if put else np.asarray(value, dtype=raw.dtype)
      flat[key] = old.replace_boxed(new) if isinstance(old, meta.AxisMetadata) else new
      done.add(key)
      report.loaded.append(name)
  for key in flat:
    if key[1 : 1 + len(prefix)] != prefix or key in done:
      continue
    name = "/".join(key)
    if any(re.search(p, name) for p in by_design):
      report.missing_by_design.append(name)
    else:
      report.missing.append(name)
  if strict and (report.missing or report.unexpected):
    raise ValueError(f"missing: {report.missing}; unexpected: {report.unexpected}")
  return traverse_util.unflatten_dict(flat), report


# ------------------------------------------------------------ files, layouts
#
# Training reads only `.safetensors` (or a big_vision `.npz`, read with
# allow_pickle=False): never a pickle, so no torch at training time and no code
# execution from a weights file. A torch `.pth` is converted once, on any machine
# with torch, by `python -m dataseg.model.weights` (this module's main).

CONVERTED_FORMAT = "dataseg-backbone-v1"  # safetensors metadata 'format'.
SOURCES = ("torchvision", "timm", "mae", "big_vision")
_LAYOUTS = {
  "torchvision": ("resnet",),
  "timm": ("resnet", "vit"),
  "mae": ("vit",),
  "big_vision": ("big_vision",),
}
_PICKLES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")


# StartupError: dataseg.main ends the run with the message alone (no traceback).
class PretrainedError(config_lib.StartupError):
  """A pretrained-weights file that cannot be used as it is (the message says why)."""


class MissingWeightsError(PretrainedError):
  """config.model.backbone.pretrained names a file that does not exist."""


def _open(path, mode="rb"):
  if "://" in path:  # gs:// and friends: the pod workers read the bucket directly.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    return tf.io.gfile.GFile(path, mode)
  return open(path, mode)


def _exists(path):
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    return tf.io.gfile.exists(path)
  return os.path.exists(path)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
  """The `__metadata__` of a safetensors byte string (8-byte header length + JSON)."""
  import json  # pylint: disable=g-import-not-at-top

  n = int.from_bytes(data[:8], "little")
  return json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}


def read_tensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of a `.safetensors` or `.npz` file; no pickle is read."""
  lower = path.lower()
  if lower.endswith(".safetensors"):
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

    with _open(path) as f:
      data = f.read()
    return dict(st_numpy.load(data)), _safetensors_metadata(data)
  if lower.endswith(".npz"):
    import io  # pylint: disable=g-import-not-at-top

    with _open(path) as f:
      npz = np.load(io.BytesIO(f.read()), allow_pickle=False)
      return {k: npz[k] for k in npz.files}, {}
  raise PretrainedError(
    f"{path}: training reads .safetensors (or a big_vision .npz) "
    f"only; convert it once: {conversion_command(None, path)}"
  )


def _to_numpy(x):
  if hasattr(x, "detach"):  # torch tensor (bfloat16 has no numpy dtype: upcast).
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      x = x.float()
    return x.numpy()
  return np.asarray(x)


def _unwrap(obj):
  """The state dict inside a training checkpoint ({'model': ...}, {'state_dict': ...})."""
  while isinstance(obj, Mapping):
    for key in ("model", "state_dict", "module"):
      if isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
    else:
      return obj
  return obj


def read_original(path: str) -> dict[str, np.ndarray]:
  """A published checkpoint as {name: array}: .safetensors, .npz, or a torch / pickle file.

  Only the one-off conversion calls this. A torch file needs torch; nothing else does.
  """
  lower = path.lower()
  if lower.endswith((".safetensors", ".npz")):
    return read_tensors(path)[0]
  if lower.endswith((".pkl", ".pickle")):  # detectron2 model zoo: numpy arrays.
    import pickle  # pylint: disable=g-import-not-at-top

    with _open(path) as f:
      obj = pickle.load(f, encoding="latin1")
  elif lower.endswith(_PICKLES):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise PretrainedError(
        f"{path} is a torch pickle: reading it needs torch, for this one-off conversion "
        f"only (training reads the .safetensors it writes and never needs torch). "
        f"Install it here (`pip install torch --index-url "
        f"https://download.pytorch.org/whl/cpu`) or run this command on a machine that "
        f"has it."
      ) from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
  else:
    raise PretrainedError(
      f"{path}: unknown weights file type; expected .pth/.pt/.bin "
      f"(torch), .pkl, .safetensors or .npz"
    )
  state = _unwrap(obj)
  if not isinstance(state, Mapping):
    raise PretrainedError(f"{path}: no state dict found (a {type(obj).__name__})")
  return {k: _to_numpy(v) for k, v in state.items() if hasattr(v, "shape")}


def detect_layout(state: Mapping[str, Any]) -> str:
  """'resnet' (torchvision/timm), 'vit' (MAE/timm) or 'big_vision', from the names."""
  keys = set(_strip_prefix(_strip_prefix(state), ("params/",)))
  if "embedding/kernel" in keys or any(k.startswith("Transformer/encoderblock") for k in keys):
    return "big_vision"
  if "patch_embed.proj.weight" in keys:
    return "vit"
  if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
    return "resnet"
  raise PretrainedError(
    "cannot tell the checkpoint's layout from its names (expected torchvision/timm "
    "ResNet `conv1.weight`, `layer1.0...`; MAE/timm ViT `patch_embed.proj.weight`, "
    "`blocks.N...`; or big_vision `embedding/kernel`, `Transformer/encoderblock_N/...`); "
    f"first names: {sorted(keys)[:8]}"
  )


def _resnet_depth(state):
  bottleneck = "layer1.0.conv3.weight" in state
  blocks = tuple(_num_blocks(state, rf"layer{s}\.(\d+)\.") for s in (1, 2, 3, 4))
  for depth, (cls, layers) in backbone_lib.RESNET_LAYERS.items():
    if tuple(layers) == blocks and (cls is backbone_lib.Bottleneck) == bottleneck:
      return depth
  raise PretrainedError(
    f"ResNet with blocks {blocks} (bottleneck={bottleneck}) is none "
    f"of depths {sorted(backbone_lib.RESNET_LAYERS)}"
  )


def convert_original(
  state: Mapping[str, np.ndarray], source: str | None = None, drop: Sequence[str] = ()
) -> tuple[dict[str, Any], Report, str]:
  """An original checkpoint -> ({collection: tree rooted at the backbone}, Report, arch).

  `source` (one of SOURCES) must agree with the names; None: whatever they are.
  `drop`: extra regexes of checkpoint names to discard by design (e.g. 'rel_pos' of a
  ViTDet checkpoint: our ViTDet has no relative position bias). A checkpoint name
  that is neither used nor dropped is an error, as is a name the table needs.
  """
  layout = detect_layout(state)
  if source is not None and layout not in _LAYOUTS[source]:
    raise PretrainedError(
      f"--from {source}: but the names are those of a {layout} "
      f"checkpoint ({', '.join(s for s in SOURCES if layout in _LAYOUTS[s])})"
    )
  if layout == "resnet":
    state = _strip_prefix(state)
    depth = _resnet_depth(state)
    table, dropped, arch = resnet_name_table(depth), RESNET_DROP, f"resnet{depth}"
  elif layout == "vit":
    state = _strip_prefix(state)
    depth = _num_blocks(state, r"blocks\.(\d+)\.")
    table, dropped = mae_name_table(depth), MAE_DROP
    arch = f"vit width {state['patch_embed.proj.weight'].shape[0]} depth {depth}"
  else:
    state = _unscan(_strip_prefix(state, ("params/",)))
    depth = _num_blocks(state, r"Transformer/encoderblock_(\d+)/")
    table, dropped = big_vision_name_table(depth), BIG_VISION_DROP
    arch = f"vit width {state['embedding/kernel'].shape[-1]} depth {depth}"
  try:
    tree, report = convert(state, table, tuple(dropped) + tuple(drop))
  except KeyError as e:
    raise PretrainedError(f"{arch} checkpoint lacks names the model needs: {e}") from e
  if report.unexpected:
    raise PretrainedError(
      f"{len(report.unexpected)} checkpoint names have no place in the model "
      f"({arch}): {_short(report.unexpected)}; drop them knowingly with --drop=REGEX "
      f"if they are parts the model does not have"
    )
  return tree, report, arch


def _short(names, n=12):
  names = list(names)
  more = f" ... ({len(names) - n} more)" if len(names) > n else ""
  return ", ".join(names[:n]) + more


def save_converted(path: str, converted: Mapping[str, Any], metadata: Mapping[str, str]) -> int:
  """Writes {collection: tree} as '/'-joined names with metadata; returns the count."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

  flat = {
    "/".join(k): np.ascontiguousarray(v, np.float32)
    for k, v in traverse_util.flatten_dict(dict(converted)).items()
  }
  data = st_numpy.save(
    flat, metadata={"format": CONVERTED_FORMAT, **{k: str(v) for k, v in metadata.items()}}
  )
  with _open(path, "wb") as f:
    f.write(data)
  return len(flat)


def convert_file(
  source: str, input_path: str, output_path: str, drop: Sequence[str] = ()
) -> tuple[Report, str, int]:
  """The one-off conversion: a published checkpoint -> a converted .safetensors."""
  import json  # pylint: disable=g-import-not-at-top

  if not output_path.endswith(".safetensors"):
    raise PretrainedError(f"--output {output_path}: must end with .safetensors")
  converted, report, arch = convert_original(read_original(input_path), source, drop)
  n = save_converted(
    output_path,
    converted,
    {
      "source": source,
      "input": input_path.rsplit("/", 1)[-1],
      "arch": arch,
      "dropped": json.dumps(report.dropped),
      "reshaped": json.dumps(report.reshaped),
    },
  )
  return report, arch, n


# ------------------------------------------------------------ at training time


def pretrained_path(config) -> str:
  """config.model.backbone.pretrained, '' when absent (configs older than the key)."""
  backbone = config.model.backbone
  return str(backbone.get("pretrained", "") or "") if hasattr(backbone, "get") else ""


def expected_source(backbone_config):
  """The published weights a backbone config is meant to start from, if known."""
  from dataseg.model import configs as model_configs  # pylint: disable=g-import-not-at-top

  b = backbone_config
  key = None
  if b.name == "resnet" and b.depth == 50 and b.width == 64:
    key = "r50"
  elif b.name == "vitdet" and (b.width, b.depth) == (768, 12):
    key = "vitdet_b"
  elif b.name == "vitdet" and (b.width, b.depth) == (1024, 24):
    key = "vitdet_l"
  return model_configs.PRETRAINED.get(key)


def conversion_command(backbone_config, output: str) -> str:
  """The command (and where its input comes from) that writes `output`."""
  src = expected_source(backbone_config) if backbone_config is not None else None
  if src is not None:
    return (
      f"download {src.url} ({src.what}; a torch pickle) on a machine with network, "
      f"then, where torch is installed (needed for this one-off conversion only): "
      f"python -m dataseg.model.weights --from {src.source} --input {src.original} "
      f"--output {output}"
    )
  kind = getattr(backbone_config, "name", None)
  source = {"resnet": "torchvision", "vitdet": "mae|timm|big_vision"}.get(
    kind, "torchvision|timm|mae|big_vision"
  )
  return (
    f"python -m dataseg.model.weights --from {source} --input ORIGINAL_WEIGHTS "
    f"--output {output}  (a .pth input needs torch for this one-off conversion)"
  )


def pretrained_problem(config) -> str | None:
  """One line if the configured weights file is missing, else None (cheap: no read)."""
  path = pretrained_path(config)
  if not path or _exists(path):
    return None
  return (
    f"config.model.backbone.pretrained = {path!r} does not exist. Convert the "
    f"backbone's weights once: {conversion_command(config.model.backbone, path)}. "
    f"Or train the backbone from scratch with --config.model.backbone.pretrained= "
    f"(its lr multiplier is then 1.0)."
  )


def check_pretrained(config) -> None:
  """Raises MissingWeightsError naming the file and the conversion command."""
  problem = pretrained_problem(config)
  if problem:
    raise MissingWeightsError(problem)


def read_pretrained(config) -> tuple[dict[str, Any], dict[str, Any]]:
  """({collection: tree rooted at the backbone}, info) of config's weights file.

  A converted file is used as written; a `.safetensors` / `.npz` in an original
  layout (timm's safetensors, big_vision's npz) is converted in memory.
  """
  import json  # pylint: disable=g-import-not-at-top

  check_pretrained(config)
  path = pretrained_path(config)
  tensors, meta = read_tensors(path)
  if meta.get("format") == CONVERTED_FORMAT:
    converted = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in tensors.items()})
    info = dict(
      meta,
      dropped=json.loads(meta.get("dropped", "[]")),
      reshaped=json.loads(meta.get("reshaped", "[]")),
    )
  else:
    converted, report, arch = convert_original(tensors)
    info = dict(
      source="in memory", input=path, arch=arch, dropped=report.dropped, reshaped=report.reshaped
    )
  return converted, info


def _put_like(value, old):
  """`value` as a jax.Array with `old`'s dtype and sharding (any mesh, multi-host)."""
  import jax  # pylint: disable=g-import-not-at-top

  value = np.asarray(value, dtype=old.dtype)
  if isinstance(old, jax.Array):
    return jax.make_array_from_callback(old.shape, old.sharding, lambda idx: value[idx])
  return value


def load_pretrained(
  config,
  state: Mapping[str, Any],
  log: Callable[[str], None] | None = None,
  prefix: str = "backbone",
) -> dict[str, Any]:
  """Merges config's pretrained backbone into a fresh train state; prints the report.

  `state` is the trainer's ({'params': ..., 'frozen': {collection: ...}, ...}); the
  optimizer's moments start at zero whatever the parameters, so only 'params',
  'frozen' (and 'ema', a copy of the parameters) change. Every backbone tensor of
  the model must be loaded except the parts with no pretrained counterpart
  (BY_DESIGN: ViTDet's pyramid), and every tensor of the file must land in the
  model; otherwise PretrainedError, before any training step.
  """
  if log is None:
    import jax  # pylint: disable=g-import-not-at-top

    log = (
      (lambda line: print(line, flush=True)) if jax.process_index() == 0 else (lambda line: None)
    )
  path = pretrained_path(config)
  if not path:
    log(
      "backbone: random init (config.model.backbone.pretrained is empty), backbone "
      "lr multiplier 1.0"
    )
    return dict(state)
  converted, info = read_pretrained(config)
  variables = {"params": state["params"], **state["frozen"]}
  try:
    merged, report = merge_pretrained(variables, converted, prefix, put=_put_like)
  except ValueError as e:
    hint = ""
    if "pos_embed" in str(e):
      hint = (
        " (the position table's grid is the pre-training resolution / 16: set "
        "--config.model.backbone.pretrain_grid to the checkpoint's)"
      )
    raise PretrainedError(f"{path}: {e}{hint}") from e
  total = len(report.loaded) + len(report.missing) + len(report.missing_by_design)
  if report.missing or report.unexpected:
    raise PretrainedError(
      f"{path} ({info.get('arch', '?')}) does not fit config.model.backbone: "
      f"{len(report.missing)} of the model's {total} backbone tensors not in the file "
      f"({_short(report.missing)}); {len(report.unexpected)} tensors of the file not in "
      f"the model ({_short(report.unexpected)})"
    )
  new = dict(state)
  new["params"] = merged["params"]
  new["frozen"] = {k: v for k, v in merged.items() if k != "params"}
  if "ema" in state:  # its own buffers: the step donates the state.
    ema, _ = merge_pretrained(
      {"params": state["ema"]}, {"params": converted["params"]}, prefix, put=_put_like
    )
    new["ema"] = ema["params"]
  by_col = {}
  for name in report.loaded:
    by_col[name.split("/")[0]] = by_col.get(name.split("/")[0], 0) + 1
  every = (
    "every backbone tensor"
    if not report.missing_by_design
    else "every backbone tensor with a pretrained counterpart"
  )
  log(
    f"pretrained backbone {path} ({info.get('arch', '?')}, from {info.get('source', '?')} "
    f"{info.get('input', '')}):"
  )
  log(
    f"  loaded {len(report.loaded)} of {total} backbone tensors "
    f"({', '.join(f'{k} {v}' for k, v in sorted(by_col.items()))}): {every}; "
    f"missing 0; unexpected 0"
  )
  log(
    f"  reshaped at conversion ({len(info['reshaped'])}): {_short(info['reshaped'], 4) or 'none'}"
  )
  log(
    f"  dropped at conversion by design ({len(info['dropped'])}): "
    f"{_short(sorted(info['dropped']), 6) or 'none'}"
  )
  if report.missing_by_design:
    log(
      f"  fresh by design, no pretrained counterpart ({len(report.missing_by_design)}): "
      f"{_short(report.missing_by_design, 3)}"
    )
  log(
    f"  backbone lr multiplier {float(config.optimizer.backbone_multiplier):g} "
    f"(config.optimizer.backbone_multiplier; pretrained weights)"
  )
  return new


# --------------------------------------------------------------------- CLI


def main(argv):
  """python -m dataseg.model.weights --from SOURCE --input FILE --output FILE.safetensors"""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  try:
    report, arch, n = convert_file(f["from"].value, f.input, f.output, f.drop or ())
  except PretrainedError as e:
    raise SystemExit(f"dataseg.model.weights: {e}") from None
  print(f"{f.input} ({arch}, {f['from'].value} layout) -> {f.output}: {n} tensors")
  print(f"  reshaped ({len(report.reshaped)}): {_short(report.reshaped, 4) or 'none'}")
  print(
    f"  dropped by design ({len(report.dropped)}): {_short(sorted(report.dropped), 6) or 'none'}"
  )
  print(f"  use it with --config.model.backbone.pretrained={f.output}")


def _define_flags():
  """Only for the command: a library import must not add flags to dataseg.main's."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_enum(
    "from",
    None,
    list(SOURCES),
    "Layout of --input: torchvision "
    "(ResNet), timm (ResNet or ViT), mae (ViT), big_vision (ViT .npz).",
  )
  flags.DEFINE_string(
    "input",
    None,
    "Published checkpoint: .pth/.pt/.bin (needs torch, only here), .pkl, .safetensors or .npz.",
  )
  flags.DEFINE_string(
    "output", None, "Converted file, .safetensors (what config.model.backbone.pretrained names)."
  )
  flags.DEFINE_multi_string(
    "drop", [], "Regex of checkpoint names to discard knowingly (parts the model does not have)."
  )
  for name in ("from", "input", "output"):
    flags.mark_flag_as_required(name)


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top

  _define_flags()
  _app.run(main)
