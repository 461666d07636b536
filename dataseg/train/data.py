"""Glue from a config to data: the train mixture and the eval batches.

Dataset-specific knowledge stays in input_pipeline/datasets.py (the registry) and the
readers, vocabularies in dataseg/vocab/; this module only turns config entries into
readers and pipelines.
"""

import jax

from dataseg import schema
from input_pipeline import datasets as datasets_lib
from input_pipeline import mixing
from input_pipeline import pipeline
from input_pipeline import synthetic


def default_evaluators(task):
  return datasets_lib.EVALUATORS_BY_TASK[task]


def reader_for(entry, data_dir, split, vocab_is_thing):
  """A pipeline.Reader for one config entry (synthetic builders or a reader spec)."""
  info = datasets_lib.lookup(entry.name)
  if info["source"] == "synthetic":
    builder = synthetic.builder(entry.name, data_dir)
    return (builder, split, lambda ex: synthetic.decode(ex, vocab_is_thing))
  return datasets_lib.reader_spec(entry.name, split, data_dir, entry.reader.to_dict(), entry.vocab)


class TrainData:
  """The training mixture: one pipeline per dataset, the dataset of step k from mixing."""

  def __init__(self, config, data_dir, vocabs):
    self.config = config
    self.names = list(config.datasets.keys())
    self.weights = [config.datasets[n].weight for n in self.names]
    n_proc = jax.process_count()
    if config.batch_size % n_proc:
      raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by {n_proc} processes"
      )
    if config.mixing == "quota":
      tasks = {config.datasets[n].task for n in self.names}
      if len(tasks) > 1:
        raise ValueError(
          f"config.mixing='quota' mixes datasets inside a batch, which needs "
          f"one task; the config has {sorted(tasks)}"
        )
      sizes = mixing.quotas(self.weights, config.batch_size // n_proc)
    else:
      sizes = [config.batch_size // n_proc] * len(self.names)
    iterators = []
    for i, (name, size) in enumerate(zip(self.names, sizes)):
      entry = config.datasets[name]
      iterators.append(
        pipeline.make_iterator(
          reader_for(entry, data_dir, entry.split, vocabs[name].is_thing),
          batch_size=size,
          image_size=config.image_size,
          max_segments=config.max_segments,
          task_id=schema.task_id(entry.task),
          dataset_id=i,
          training=True,
          seed=config.seed + 1000 * i,
          on_bad_input=config.on_bad_input,
          preprocess_kwargs=dict(
            scale_range=(config.augment.scale_min, config.augment.scale_max),
            flip=config.augment.flip,
            color_jitter=config.augment.color_jitter,
          ),
        )
      )
    self.mixed = mixing.MixedIterator(iterators, self.weights, seed=config.seed, mode=config.mixing)

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
    reader_for(entry, data_dir, entry.eval_split, vocab.is_thing),
    batch_size=batch,
    image_size=config.eval_image_size,
    max_segments=config.max_segments,
    task_id=schema.task_id(entry.task),
    training=False,
    on_bad_input=config.on_bad_input,
    num_eval_batches=num_batches,
  )
  for b in ds.as_numpy_iterator():
    b.pop("segments_overflow", None)
    yield b
