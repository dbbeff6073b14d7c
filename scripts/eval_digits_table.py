"""The README's sample-quality table for a checkpoint (default: the bundled one) -> docs/eval_digits.md.

    python scripts/eval_digits_table.py --n 30 --ddpm-n 10 --out docs/eval_digits.md

Each row is `fastdiff eval --sampler S --steps K --guidance G --n N` (N samples per class).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastdiff import evaluation, pretrained  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--n", type=int, default=30, help="samples per class")
    p.add_argument("--ddpm-n", type=int, default=10, help="samples per class for DDPM 1000 steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/eval_digits.md")
    a = p.parse_args()
    model = pretrained.load(a.checkpoint)
    clf = evaluation.load_classifier()
    fl = evaluation.floor(clf)
    # FD is biased upward at small sample counts: the floor again with as many real images as the rows have
    f_tr, f_te, _ = evaluation.reference_features(clf)
    perm = torch.randperm(len(f_tr), generator=torch.Generator().manual_seed(a.seed)).numpy()
    fl["matched"] = {m: evaluation.frechet_distance(f_tr[perm[:m]], f_te) for m in sorted({10 * a.n, 10 * a.ddpm_n})}
    rows = []
    order = sorted(evaluation.TABLE, key=lambda r: r[1])  # cheap rows first, so a partial run still has most
    for sampler, steps, guidance in order:
        n = a.ddpm_n if sampler == "ddpm" else a.n
        r = evaluation.evaluate(model, sampler=sampler, steps=steps, guidance=guidance, n_per_class=n, seed=a.seed,
                                clf=clf, checkpoint=a.checkpoint)
        rows.append(r)
        print(json.dumps(r), flush=True)
        write(a, fl, rows)


def write(a, fl, rows):
    import fastdiff

    key = {(s, k, g): i for i, (s, k, g) in enumerate(evaluation.TABLE)}
    rows = sorted(rows, key=lambda r: key[(r["sampler"], r["steps"], r["guidance"])])
    names = {"ddpm": "DDPM", "ddim": "DDIM", "dpmsolver++": "DPM-Solver++"}
    lines = [
        "# Sample quality of the bundled digits checkpoint",
        "",
        f"`fastdiff eval` on {'the bundled checkpoint (fastdiff/assets/digits16)' if a.checkpoint is None else a.checkpoint}: "
        "class-conditional samples of every digit, scored by the bundled eval classifier "
        "(fastdiff/assets/digits_cnn, a small CNN trained on the digits training split).",
        "",
        "- **accuracy**: the fraction of samples the classifier assigns to the class they were sampled for.",
        "- **FD**: Fréchet distance between the classifier's penultimate-layer features (128-d) of the samples and "
        f"of the held-out split ({fl['n_ref']} images). Lower is better.",
        f"- **floor**: real digits — the training split ({fl['n']} images) against the held-out split: FD "
        f"**{fl['fd']:.2f}**, classifier accuracy on the held-out split **{fl['accuracy']:.1%}**. "
        "FD is biased upward for small sample counts, so rows with fewer samples read higher.",
        "",
        "| sampler | steps | guidance | samples | accuracy | FD |",
        "|---|---:|---:|---:|---:|---:|",
        f"| real digits (train split, floor) | – | – | {fl['n']} | {fl['accuracy']:.1%}* | {fl['fd']:.2f} |",
    ]
    for m, fd in fl["matched"].items():
        lines.append(f"| real digits (train split, {m} random images) | – | – | {m} | – | {fd:.2f} |")
    for r in rows:
        lines.append(f"| {names[r['sampler']]} | {r['steps']} | {r['guidance']:g} | {r['n']} | {r['accuracy']:.1%} | "
                     f"{r['fd']:.2f} |")
    lines += ["", "\\* the classifier's accuracy on the held-out split.", "",
              f"Seed {a.seed}; fp32 on {fastdiff.info()['device_name']} (torch {torch.__version__}); "
              f"`python scripts/eval_digits_table.py --n {a.n} --ddpm-n {a.ddpm_n}` "
              f"(each row is `fastdiff eval --sampler S --steps K --guidance G --n N`). "
              f"Generated {time.strftime('%Y-%m-%d')}.", ""]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
