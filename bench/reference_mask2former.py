"""The reference: Hugging Face transformers' Mask2Former (PyTorch), timed like ours.

Runs in the reference's own environment (bench/ref_env.sh -> bench/.ref_venv, torch CPU
build pinned), never in the project's .venv:

  bench/.ref_venv/bin/python bench/reference_mask2former.py --mode train --size 256 --batch 2
  bench/.ref_venv/bin/python bench/reference_mask2former.py --mode infer --size 512 --batch 1

Model: `Mask2FormerForUniversalSegmentation` from a `Mask2FormerConfig`, random init, no
download: ResNet-50 backbone (transformers' own ResNetConfig, not timm, not pretrained),
multi-scale deformable pixel decoder (6 layers, 256 wide), 100 queries, 9 masked-attention
decoder layers (HF's `decoder_layers=10` counts the initial prediction: the decoder builds
`decoder_layers - 1` layers), 112 * 112 training points, 133 classes.

Train mode: forward with `mask_labels` / `class_labels` (Hungarian matching with scipy and
the point-sampled losses on every layer), backward, AdamW step (lr 1e-4, wd 0.05). Infer
mode: eval forward under torch.inference_mode + `post_process_panoptic_segmentation` at the
input size. Parts mode (bench/parts.py): forward and forward + backward CPU time of the
backbone and of the pixel decoder alone (random input and output cotangents), and of the
whole forward + loss + backward. Prints one JSON line: median seconds per step / batch,
images/s, threads, and the median process CPU seconds per step (all threads; on a shared
machine the ratio of CPU seconds is steadier than that of wall-clock seconds).

The synthetic panoptic batch generator below is pure numpy so both sides (this script and
bench/train_step.py) draw the same data.
"""

import argparse  # not absl: this runs in bench/.ref_venv (torch, transformers; no absl).
import json
import os
import resource
import time

import numpy as np

NUM_CLASSES = 133
NUM_THINGS = 80  # COCO panoptic: classes 0..79 are things, 80..132 stuff.


def synthetic_panoptic(
  seed: int,
  batch: int,
  size: int,
  max_segments: int = 100,
  num_segments: int = 20,
  num_things: int = 12,
):
  """A panoptic batch of the schema (dataseg/schema.py) and the reference's targets.

  Each image is a Voronoi partition of `num_segments` random seeds: the first
  `num_things` cells are thing instances (classes < 80, repeats allowed), the others stuff
  (classes >= 80, repeats allowed: same-class stuff cells form one target). The last
  cell is void (-1). Returns (schema dict of numpy arrays with leading batch dim,
  list of (masks [n, H, W] float32, classes [n] int64) per image for the reference).
  """
  rng = np.random.default_rng(seed)
  fields = dict(
    image=np.zeros((batch, size, size, 3), np.uint8),
    valid=np.ones((batch, size, size), bool),
    segment_map=np.full((batch, size, size), -1, np.int32),
    seg_class=np.full((batch, max_segments), -1, np.int32),
    seg_box=np.zeros((batch, max_segments, 4), np.float32),
    seg_is_thing=np.zeros((batch, max_segments), bool),
    seg_is_crowd=np.zeros((batch, max_segments), bool),
    seg_valid=np.zeros((batch, max_segments), bool),
    task=np.zeros((batch,), np.int32),  # schema.TASKS.index('panoptic')
    dataset_id=np.zeros((batch,), np.int32),
    image_id=np.arange(batch, dtype=np.int64),
    orig_size=np.full((batch, 2), size, np.int32),
    example_valid=np.ones((batch,), bool),
  )
  ref_targets = []
  ys, xs = np.meshgrid(
    np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij"
  )
  for b in range(batch):
    seeds = rng.uniform(0, size, (num_segments, 2)).astype(np.float32)
    dist = (ys[None] - seeds[:, 0, None, None]) ** 2 + (xs[None] - seeds[:, 1, None, None]) ** 2
    cell = np.argmin(dist, 0).astype(np.int32)  # [H, W]
    n = num_segments - 1  # last cell: void.
    cls = np.concatenate(
      [
        rng.integers(0, NUM_THINGS, num_things),
        rng.integers(NUM_THINGS, NUM_CLASSES, n - num_things),
      ]
    )
    fields["segment_map"][b] = np.where(cell < n, cell, -1)
    colours = rng.integers(0, 256, (num_segments, 3)).astype(np.uint8)
    noise = rng.integers(0, 32, (size, size, 3)).astype(np.uint8)
    fields["image"][b] = colours[cell] // 2 + noise
    fields["seg_class"][b, :n] = cls
    fields["seg_is_thing"][b, :n] = cls < NUM_THINGS
    fields["seg_valid"][b, :n] = True
    masks, labels = [], []
    for s in range(n):
      m = cell == s
      yy, xx = np.nonzero(m)
      if len(yy):
        fields["seg_box"][b, s] = (yy.min(), xx.min(), yy.max() + 1, xx.max() + 1)
      if cls[s] < NUM_THINGS:
        masks.append(m)
        labels.append(cls[s])
      elif cls[s] not in labels:  # stuff: one target per class (the union).
        masks.append(np.isin(cell, np.nonzero(cls == cls[s])[0]))
        labels.append(cls[s])
    ref_targets.append((np.stack(masks).astype(np.float32), np.asarray(labels, np.int64)))
  return fields, ref_targets


