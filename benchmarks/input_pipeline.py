"""Examples per second of the input pipeline, against what the train step consumes.

  python benchmarks/input_pipeline.py [--image_size=128] [--batch=1,8,64] [--batches=50]

For the synthetic data (rendered with numpy on the host, a pure function of seed and
step): batches/s and img/s of `SyntheticLayers.train_batch`, alone and including the
copy to the devices (`shard`). A training step of T ms needs at least 1000/T
batches/s; compare with `benchmarks/train_step.py`'s ms_per_step on the same batch.
The loop renders each batch on the host while the device still runs the previous
step (dispatch is asynchronous), so input is hidden while render time < step time.
(The TFDS and image-folder pipelines of the real-image datasets are not built yet.)
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--image_size", type=int, default=128)
  p.add_argument("--batch", default="1,8,64")
  p.add_argument("--batches", type=int, default=50)
  p.add_argument("--layers", type=int, default=2, help="2: square, circle; 3: + triangle")
  args = p.parse_args()
  import jax
  from sils_jax.data.synthetic import SyntheticLayers
  from sils_jax.training.devices import shard
  shapes = ("square", "circle", "triangle")[:args.layers]
  data = SyntheticLayers(image_size=args.image_size, shapes=shapes)
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
    print(json.dumps({"pipeline": "synthetic", "device": f"{jax.devices()[0].platform}", "image_size": args.image_size,
                      "num_layers": args.layers, "batch": b,
                      "host_batches_per_s": round(args.batches / host, 2),
                      "host_img_per_s": round(args.batches * b / host, 1),
                      "to_device_batches_per_s": round(args.batches / dev, 2),
                      "ms_per_batch": round(dev / args.batches * 1e3, 3)}), flush=True)


if __name__ == "__main__":
  main()
