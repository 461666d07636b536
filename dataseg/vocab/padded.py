"""A run's vocabularies as the model takes them: text embeddings padded to one static size V.

Training, evaluation, the Predictor and the plan tool all build them here: the padded
arrays (`PaddedVocab`), the class-name embedding call with its cache, and the size checks.
One static V means one compiled program per task, whatever the dataset.
"""

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

from dataseg import text as text_lib
from dataseg import vocab as vocab_lib
from input_pipeline import datasets as datasets_lib

# A Predictor's list longer than the run's V is padded to the next multiple of this.
PAD_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class PaddedVocab:
  """One dataset's vocabulary, padded to the run's static size V."""

  names: tuple
  is_thing: np.ndarray  # bool [V]
  valid: np.ndarray  # bool [V]
  text: np.ndarray  # float32 [V, D] (zeros for the 'learned' classifier)
  index: int  # dataset index (row of the learned vocab table)

  def arrays(self):
    return dict(
      text=self.text, valid=self.valid, is_thing=self.is_thing, index=np.int32(self.index)
    )


def pad(names: Sequence[str], is_thing, text, size: int, index: int) -> PaddedVocab:
  """`names` (n <= size) with their flags and [n, D] embeddings, padded to `size`."""
  n = len(names)
  if n > size:
    raise ValueError(f"{n} class names do not fit the padded vocabulary size {size}")
  extra = size - n
  return PaddedVocab(
    names=tuple(names),
    is_thing=np.pad(np.asarray(is_thing, bool), (0, extra)),
    valid=np.arange(size) < n,
    text=np.pad(np.asarray(text, np.float32), ((0, extra), (0, 0))),
    index=index,
  )


def entry_vocabulary(entry) -> vocab_lib.Vocabulary:
  """The packaged vocabulary a config dataset entry uses (`vocab`, else the registry's)."""
  info = datasets_lib.lookup(entry.name)
  name = entry.vocab or info["vocab"]
  if not name:
    raise ValueError(f"dataset {entry.name!r} needs `vocab` (a dataseg/vocab name)")
  return vocab_lib.load(name)


def static_size(config, sizes: Mapping[str, int]) -> int:
  """The run's padded size V: `config.vocab_size`, else the largest of `sizes` ({key: n})."""
  largest = max(sizes, key=sizes.get)
  if config.vocab_size and config.vocab_size < sizes[largest]:
    raise ValueError(
      f"config.vocab_size={config.vocab_size} < largest vocabulary "
      f"({sizes[largest]} classes of {largest!r})"
    )
  return config.vocab_size or sizes[largest]


def config_vocab_size(config) -> int:
  """V from the config's vocabulary lists alone (no embeddings computed)."""
  sizes = {}
  for group in ("datasets", "eval_datasets"):
    for key, entry in config[group].items():
      sizes[f"{group}.{key}"] = len(entry_vocabulary(entry).class_names)
  return static_size(config, sizes)


def vocab_size(config, vocabs: Mapping[str, PaddedVocab]) -> int:
  """V of built vocabularies (`build_vocabularies`' output)."""
  return static_size(config, {k: len(v.names) for k, v in vocabs.items()})


def text_embeddings(config, class_names: Sequence[str], workdir) -> np.ndarray:
  """float32 [n, D] embeddings of `class_names` with the run's encoder and templates.

  Cached in `config.text.cache_dir`, else `<workdir>/text_cache`.
  """
  kwargs = {}
  if config.text.templates != "default":
    kwargs["templates"] = config.text.templates.split("|")
  cache = config.text.cache_dir or os.path.join(os.fspath(workdir), "text_cache")
  return text_lib.class_embeddings(
    list(class_names), encoder=config.text.encoder, cache_dir=cache, **kwargs
  )


def _entry_embeddings(config, entry, vocab, workdir) -> np.ndarray:
  if entry.text_embeddings:
    emb = np.load(entry.text_embeddings).astype(np.float32)
    if emb.shape[0] != len(vocab.class_names):
      raise ValueError(
        f"{entry.text_embeddings}: {emb.shape[0]} rows for "
        f"{len(vocab.class_names)} classes of {vocab.name!r}"
      )
    return emb
  if config.classifier == "learned":
    return np.zeros((len(vocab.class_names), config.model.classifier.text_dim), np.float32)
  return text_embeddings(config, vocab.class_names, workdir)


def build_vocabularies(config, workdir) -> dict[str, PaddedVocab]:
  """{train key | 'eval:<key>': PaddedVocab} of a config, padded to one static size V."""
  entries = [(k, e) for k, e in config.datasets.items()]
  entries += [(f"eval:{k}", e) for k, e in config.eval_datasets.items()]
  train_keys = list(config.datasets.keys())
  raw = {}
  for key, entry in entries:
    vocab = entry_vocabulary(entry)
    raw[key] = (vocab, _entry_embeddings(config, entry, vocab, workdir))
  size = static_size(config, {k: len(v.class_names) for k, (v, _) in raw.items()})
  out = {}
  for key, (vocab, emb) in raw.items():
    entry = (
      config.eval_datasets[key[len("eval:") :]] if key.startswith("eval:") else config.datasets[key]
    )
    # A learned classifier has rows only for training datasets (looked up by name).
    train_name = next((k for k in train_keys if config.datasets[k].name == entry.name), None)
    out[key] = pad(
      vocab.class_names,
      vocab.is_thing,
      emb,
      size,
      train_keys.index(train_name) if train_name is not None else -1,
    )
  return out


def from_names(
  config,
  vocabs: Mapping[str, PaddedVocab],
  size: int,
  class_names: Sequence[str],
  is_thing: Sequence[bool] | None,
  workdir,
) -> PaddedVocab:
  """Any list of names as a vocabulary of a built run (`vocabs`, padded size `size`).

  `is_thing` defaults to the flag of the same name in `vocabs`, else True (a thing).
  Padded to `size`, or to the next multiple of PAD_MULTIPLE for a longer list. A
  'learned' classifier only knows its training vocabularies.
  """
  class_names = [str(n) for n in class_names]
  n = len(class_names)
  if not n:
    raise ValueError("class_names is empty")
  if is_thing is None:
    is_thing = [_known_is_thing(vocabs, c) for c in class_names]
  if len(is_thing) != n:
    raise ValueError(f"is_thing has {len(is_thing)} entries for {n} class names")
  if n > size:
    size = -(-n // PAD_MULTIPLE) * PAD_MULTIPLE
  index = -1
  if config.classifier == "learned":
    for key, vocab in vocabs.items():
      if not key.startswith("eval:") and list(vocab.names) == class_names:
        index = vocab.index
    if index < 0:
      raise ValueError(
        "this run's classifier is 'learned' (per-dataset weights): it only "
        "predicts the vocabularies of its training datasets"
      )
    text = np.zeros((n, config.model.classifier.text_dim), np.float32)
  else:
    text = text_embeddings(config, class_names, workdir)
  return pad(class_names, is_thing, text, size, max(index, 0))


def _known_is_thing(vocabs, name) -> bool:
  for vocab in vocabs.values():
    if name in vocab.names:
      return bool(vocab.is_thing[vocab.names.index(name)])
  return True
