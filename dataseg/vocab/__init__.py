"""Dataset vocabularies: class names, thing/stuff flags and original ids.

DaTaSeg never learns a per-dataset classifier: each dataset is a list of class names
whose frozen text embeddings score the mask proposals. The lists live next to this
module as COCO-panoptic-style category files,

  {"source": "...", "categories": [{"id": 7, "name": "road", "isthing": 0,
                                    "prompt_name"?: "road", "synonyms"?: [...]}]}

`name` keeps the dataset's own spelling (matched against its annotation files);
`prompt_name` is the readable form sent to the text encoder ("wall-other-merged" ->
"wall"), defaulting to `name`. Contiguous ids 0..V-1 follow the file order; models,
readers and evaluators use them, exports map them back with `contiguous_to_id`.
What the model takes (text embeddings padded to the run's static size) is built in
`dataseg/vocab/padded.py`.
"""

import dataclasses
import json
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

_DIR = pathlib.Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """One dataset's label space in contiguous order.

  Attributes:
    name: vocabulary name, e.g. "coco_panoptic".
    class_names: [V] names for prompts (`prompt_name`, else `name`).
    raw_names: [V] names as spelled by the dataset.
    is_thing: bool [V].
    original_ids: int64 [V] dataset category id of each contiguous id.
    id_to_contiguous: dataset id -> contiguous id.
    contiguous_to_id: contiguous id -> dataset id.
    synonyms: [V] tuples of alternative names (may be empty).
    source: where the list comes from.
  """

  name: str
  class_names: tuple[str, ...]
  raw_names: tuple[str, ...]
  is_thing: np.ndarray
  original_ids: np.ndarray
  id_to_contiguous: Mapping[int, int]
  contiguous_to_id: Mapping[int, int]
  synonyms: tuple[tuple[str, ...], ...]
  source: str

  def __len__(self) -> int:
    return len(self.class_names)

  @property
  def num_things(self) -> int:
    return int(self.is_thing.sum())

  @property
  def num_stuff(self) -> int:
    return len(self) - self.num_things


def available() -> tuple[str, ...]:
  """Names of the packaged vocabularies."""
  return tuple(sorted(p.stem for p in _DIR.glob("*.json")))


def from_categories(
  name: str, categories: Sequence[Mapping[str, Any]], source: str = "user"
) -> Vocabulary:
  """Builds a vocabulary from a COCO `categories` list (order = contiguous ids).

  Entries need `id` and `name`; `isthing` defaults to 1 (COCO detection files have
  no such field and only hold things).
  """
  if not categories:
    raise ValueError(f"vocabulary {name!r} has no categories")
  ids = [int(c["id"]) for c in categories]
  if len(set(ids)) != len(ids):
    raise ValueError(f"vocabulary {name!r} has duplicate category ids")
  class_names = tuple(str(c.get("prompt_name") or c["name"]).strip() for c in categories)
  return Vocabulary(
    name=name,
    class_names=class_names,
    raw_names=tuple(str(c["name"]) for c in categories),
    is_thing=np.array([bool(c.get("isthing", 1)) for c in categories], np.bool_),
    original_ids=np.array(ids, np.int64),
    id_to_contiguous={i: k for k, i in enumerate(ids)},
    contiguous_to_id={k: i for k, i in enumerate(ids)},
    synonyms=tuple(tuple(c.get("synonyms", ())) for c in categories),
    source=source,
  )


def load(name: str) -> Vocabulary:
  """Loads the packaged vocabulary `name` (a file dataseg/vocab/<name>.json)."""
  path = _DIR / f"{name}.json"
  if "/" in name or not path.is_file():
    raise ValueError(f"unknown vocabulary {name!r}; available: {', '.join(available())}")
  with path.open() as f:
    data = json.load(f)
  return from_categories(name, data["categories"], source=data.get("source", ""))
