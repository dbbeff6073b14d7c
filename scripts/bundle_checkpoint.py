"""Ship a training run as a package asset: only the EMA weights, in fp16 (load casts them to fp32), and a
checkpoint.json that fastdiff.training.checkpoint.load_model reads, with the training command and its log.

    python scripts/bundle_checkpoint.py RUN_DIR fastdiff/assets/digits16 --command "fastdiff train ..." \
        --log docs/train_digits16.log --wall-seconds 1234
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastdiff.training import checkpoint as ckpt  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("dest")
    p.add_argument("--command", required=True)
    p.add_argument("--wall-seconds", type=float, default=None)
    p.add_argument("--note", default=None)
    a = p.parse_args()
    tensors, meta = ckpt.load(a.run)
    ema = ckpt.prefixed(tensors, "ema.") or ckpt.prefixed(tensors, "model.")
    out = {"ema." + k: v.to(torch.float16) if v.is_floating_point() else v for k, v in ema.items()}
    history = meta.get("history", [])
    info = {"model": meta["model"], "train_config": meta["train_config"], "step": meta["step"],
            "training": {"command": a.command, "steps": meta["step"], "wall_seconds": a.wall_seconds,
                         "final_log": history[-1] if history else None, "note": a.note,
                         "weights": "EMA weights stored in fp16; loaded as fp32"}}
    os.makedirs(a.dest, exist_ok=True)
    for f in os.listdir(a.dest):
        if f.startswith("ckpt-") and f.endswith(".safetensors"):
            os.remove(os.path.join(a.dest, f))
    path = ckpt.save(a.dest, out, info)
    print(path, sum(v.numel() for v in out.values()), "parameters")


if __name__ == "__main__":
    main()
