"""One DDP step on 2 gloo processes (run by torchrun from tests/test_train.py); rank 0 saves the weights.

BatchNorm runs in eval mode so the loss is a plain mean over samples: one DDP step on two halves
of a batch must then equal one single-process step on the whole batch.
"""

import sys

import torch
import torch.distributed as dist

from bnn_distill.models import create_model


def model_and_batch():
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25, weight_scale="learned").eval()
    torch.manual_seed(1)
    return model, torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, x, y = model_and_batch()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    half = slice(rank * 32, (rank + 1) * 32)
    torch.nn.functional.cross_entropy(ddp(x[half]), y[half]).backward()
    opt.step()
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)
    del ddp, opt
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
