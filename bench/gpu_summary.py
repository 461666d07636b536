r"""One JSON summary of a bench/gpu.sh log (the README's GPU table is made from it).

  python bench/gpu_summary.py $OUT/gpu.txt > $OUT/gpu_summary.json

Reads the log's header (date, GPU, versions), its `## <part>:` markers and the JSON lines
each benchmark prints, and writes one object: per part, its exit status and seconds, our
and the reference's figures (train step: init, compile, from cache or not, first step
after process start, step seconds, images/s, MFU; inference: compile, images/s per batch)
and the ratios (train step: ours / reference time, target <= 0.5; inference: speed-up,
target >= 2). Parts that did not finish are present with what they printed.
"""

import json
import re
import sys


def main(path):
  header, parts, part = [], {}, None
  with open(path) as f:
    for line in f:
      line = line.rstrip("\n")
      m = re.match(r"## (\w+): exit (\d+) after (\d+) s \(limit (\d+) s\)", line)
      if m:
        parts[m.group(1)].update(
          exit=int(m.group(2)), seconds=int(m.group(3)), limit_s=int(m.group(4))
        )
        continue
      m = re.match(r"## (\w+): (.*)", line)
      if m:
        part = m.group(1)
        parts[part] = dict(command=m.group(2), results=[], lines=[])
        continue
      if part is None:
        header.append(line)
      elif line.startswith("{"):
        try:
          parts[part]["results"].append(json.loads(line))
        except json.JSONDecodeError:
          parts[part]["lines"].append(line)
      elif line.strip():
        parts[part]["lines"].append(line[:300])
  summary = dict(header=header, parts=parts)

  def first(part, **match):
    for r in parts.get(part, {}).get("results", []):
      if all(r.get(k) == v for k, v in match.items()):
        return r
    return None

  ours, ref = first("train_cold", side="ours"), first("train_reference", side="reference")
  if ours and ref and ref.get("seconds"):
    summary["train_ratio_ours_over_reference"] = ours["seconds"] / ref["seconds"]
  for batch in (1, 8):
    o = first("infer_ours", side="ours", batch=batch)
    r = first("infer_reference", side="reference", batch=batch)
    if o and r and r.get("images_per_s"):
      summary[f"inference_speedup_batch{batch}"] = o["images_per_s"] / r["images_per_s"]
  json.dump(summary, sys.stdout, indent=1)
  print()


if __name__ == "__main__":
  main(sys.argv[1])
