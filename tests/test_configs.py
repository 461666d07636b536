"""Every config file builds with its documented arguments; bad keys and values fail clearly.

Also: the launch scripts parse (`bash -n`) and the configs they and the docstrings name
exist. One subprocess runs dataseg.main with an unknown `--config.x` override.
"""

import importlib
import pathlib
import re
import subprocess
import sys

import pytest

from configs import common
from configs import paper_common
from dataseg import config_lib
from dataseg import schema
from input_pipeline import datasets as datasets_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
HELPERS = {"__init__", "common", "paper_common"}
CONFIG_FILES = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in HELPERS)
PAPER = (
  "ade20k_r50",
  "coco_r50",
  "objects365_r50",
  "joint_r50",
  "joint_vitdet_b",
  "joint_vitdet_l",
)
# Arguments every paper config documents (configs/paper_common.py).
PAPER_ARGS = (
  None,
  "backbone=vitdet_b",
  "backbone=r50",
  "backbone=vitdet_l",
  "fsdp",
  "fp32,remat",
  "text=clip_b,steps=10,batch=8,res=512",
  "scratch",
)


def _documented_args(stem):
  """None plus every `configs/<stem>.py:ARGS` written in the file's docstring."""
  module = importlib.import_module(f"configs.{stem}")
  found = re.findall(rf"configs/{stem}\.py:([^\s`'\"]+)", module.__doc__ or "")
  return [None] + sorted(set(found))


def _cases():
  for stem in CONFIG_FILES:
    args = _documented_args(stem)
    if stem in PAPER:
      args += [a for a in PAPER_ARGS if a not in args]
    for arg in args:
      yield stem, arg


def test_config_files_found():
  assert set(PAPER) <= set(CONFIG_FILES) and "demo" in CONFIG_FILES


@pytest.mark.parametrize("stem,arg", list(_cases()))
def test_builds_and_validates(stem, arg):
  config = importlib.import_module(f"configs.{stem}").get_config(arg)
  config_lib.validate(config)
  assert config.datasets or config.eval_datasets
  for group in ("datasets", "eval_datasets"):
    for entry in config[group].values():
      assert entry.task in datasets_lib.lookup(entry.name)["tasks"]
      assert entry.task in schema.TASKS
  common_keys = set(common.base_config().keys())
  assert set(config.keys()) == common_keys, "configs set only base_config()'s keys"
  config.lock()  # what config_flags(lock_config=True) does: must not fail.


@pytest.mark.parametrize("stem", PAPER)
def test_paper_recipe(stem):
  """1024 LSJ 0.1-2.0, AdamW per METHOD.md, CLIP-L/14 text, the file's backbone."""
  c = importlib.import_module(f"configs.{stem}").get_config()
  assert c.image_size == c.eval_image_size == 1024
  assert (c.augment.scale_min, c.augment.scale_max) == (0.1, 2.0)
  assert (c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.backbone_multiplier) == (
    1e-4,
    0.05,
    0.1,
  )
  assert c.text.encoder == "clip:openai/clip-vit-large-patch14"
  assert c.model.classifier.text_dim == 768
  assert c.classifier == "text"
  assert c.batch_size % 64 == 0  # one image per chip of the README's 64-chip mesh.
  assert c.mesh.data == -1 and c.mesh.fsdp == 1
  want = "vitdet" if "vitdet" in stem else "resnet"
  assert c.model.backbone.name == want
  # The pretrained weights file it expects, and nothing pretrained with `scratch`.
  from dataseg.model import configs as model_configs  # pylint: disable=g-import-not-at-top

  backbone = stem.split("_", 1)[1] if "vitdet" in stem else "r50"
  assert c.model.backbone.pretrained == model_configs.PRETRAINED[backbone].file
  assert (
    importlib.import_module(f"configs.{stem}").get_config("scratch").model.backbone.pretrained == ""
  )
  other = importlib.import_module(f"configs.{stem}").get_config(
    "backbone=" + ("r50" if want == "vitdet" else "vitdet_b")
  )
  assert other.model.backbone.name != want


def test_paper_datasets_and_tasks():
  tasks = lambda c: {e.name: e.task for e in c.datasets.values()}
  get = lambda stem, arg=None: importlib.import_module(f"configs.{stem}").get_config(arg)
  assert tasks(get("ade20k_r50")) == {"ade20k": "semantic"}
  assert tasks(get("coco_r50")) == {"coco_panoptic": "panoptic"}
  assert tasks(get("objects365_r50")) == {"objects365": "boxes"}
  joint = get("joint_r50")
  assert tasks(joint) == {"ade20k": "semantic", "coco_panoptic": "panoptic", "objects365": "boxes"}
  evals = {e.name: e.task for e in joint.eval_datasets.values()}
  assert evals["cityscapes"] == "panoptic" and evals["pascal_context"] == "semantic"
  assert evals["objects365_masks"] == "instance"
  # The ViTDet-B file is the joint run with another backbone, nothing else.
  a, b = get("joint_vitdet_b").to_dict(), get("joint_r50", "backbone=vitdet_b").to_dict()
  assert a == b
  a, b = get("joint_vitdet_l").to_dict(), get("joint_r50", "backbone=vitdet_l").to_dict()
  assert a == b
  assert (
    a["model"]["backbone"]["width"],
    a["model"]["backbone"]["depth"],
    a["model"]["decoder"]["num_queries"],
  ) == (1024, 24, 200)


