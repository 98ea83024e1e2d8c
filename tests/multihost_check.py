"""Run as a script (by tests/test_multihost.py): trains the tiny config in one process
of a simulated multi-host job on localhost, then saves its final parameters.

  python tests/multihost_check.py WORKDIR OUT.npz NUM_LOCAL_DEVICES [PROCESS_ID NUM_PROCESSES PORT]
"""

import os
import sys

workdir, out_path, local_devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_config import tiny_config  # noqa: E402

from sils_jax.training import loop  # noqa: E402
from sils_jax.training.distributed import initialize_distributed  # noqa: E402

config = tiny_config()
config.num_train_steps = 3
config.eval_every_steps = 3
config.checkpoint_every_steps = 3
config.cpu_kernels = "off"  # flax's layers compile in about half the time of the CPU forms (same maths)
if len(sys.argv) > 4:
  pid, nproc, port = (int(a) for a in sys.argv[4:7])
  config.distributed = True
  config.coordinator_address = f"localhost:{port}"
  config.num_processes = nproc
  config.process_id = pid
initialize_distributed(config)
result, g, d = loop.train_and_evaluate(config, workdir, return_states=True)
flat = {f"{'/'.join(str(k) for k in path)}": np.asarray(v)
        for path, v in jax.tree_util.tree_flatten_with_path((g.params, d.params, g.batch_stats))[0]}
np.savez(out_path, **flat)
print("done", jax.process_index(), jax.process_count(), jax.device_count(), result)
