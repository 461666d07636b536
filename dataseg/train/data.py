"""Glue from a config to data: vocabularies + text embeddings, train mixture, eval batches.

Dataset-specific knowledge stays in input_pipeline/datasets.py (the registry) and the
readers; this module only turns config entries into readers, pipelines and the padded
per-dataset vocabulary arrays the train step takes as arguments.
"""

import os

import jax
import numpy as np

from dataseg import schema
from dataseg import text as text_lib
from dataseg import vocab as vocab_lib
from dataseg.train import trainer
from input_pipeline import datasets as datasets_lib
from input_pipeline import mixing
from input_pipeline import pipeline
from input_pipeline import synthetic


def default_evaluators(task):
  return datasets_lib.EVALUATORS_BY_TASK[task]


def _vocabulary(entry):
  info = datasets_lib.lookup(entry.name)
  name = entry.vocab or info["vocab"]
  if not name:
    raise ValueError(f"dataset {entry.name!r} needs `vocab` (a dataseg/vocab name)")
  return vocab_lib.load(name)


def _text_embeddings(config, entry, vocab, workdir):
  if entry.text_embeddings:
    emb = np.load(entry.text_embeddings).astype(np.float32)
    if emb.shape[0] != len(vocab.class_names):
      raise ValueError(f"{entry.text_embeddings}: {emb.shape[0]} rows for "
                       f"{len(vocab.class_names)} classes of {vocab.name!r}")
    return emb
  if config.classifier == "learned":
    return np.zeros((len(vocab.class_names), config.model.classifier.text_dim), np.float32)
  kwargs = {}
  if config.text.templates != "default":
    kwargs["templates"] = config.text.templates.split("|")
  cache = config.text.cache_dir or os.path.join(workdir, "text_cache")
  return text_lib.class_embeddings(vocab.class_names, encoder=config.text.encoder,
                                   cache_dir=cache, **kwargs)


def vocab_size(config, vocabs):
  largest = max(len(v.names) for v in vocabs.values())
  if config.vocab_size and config.vocab_size < largest:
    raise ValueError(f"config.vocab_size={config.vocab_size} < largest vocabulary ({largest})")
  return config.vocab_size or largest


def build_vocabularies(config, workdir):
  """{train key | 'eval:<key>': trainer.Vocab} padded to one static size V."""
  entries = [(k, e) for k, e in config.datasets.items()]
  entries += [(f"eval:{k}", e) for k, e in config.eval_datasets.items()]
  train_keys = list(config.datasets.keys())
  raw = {}
  for key, entry in entries:
    vocab = _vocabulary(entry)
    raw[key] = (vocab, _text_embeddings(config, entry, vocab, workdir))
  size = config.vocab_size or max(len(v.class_names) for v, _ in raw.values())
  out = {}
  for key, (vocab, emb) in raw.items():
    n = len(vocab.class_names)
    if n > size:
      raise ValueError(f"config.vocab_size={size} < {n} classes of {vocab.name!r}")
    pad = size - n
    name = key[len("eval:"):] if key.startswith("eval:") else key
    # A learned classifier has rows only for training datasets (looked up by name).
    train_name = next((k for k in train_keys
                       if config.datasets[k].name == (config.eval_datasets[name].name
                                                      if key.startswith("eval:") else
                                                      config.datasets[name].name)), None)
    out[key] = trainer.Vocab(
        names=tuple(vocab.class_names),
        is_thing=np.pad(np.asarray(vocab.is_thing, bool), (0, pad)),
        valid=np.arange(size) < n,
        text=np.pad(emb.astype(np.float32), ((0, pad), (0, 0))),
        index=train_keys.index(train_name) if train_name is not None else -1)
  return out


def reader_for(entry, data_dir, split, vocab_is_thing):
  """A pipeline.Reader for one config entry (synthetic builders or a reader spec)."""
  info = datasets_lib.lookup(entry.name)
  if info["source"] == "synthetic":
    builder = synthetic.builder(entry.name, data_dir)
    return (builder, split, lambda ex: synthetic.decode(ex, vocab_is_thing))
  return datasets_lib.reader_spec(entry.name, split, data_dir, entry.reader.to_dict(),
                                  entry.vocab)


class TrainData:
  """The training mixture: one pipeline per dataset, the dataset of step k from mixing."""

  def __init__(self, config, data_dir, vocabs):
    self.config = config
    self.names = list(config.datasets.keys())
    self.weights = [config.datasets[n].weight for n in self.names]
    n_proc = jax.process_count()
    if config.batch_size % n_proc:
      raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                       f"{n_proc} processes")
    if config.mixing == "quota":
      tasks = {config.datasets[n].task for n in self.names}
      if len(tasks) > 1:
        raise ValueError(f"config.mixing='quota' mixes datasets inside a batch, which needs "
                         f"one task; the config has {sorted(tasks)}")
      sizes = mixing.quotas(self.weights, config.batch_size // n_proc)
    else:
      sizes = [config.batch_size // n_proc] * len(self.names)
    iterators = []
    for i, (name, size) in enumerate(zip(self.names, sizes)):
      entry = config.datasets[name]
      iterators.append(pipeline.make_iterator(
          reader_for(entry, data_dir, entry.split, vocabs[name].is_thing),
          batch_size=size, image_size=config.image_size, max_segments=config.max_segments,
          task_id=schema.task_id(entry.task), dataset_id=i, training=True,
          seed=config.seed + 1000 * i, on_bad_input=config.on_bad_input,
          preprocess_kwargs=dict(
              scale_range=(config.augment.scale_min, config.augment.scale_max),
              flip=config.augment.flip, color_jitter=config.augment.color_jitter)))
    self.mixed = mixing.MixedIterator(iterators, self.weights, seed=config.seed,
                                      mode=config.mixing)

  def next(self, step):
    """(dataset key, host-local batch) of `step`."""
    if self.mixed.step != step:
      raise RuntimeError(f"data pipeline at step {self.mixed.step}, trainer at {step}")
    index = self.mixed.next_dataset() if self.config.mixing == "per_step" else 0
    return self.names[index], next(self.mixed)

  def state(self):
    return self.mixed.get_state()

  def restore(self, state):
    self.mixed.set_state(state)


def eval_batches(config, entry, data_dir, vocab):
  """Host-local padded eval batches (numpy) of one eval entry, one pass."""
  n_proc = jax.process_count()
  batch = max(1, config.eval_batch_size // n_proc)
  num_batches = None
  if config.max_eval_examples:
    num_batches = -(-config.max_eval_examples // (batch * n_proc))
  ds = pipeline.make_dataset(
      reader_for(entry, data_dir, entry.eval_split, vocab.is_thing), batch_size=batch,
      image_size=config.eval_image_size, max_segments=config.max_segments,
      task_id=schema.task_id(entry.task), training=False, on_bad_input=config.on_bad_input,
      num_eval_batches=num_batches)
  for b in ds.as_numpy_iterator():
    b.pop("segments_overflow", None)
    yield b