def test_fsdp_argument_switches_rules_and_mesh():
  c = importlib.import_module("configs.joint_r50").get_config("fsdp")
  assert dict(c.sharding_rules)["embed"] == "fsdp"
  assert (c.mesh.data, c.mesh.fsdp) == (1, -1)


@pytest.mark.parametrize(
  "stem,arg,match",
  [
    ("joint_r50", "bogus=1", "'bogus' is unknown"),
    ("joint_r50", "backbone=r18", "backbone='r18' is unknown"),
    ("coco_r50", "text=t5", "text='t5' is unknown"),
    ("demo", "variant=nope", "variant='nope' is unknown"),
    ("demo", "colour=1", "'colour' is unknown"),
  ],
)
def test_bad_get_config_argument(stem, arg, match):
  with pytest.raises(ValueError, match=match):
    importlib.import_module(f"configs.{stem}").get_config(arg)


def test_unknown_dataset_and_task_fail_naming_them():
  c = importlib.import_module("configs.joint_r50").get_config()
  c.datasets.extra = common.dataset("coco_panoptics", "panoptic")
  with pytest.raises(ValueError, match=r"datasets\.extra\.name = 'coco_panoptics'.*ade20k"):
    config_lib.validate(c)
  c = importlib.import_module("configs.joint_r50").get_config()
  c.datasets.ade20k.task = "depth"
  with pytest.raises(ValueError, match=r"datasets\.ade20k\.task = 'depth'"):
    config_lib.validate(c)
  c = importlib.import_module("configs.joint_r50").get_config()
  c.datasets.ade20k.task = "boxes"  # a real task that ADE20k cannot train.
  with pytest.raises(ValueError, match="supports tasks semantic, panoptic"):
    config_lib.validate(c)


def test_locked_config_rejects_new_keys():
  c = importlib.import_module("configs.coco_r50").get_config()
  c.lock()
  with pytest.raises(AttributeError, match="nonexistent"):
    c.nonexistent = 1
  c.total_steps = 7  # existing keys stay writable.


def test_unknown_override_key_fails_on_the_command_line(tmp_path):
  """config_flags(lock_config=True): an unknown --config.x stops dataseg.main, naming x."""
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "dataseg.main",
      "--config=configs/demo.py:smoke",
      "--config.nonexistent=1",
      f"--workdir={tmp_path}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
  )
  assert proc.returncode != 0
  assert "nonexistent" in proc.stderr
  assert not (tmp_path / "checkpoints").exists()


LAUNCH = sorted((ROOT / "launch").glob("*.sh"))


@pytest.mark.parametrize("script", [p.name for p in LAUNCH])
def test_launch_script_parses(script):
  proc = subprocess.run(
    ["bash", "-n", str(ROOT / "launch" / script)], capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr


def test_launch_scripts_present():
  assert {"cpu.sh", "gpu.sh", "tpu_pod.sh", "slurm.sh"} <= {p.name for p in LAUNCH}


def test_cpu_sh_without_arguments_prints_usage():
  proc = subprocess.run(
    ["bash", str(ROOT / "launch" / "cpu.sh")], capture_output=True, text=True, timeout=30
  )
  assert proc.returncode == 2 and "launch/cpu.sh CONFIG WORKDIR" in proc.stdout


def test_named_configs_exist():
  """Every configs/<x>.py named by a launch script or a config docstring is a real file."""
  texts = [p.read_text() for p in LAUNCH]
  texts += [p.read_text() for p in (ROOT / "configs").glob("*.py")]
  named = {m for t in texts for m in re.findall(r"configs/(\w+)\.py", t)}
  assert named, "expected the scripts to name configs"
  missing = sorted(n for n in named if not (ROOT / "configs" / f"{n}.py").exists())
  assert not missing, missing
  assert set(paper_common.BACKBONES) == {"r50", "vitdet_b", "vitdet_l"}


@pytest.mark.parametrize("backbone", paper_common.BACKBONES)
def test_fsdp_rules_divide_every_sharded_parameter(backbone):
  """With `:fsdp` on an 8-way fsdp axis, every dimension the rules shard divides by 8.

  Abstract shapes only (jax.eval_shape of the model's init); a 256 px image is enough, the
  parameter shapes do not depend on it beyond the position table.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from dataseg.model import dataseg_model  # pylint: disable=g-import-not-at-top

  c = importlib.import_module("configs.joint_r50").get_config(f"backbone={backbone},fsdp")
  model = dataseg_model.build_model(c.model)
  v, d = 365, c.model.classifier.text_dim
  boxed = jax.eval_shape(
    lambda: model.init(
      jax.random.PRNGKey(0),
      jnp.zeros((1, 256, 256, 3), jnp.uint8),
      jnp.zeros((v, d)),
      jnp.ones((v,), bool),
      train=False,
    )
  )
  rules = dict(c.sharding_rules)
  specs = nn.get_partition_spec(boxed)
  shapes = nn.meta.unbox(boxed)
  leaves_spec = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  leaves_shape = jax.tree.leaves(shapes)
  assert len(leaves_spec) == len(leaves_shape)
  sharded = 0
  for spec, leaf in zip(leaves_spec, leaves_shape):
    for name, size in zip(tuple(spec), leaf.shape):
      if name is not None and rules.get(name) == "fsdp":
        sharded += 1
        assert size % 8 == 0, (name, leaf.shape)
  assert sharded > 50  # most weights are split.
