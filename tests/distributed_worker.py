"""One process of a 2-process CPU run (jax.distributed over localhost, gloo collectives).

python tests/distributed_worker.py PROCESS_ID PORT WORKDIR
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main():
  pid, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=pid, local_device_ids=[0])
  assert jax.process_count() == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
  from lsvit import train_lib
  from tests.helpers import tiny_config
  train_lib.quiet_logs()
  summary = train_lib.train_and_evaluate(tiny_config(), workdir)
  print(f"process {pid}: sequential top-1 {summary['sequential']['top1']:.4f}", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
