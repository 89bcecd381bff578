"""Put on PYTHONPATH by tests/test_distributed.py: every process then runs as tether would on CUDA
GPUs, with a process group that, like NCCL, refuses tensors of a device type it has no backend for.

- tether's `distributed.init` is always told the run is on CUDA (the models stay on the CPU);
- `torch.cuda.set_device` does nothing (there is no GPU);
- each "nccl" in the backend spec becomes gloo *for CUDA tensors only* ("nccl" -> "cuda:gloo",
  "cpu:gloo,cuda:nccl" -> "cpu:gloo,cuda:gloo"), so a CPU tensor sent through a group initialised
  with plain "nccl" fails exactly as it would under NCCL: "No backend type associated with device
  type cpu".
"""

import torch
import torch.distributed as dist

_init_process_group = dist.init_process_group


def _cuda_only_gloo(backend=None, *args, **kwargs):
    spec = str(backend)
    spec = "cuda:gloo" if spec == "nccl" else spec.replace("cuda:nccl", "cuda:gloo")
    kwargs.pop("device_id", None)  # no GPU to bind
    return _init_process_group(spec, *args, **kwargs)


def _as_if_on_cuda(init):
    def init_for_cuda(device_type):
        return init("cuda")

    return init_for_cuda


dist.init_process_group = _cuda_only_gloo
torch.cuda.set_device = lambda device: None

from tether import distributed  # noqa: E402  (after the patches: tether reads them at call time)

distributed.init = _as_if_on_cuda(distributed.init)
