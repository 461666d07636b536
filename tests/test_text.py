"""Class-name embeddings: MiniLM against a numpy BERT, semantics, ensembling, cache, CLI."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file
from scipy import special

from dataseg import text
from dataseg import vocab


@pytest.fixture(scope="module")
def minilm():
  return text.load_encoder("minilm")


def _numpy_minilm(sentences):
  """Reference: vocab.txt lookup + BERT forward in numpy + masked mean + L2 norm.

  Independent of transformers; sentences must hold only lowercase words that are
  whole entries of vocab.txt, and '.'.
  """
  d = text.minilm_dir()
  cfg = json.loads((d / "config.json").read_text())
  w = load_file(str(d / "model.safetensors"))
  tok = {t: i for i, t in enumerate((d / "vocab.txt").read_text().splitlines())}
  heads, eps = cfg["num_attention_heads"], cfg["layer_norm_eps"]

  def ln(x, p):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

  def dense(x, p):
    return x @ w[p + ".weight"].T + w[p + ".bias"]

  out = []
  for s in sentences:
    ids = [tok["[CLS]"]] + [tok[t] for t in s.replace(".", " .").split()]
    ids += [tok["[SEP]"]]
    n = len(ids)
    x = (
      w["embeddings.word_embeddings.weight"][ids]
      + w["embeddings.position_embeddings.weight"][:n]
      + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = ln(x.astype(np.float64), "embeddings.LayerNorm")
    for l in range(cfg["num_hidden_layers"]):
      p = f"encoder.layer.{l}."
      q, k, v = (
        dense(x, p + f"attention.self.{m}").reshape(n, heads, -1).transpose(1, 0, 2)
        for m in ("query", "key", "value")
      )
      att = special.softmax(q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1]), -1)
      ctx = (att @ v).transpose(1, 0, 2).reshape(n, -1)
      x = ln(x + dense(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
      h = dense(x, p + "intermediate.dense")
      h = 0.5 * h * (1 + special.erf(h / np.sqrt(2)))  # exact gelu
      x = ln(x + dense(h, p + "output.dense"), p + "output.LayerNorm")
    e = x.mean(0)
    out.append(e / np.linalg.norm(e))
  return np.stack(out)


def test_minilm_matches_numpy_bert(minilm):
  # Different lengths in one batch exercise padding and the attention mask.
  sentences = ["a photo of a sofa.", "there is a zebra in the scene.", "sky."]
  got = minilm(sentences)
  want = _numpy_minilm(sentences)
  assert got.shape == (3, 384) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_minilm_semantics(minilm, tmp_path):
  del minilm  # loaded once for the module through load_encoder's cache
  names = ["sofa", "couch", "zebra", "sky", "clouds", "toaster"]
  e = text.class_embeddings(names, cache_dir=tmp_path)
  assert e.shape == (6, 384) and e.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
  sim = {(a, b): float(e[names.index(a)] @ e[names.index(b)]) for a in names for b in names}
  assert sim["sofa", "couch"] > sim["sofa", "zebra"]
  assert sim["sky", "clouds"] > sim["sky", "toaster"]


def test_ensemble_is_mean_of_normalised_prompts(minilm, tmp_path):
  templates = ("a photo of a {}.", "there is a {} in the scene.")
  names = ["cat", "traffic light"]
  got = text.class_embeddings(names, templates=templates, cache_dir=tmp_path)
  want = []
  for n in names:
    f = minilm([t.format(n) for t in templates]).astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    m = f.mean(0)
    want.append(m / np.linalg.norm(m))
  np.testing.assert_allclose(got, np.stack(want), atol=1e-6)


class _CountingEncoder:
  """Deterministic fake: hashes each sentence to a random unit vector [B, 8]."""

  def __init__(self):
    self.loads = 0
    self.sentences = 0

  def load(self, name):
    del name
    self.loads += 1
    return self.encode

  def encode(self, sentences):
    self.sentences += len(sentences)
    seeds = [sum(map(ord, s)) * 7919 + len(s) for s in sentences]
    x = np.stack([np.random.default_rng(s).normal(size=8) for s in seeds])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_cache_hit_skips_encoder(tmp_path, monkeypatch):
  fake = _CountingEncoder()
  monkeypatch.setattr(text, "load_encoder", fake.load)
  names, templates = ["a", "b", "c"], ("{}.", "the {}.")
  first = text.class_embeddings(names, "fake", templates, tmp_path)
  assert fake.loads == 1 and fake.sentences == 6
  again = text.class_embeddings(names, "fake", templates, tmp_path)
  assert fake.loads == 1 and fake.sentences == 6  # served from disk
  np.testing.assert_array_equal(first, again)
  assert len(list(tmp_path.glob("*.npz"))) == 1
  # Any change of encoder, templates or names is a different entry.
  text.class_embeddings(names, "fake", templates[:1], tmp_path)
  text.class_embeddings(names[::-1], "fake", templates, tmp_path)
  text.class_embeddings(names, "fake2", templates, tmp_path)
  assert fake.loads == 4 and len(list(tmp_path.glob("*.npz"))) == 4


def test_cache_hit_for_minilm_without_loading(minilm, tmp_path, monkeypatch):
  del minilm
  first = text.class_embeddings(["road", "car"], cache_dir=tmp_path)

  def no_load(name):
    raise AssertionError(f"encoder {name} loaded on a cache hit")

  monkeypatch.setattr(text, "load_encoder", no_load)
  np.testing.assert_array_equal(text.class_embeddings(["road", "car"], cache_dir=tmp_path), first)


def test_cli_vocab_and_names(tmp_path, monkeypatch):
  fake = _CountingEncoder()
  monkeypatch.setattr(text, "load_encoder", fake.load)
  out = tmp_path / "city.npy"
  text.main(["--vocab=cityscapes", "--encoder=fake", f"--out={out}", f"--cache_dir={tmp_path}"])
  names = vocab.load("cityscapes").class_names
  np.testing.assert_array_equal(
    np.load(out), text.class_embeddings(names, "fake", cache_dir=tmp_path)
  )
  out2 = tmp_path / "n.npy"
  text.main(
    [
      "--names=sofa, couch",
      "--encoder=fake",
      f"--out={out2}",
      f"--cache_dir={tmp_path}",
      "--templates={}|a {}",
    ]
  )
  np.testing.assert_array_equal(
    np.load(out2), text.ensemble(fake.encode, ["sofa", "couch"], ["{}", "a {}"])
  )


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown text encoder"):
    text.load_encoder("word2vec")
  with pytest.raises(ValueError, match="template"):
    text.class_embeddings(["a"], templates=("no slot",))


def _tiny_clip_dir(path):
  """Random 2-layer CLIP text tower and a byte-level tokenizer without merges."""
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.models.clip import tokenization_clip  # pylint: disable=g-import-not-at-top

  chars = list(tokenization_clip.bytes_to_unicode().values())
  tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
  (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
  (path / "merges.txt").write_text("#version: 0.2\n")
  tok = transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
  tok.save_pretrained(path)
  cfg = transformers.CLIPTextConfig(
    vocab_size=len(tokens),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=16,
    bos_token_id=len(tokens) - 2,
    eos_token_id=len(tokens) - 1,
    pad_token_id=len(tokens) - 1,
  )
  model = transformers.FlaxCLIPTextModelWithProjection(cfg, seed=0)
  model.save_pretrained(path)
  return tok, model


def test_clip_code_path_on_tiny_random_model(tmp_path):
  tok, model = _tiny_clip_dir(tmp_path)
  enc = text.load_clip(str(tmp_path))
  sentences = ["a photo of a cat.", "sky", "there is a traffic light here."]
  got = enc(sentences)
  assert got.shape == (3, 16)
  # Reference: the transformers model on each sentence alone (no padding).
  for s, g in zip(sentences, got):
    ids = tok([s], return_tensors="np")
    want = np.asarray(model(ids["input_ids"], ids["attention_mask"]).text_embeds)[0]
    np.testing.assert_allclose(g, want / np.linalg.norm(want), atol=1e-5)
