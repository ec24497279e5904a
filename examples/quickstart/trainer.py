"""The quick start's trainer: 2 ranks hold a weight sharded by rows (torch placements, a torch
DeviceMesh) and push it to the inference side after every step.

    torchrun --standalone --nproc-per-node 2 examples/quickstart/trainer.py

Each rank uses agent LOCAL_RANK (0 and 1) of `tensorbus up --agents 3`.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard

import tensorbus

STEPS, ROWS, COLS = 3, 1024, 256

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
rank = mesh.get_local_rank()

client, info = tensorbus.bootstrap_client()  # agent LOCAL_RANK + AGENT_RANK_OFFSET
client.init_pair("weights", "trainer", "inference", expected_world_size=mesh.size(),
                 device_mesh=mesh, placements=(Shard(0),))

torch.manual_seed(0)
weight = torch.randn(ROWS, COLS).chunk(mesh.size())[rank].clone()  # this rank's shard, registered in place
batch = client.register_tensors("step", [(weight, "weights")])
for step in range(STEPS):
    weight.add_(1.0)  # a training step
    batch.transfer("send", blocking=True)
    print(f"trainer rank {rank}: pushed step {step}", flush=True)
batch.close()
client.close()
dist.destroy_process_group()
