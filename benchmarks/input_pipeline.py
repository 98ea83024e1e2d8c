"""Examples per second of the input pipeline, against what the train step consumes.

  python benchmarks/input_pipeline.py [--image_size=128] [--batch=1,8,64] [--batches=50]
      [--pipelines=synthetic,synthetic_tfds,image_folders]

Batches/s and img/s of each dataset's `train_batch`, alone and including the copy to
the devices (`shard`):
  synthetic       shapes rendered with numpy on the host (a pure function of seed and step);
  synthetic_tfds  the same shapes stored as the `synthetic_shapes` TFDS dataset (array_record,
                  built into a temporary directory first) and read by `pipeline.RecordLayers`;
  image_folders   a generated tree of 480x640 JPEG photos per folder (the size of typical
                  real data), read from TFDS with the Sec. 4 augmentation (resize to
                  base_size 256, random scale 0.8-1.2, crop to --image_size, flip). A training step of T ms needs at least 1000/T
batches/s; compare with `benchmarks/train_step.py`'s ms_per_step on the same batch.
The loop renders each batch on the host while the device still runs the previous
step (dispatch is asynchronous), so input is hidden while render time < step time.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _folder_tree(root: str, count: int) -> str:
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(0)
  for name in ("mixtures", "background", "reflection"):
    os.makedirs(os.path.join(root, name))
    for i in range(count):
      # smooth random images compress like photos (noise would not)
      small = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
      Image.fromarray(small).resize((640, 480), Image.BILINEAR).save(os.path.join(root, name, f"{i:04d}.jpg"))
  return root


def make_data(kind: str, image_size: int, shapes, tmp: str):
  from sils_jax.data.synthetic import SyntheticLayers
  if kind == "synthetic":
    return SyntheticLayers(image_size=image_size, shapes=shapes)
  from sils_jax.data import builders, pipeline
  if kind == "synthetic_tfds":
    b = builders.prepare("synthetic_shapes", data_dir=tmp, image_size=image_size, shapes=shapes,
                         num_train=400, num_test=10, seed=0)
    return pipeline.RecordLayers(builders.data_sources(b), num_layers=len(shapes), image_size=image_size,
                                 augment=False, name=kind)
  if kind == "image_folders":
    manual = _folder_tree(os.path.join(tmp, "folders"), 100)
    b = builders.prepare("image_folders", data_dir=tmp, manual_dir=manual,
                         dirs=("mixtures", "background", "reflection"), layer_names=("background", "reflection"),
                         blend_mode="additive")
    return pipeline.RecordLayers(builders.data_sources(b), num_layers=2, image_size=image_size,
                                 augment=True, base_size=256, name=kind)
  raise ValueError(f"--pipelines: unknown pipeline {kind!r}")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--image_size", type=int, default=128)
  p.add_argument("--batch", default="1,8,64")
  p.add_argument("--batches", type=int, default=50)
  p.add_argument("--layers", type=int, default=2, help="2: square, circle; 3: + triangle")
  p.add_argument("--pipelines", default="synthetic")
  args = p.parse_args()
  import tempfile
  import jax
  from sils_jax.training.devices import shard
  shapes = ("square", "circle", "triangle")[:args.layers]
  with tempfile.TemporaryDirectory() as tmp:
    for kind in args.pipelines.split(","):
      run(kind, make_data(kind, args.image_size, shapes, tmp), args, jax, shard)


def run(kind, data, args, jax, shard):
  for b in (int(v) for v in args.batch.split(",")):
    data.train_batch(0, b)
    t = time.perf_counter()
    for s in range(args.batches):
      data.train_batch(s, b)
    host = time.perf_counter() - t
    t = time.perf_counter()
    for s in range(args.batches):
      out = shard(data.train_batch(s, b))
    jax.block_until_ready(out)
    dev = time.perf_counter() - t
    print(json.dumps({"pipeline": kind, "device": f"{jax.devices()[0].platform}", "image_size": args.image_size,
                      "num_layers": data.num_layers, "batch": b,
                      "host_batches_per_s": round(args.batches / host, 2),
                      "host_img_per_s": round(args.batches * b / host, 1),
                      "to_device_batches_per_s": round(args.batches / dev, 2),
                      "ms_per_batch": round(dev / args.batches * 1e3, 3)}), flush=True)


if __name__ == "__main__":
  main()
