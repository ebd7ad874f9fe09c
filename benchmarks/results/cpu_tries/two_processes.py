"""Training throughput on 2 cores: 1 process x 2 threads against 2 DistributedDataParallel
processes x 1 thread (gloo). Usage, from the repository root: python THIS single:32 ddp:16 ddp:32"""

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.getcwd())
import diffusion_utils as du

SECONDS = float(os.environ.get("SECONDS_PER", 40))


def timed(trainer, batches, per_rank_bs, seconds=SECONDS, warm=10):
    for _ in range(warm):
        trainer.train_step(next(batches))
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        trainer.train_step(next(batches))
        n += 1
    return n * per_rank_bs / (time.perf_counter() - t0)


def single(bs):
    torch.set_num_threads(2)
    m, t = du.default_configs("cpu")
    t.batch_size = bs
    tr = du.Trainer(m, t, "cpu")
    print(f"single 2 threads bs{bs}: {timed(tr, tr.batches(), bs):.0f} img/s", flush=True)


def ddp_worker(rank, bs, q):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = "29533"
    dist.init_process_group("gloo", rank=rank, world_size=2)
    m, t = du.default_configs("cpu")
    t.batch_size = bs
    t.seed = 0  # both ranks draw the same t and noise: fine for a speed test
    tr = du.Trainer(m, t, "cpu")
    tr.train_model = torch.nn.parallel.DistributedDataParallel(tr.model)
    batches = du.training_batches(bs, seed=rank)
    r = timed(tr, batches, bs)
    q.put((rank, r))
    dist.destroy_process_group()


def ddp(bs):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=ddp_worker, args=(r, bs, q)) for r in range(2)]
    [p.start() for p in ps]
    rates = [q.get() for _ in ps]  # before join: a process exits only once its queue is read
    [p.join() for p in ps]
    print(f"ddp 2x1 thread per-rank bs{bs}: total {sum(r for _, r in rates):.0f} img/s", flush=True)


if __name__ == "__main__":
    for mode in sys.argv[1:]:
        kind, bs = mode.split(":")
        bs = int(bs)
        {"single": single, "ddp": ddp}[kind](bs)