def build_reference(num_points: int = 112 * 112):
  import transformers  # pylint: disable=g-import-not-at-top

  backbone = transformers.ResNetConfig(
    depths=[3, 4, 6, 3],
    hidden_sizes=[256, 512, 1024, 2048],
    layer_type="bottleneck",
    out_features=["stage1", "stage2", "stage3", "stage4"],
  )
  config = transformers.Mask2FormerConfig(
    backbone_config=backbone,
    use_timm_backbone=False,
    use_pretrained_backbone=False,
    num_labels=NUM_CLASSES,
    num_queries=100,
    decoder_layers=10,
    encoder_layers=6,
    hidden_dim=256,
    feature_size=256,
    mask_feature_size=256,
    dim_feedforward=2048,
    encoder_feedforward_dim=1024,
    train_num_points=num_points,
  )
  model = transformers.Mask2FormerForUniversalSegmentation(config)
  assert len(model.model.transformer_module.decoder.layers) == 9
  return model, config


def time_parts(model, pixel_values, mask_labels, class_labels, args):
  """bench/parts.py's figures of the reference (CPU): seconds of process CPU time."""
  import torch  # pylint: disable=g-import-not-at-top

  def cpu_time(f):
    f()
    times = []
    for _ in range(args.steps):
      start = time.process_time()
      f()
      times.append(time.process_time() - start)
    return float(np.median(times))

  model.train()
  level = model.model.pixel_level_module
  generator = torch.Generator().manual_seed(0)
  out = dict(side="reference", torch=torch.__version__, size=args.size, batch=args.batch)

  def part(name, fn, inputs):
    """fn: list of tensors -> list of tensors; times it alone and with its backward."""
    with torch.no_grad():
      outputs = fn(inputs)
    cots = [torch.randn(o.shape, generator=generator) for o in outputs]

    def forward():
      with torch.no_grad():
        fn(inputs)

    def forward_backward():
      outs = fn([x.detach().requires_grad_(True) for x in inputs])
      sum((o * c).sum() for o, c in zip(outs, cots)).backward()

    out[f"{name}_fwd"], out[name] = cpu_time(forward), cpu_time(forward_backward)
    return outputs

  images = torch.randn(pixel_values.shape, generator=generator)
  features = part("backbone", lambda x: list(level.encoder(x[0]).feature_maps), [images])

  def pixel_decoder(feats):
    o = level.decoder(feats, output_hidden_states=True)
    return [o.mask_features, *o.multi_scale_features]

  part("pixel_decoder", pixel_decoder, features)

  def full():
    model.zero_grad(set_to_none=True)
    outputs = model(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels)
    outputs.loss.backward()

  out["full"] = cpu_time(full)
  out["rest"] = out["full"] - out["backbone"] - out["pixel_decoder"]
  return out


def _sync(device):
  import torch  # pylint: disable=g-import-not-at-top

  if device.type == "cuda":
    torch.cuda.synchronize()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--mode", choices=("train", "infer", "parts"), default="train")
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--device", default="cpu")
  parser.add_argument("--bf16", action="store_true", help="autocast bf16 (GPU)")
  parser.add_argument("--num_points", type=int, default=112 * 112)
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  device = torch.device(args.device)
  model, _ = build_reference(args.num_points)
  model.to(device)
  fields, targets = synthetic_panoptic(0, args.batch, args.size)
  mean = np.asarray([123.675, 116.28, 103.53], np.float32)
  std = np.asarray([58.395, 57.12, 57.375], np.float32)
  pixels = ((fields["image"].astype(np.float32) - mean) / std).transpose(0, 3, 1, 2)
  pixel_values = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
  mask_labels = [torch.from_numpy(m).to(device) for m, _ in targets]
  class_labels = [torch.from_numpy(c).to(device) for _, c in targets]
  if args.mode == "parts":
    print(json.dumps(time_parts(model, pixel_values, mask_labels, class_labels, args)))
    return
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
  times, cpu_times, usage = [], [], []
  if args.mode == "train":
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step():
      with autocast:
        out = model(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels)
      opt.zero_grad(set_to_none=True)
      out.loss.backward()
      opt.step()
      return out.loss
  else:
    model.eval()
    processor = transformers.Mask2FormerImageProcessor()
    sizes = [(args.size, args.size)] * args.batch

    def step():
      with torch.inference_mode(), autocast:
        out = model(pixel_values=pixel_values)
        out.class_queries_logits = out.class_queries_logits.float()
        out.masks_queries_logits = out.masks_queries_logits.float()
        return processor.post_process_panoptic_segmentation(
          out, threshold=0.8, overlap_mask_area_threshold=0.8, target_sizes=sizes
        )

  for i in range(args.warmup + args.steps):
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    step()
    _sync(device)
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
      ru1 = resource.getrusage(resource.RUSAGE_SELF)
      usage.append(
        (ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime, ru1.ru_minflt - ru0.ru_minflt)
      )
  med = float(np.median(times))
  print(
    json.dumps(
      dict(
        side="reference",
        impl="transformers.Mask2FormerForUniversalSegmentation",
        torch=torch.__version__,
        transformers=transformers.__version__,
        mode=args.mode,
        size=args.size,
        batch=args.batch,
        device=str(device),
        bf16=args.bf16,
        threads=torch.get_num_threads(),
        steps=len(times),
        seconds=med,
        images_per_s=args.batch / med,
        all_seconds=times,
        cpu_seconds=float(np.median(cpu_times)),
        user_seconds=float(np.median([u[0] for u in usage])),
        sys_seconds=float(np.median([u[1] for u in usage])),
        minor_faults=float(np.median([u[2] for u in usage])),
        malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        params=sum(p.numel() for p in model.parameters()),
      )
    )
  )


if __name__ == "__main__":
  main()
