"""Run several plans in one torchrun launch and write their losses (used by the tests).

    torchrun --nproc-per-node N driver.py OUT MODEL SEQ BATCH STEPS OPTIMIZER LR PLAN...

Each plan runs from the same seed and data in the same process group, which saves the
start-up of a launch per plan. Gradient buckets are made small so that the overlapped
reduction runs many buckets, launched while backward is still running.
"""

import dataclasses
import json
import sys

import torch
import torch.distributed as dist

from meshplan.core.plan import Plan
from meshplan.core.planfile import PlanFile
from meshplan.core.workload import TrainWorkload
from meshplan.loaders import load_cluster, load_model
from meshplan.runtime.train import RunOptions, run


def main() -> None:
    out, model, seq, batch, steps, optimizer, lr, *plans = sys.argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    spec = load_model(model)
    work = TrainWorkload(seq_len=int(seq), global_batch=int(batch), dtype="fp32",
                         optimizer=optimizer)
    cluster = load_cluster("cpu", gpus=world)
    results = {}
    for text in plans:
        plan = Plan.from_json(text) if text.startswith("{") else Plan.parse(text)
        plan = dataclasses.replace(plan, bucket_mb=16 / 1024)  # 16 KiB: many buckets
        pf = PlanFile(model=spec, cluster=cluster, work=work, plan=plan)
        opts = RunOptions(steps=int(steps), warmup_steps=0, lr=float(lr), measure_memory=False)
        record = run(pf, opts)
        if dist.get_rank() == 0:
            results[text] = record["losses"]
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
