"""The quick start's inference side: 1 rank receives the whole weight after every trainer step
and checks every element.

    AGENT_RANK_OFFSET=2 torchrun --standalone --nproc-per-node 1 examples/quickstart/inference.py

It uses agent 2 (LOCAL_RANK 0 + AGENT_RANK_OFFSET 2) of `tensorbus up --agents 3`.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate

import tensorbus

STEPS, ROWS, COLS = 3, 1024, 256

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))

client, info = tensorbus.bootstrap_client()
client.init_pair("weights", "inference", "trainer", expected_world_size=mesh.size(),
                 device_mesh=mesh, placements=(Replicate(),))

torch.manual_seed(0)
expected = torch.randn(ROWS, COLS)  # what the trainer starts from
weight = torch.zeros(ROWS, COLS)  # filled in place by the agents
batch = client.register_tensors("step", [(weight, "weights")])
for step in range(STEPS):
    batch.transfer("recv", blocking=True)
    expected.add_(1.0)  # the trainer's step
    assert torch.equal(weight, expected), f"step {step}: wrong weights"
    print(f"inference: step {step} landed, every element exact", flush=True)
batch.close()
client.close()
dist.destroy_process_group()
print("inference: done")
