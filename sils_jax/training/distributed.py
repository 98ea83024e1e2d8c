"""Multi-host start-up: ``jax.distributed.initialize`` when the config or the
environment asks for it (call it before anything else touches jax devices)."""

from __future__ import annotations

import os

import jax
from absl import logging


def _environment_is_multihost() -> bool:
  """SLURM with several tasks, or a Cloud TPU pod slice with several workers."""
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def initialize_distributed(config) -> bool:
  """Joins the multi-process job; returns whether it did.

  config.distributed=True calls ``jax.distributed.initialize`` with
  config.coordinator_address / num_processes / process_id where set (empty, 0 and
  -1 mean: let jax read them from the environment, as on TPU pods and SLURM).
  Without the flag it still joins when SLURM or the TPU runtime says there are
  several hosts.
  """
  if not (config.distributed or _environment_is_multihost()):
    return False
  kwargs = {}
  if config.coordinator_address:
    kwargs["coordinator_address"] = config.coordinator_address
  if config.num_processes > 0:
    kwargs["num_processes"] = config.num_processes
  if config.process_id >= 0:
    kwargs["process_id"] = config.process_id
  jax.distributed.initialize(**kwargs)
  logging.info("joined the distributed job: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
