"""Sample quality on the digits: class accuracy of class-conditional samples and a Fréchet distance.

A small CNN (:class:`DigitsCNN`), trained on the fixed digits training split (``fastdiff.training.data.
digits(16, split="train")``) and shipped in ``fastdiff/assets/digits_cnn/``, classifies each sample; the accuracy
is the fraction classified as the class it was asked for. Its penultimate layer (128 features) is the feature
space of the Fréchet distance (FID's formula, on this small in-domain network instead of Inception):

    FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)

between the samples and the held-out "test" split. The same distance between the training and held-out splits
is the floor: what real digits score, given the finite sample sizes.
"""
from __future__ import annotations

import json
import os
import time
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.pretrained import ASSETS

CLASSIFIER_DIR = os.path.join(ASSETS, "digits_cnn")


class DigitsCNN(nn.Module):
    """A small CNN for 16x16 greyscale digits in [-1, 1]: ``forward(x) -> logits``, ``features(x) -> (N, 128)``."""

    def __init__(self, width: int = 32, features: int = 128, num_classes: int = 10):
        super().__init__()
        self.config = dict(width=width, features=features, num_classes=num_classes)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * w * 16, features), nn.ReLU())
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(features, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.drop(self.body(x)))


def _shift(x, gen):
    """Random translations by up to 1 pixel (zero padding is the background, -1)."""
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return pad[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def train_classifier(epochs: int = 30, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, verbose=False):
    """Train :class:`DigitsCNN` on the digits training split; returns (model, test accuracy)."""
    from fastdiff.training.data import digits

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tr, te = digits(16, split="train"), digits(16, split="test")
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(tr) // batch_size))
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(tr), generator=gen)
        for i in range(0, len(tr), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_shift(tr.images[idx], gen)), tr.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"epoch {ep + 1}: loss {loss.item():.4f}", flush=True)
    acc = accuracy(model, te.images, te.labels)
    return model.eval(), acc


@torch.no_grad()
def accuracy(model, x, labels) -> float:
    model.eval()
    return float((model(x.float()).argmax(1) == labels).float().mean())


def save_classifier(model: DigitsCNN, directory: str = CLASSIFIER_DIR, **meta):
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              os.path.join(directory, "weights.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dict(meta, config=model.config), f, indent=1, sort_keys=True)


def load_classifier(directory: str = CLASSIFIER_DIR) -> DigitsCNN:
    from safetensors.torch import load_file

    with open(os.path.join(directory, "config.json")) as f:
        meta = json.load(f)
    model = DigitsCNN(**meta["config"])
    model.load_state_dict(load_file(os.path.join(directory, "weights.safetensors")))
    return model.eval()


@torch.no_grad()
def features_and_predictions(clf, x, batch_size: int = 512):
    feats, preds = [], []
    for i in range(0, len(x), batch_size):
        f = clf.features(x[i:i + batch_size].float())
        feats.append(f.double())
        preds.append(clf.head(f).argmax(1))
    return torch.cat(feats).numpy(), torch.cat(preds)


def _stats(f: np.ndarray):
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))  # one feature: np.cov gives a 0-d array


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (rows are samples). Uses
    tr((S_a S_b)^1/2) = tr((S_a^1/2 S_b S_a^1/2)^1/2), a symmetric PSD matrix, so two eigendecompositions do it.
    Each set needs two or more samples of the same number of features; the distance is clamped at 0 (rounding
    took a set's distance to itself to -4e-15)."""
    feats = []
    for name, f in (("feats_a", feats_a), ("feats_b", feats_b)):
        f = np.asarray(f, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 2 or f.shape[1] < 1:
            raise ValueError(f"{name}: expected (samples, features) with 2 or more samples, got shape {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError(f"{name}: holds NaN or infinite values")
        feats.append(f)
    feats_a, feats_b = feats
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feats_b: expected {feats_a.shape[1]} features (feats_a's), got {feats_b.shape[1]}")
    mu_a, s_a = _stats(feats_a)
    mu_b, s_b = _stats(feats_b)
    r = _sqrtm_psd(s_a)
    m = r @ s_b @ r
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return max(0.0, float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt))


_REF_CACHE = weakref.WeakKeyDictionary()  # classifier -> (its weights' versions, features)


def reference_features(clf):
    """Features of the training and held-out splits (cached per classifier while its weights are unchanged)."""
    from fastdiff.training.data import digits

    versions = tuple((p.data_ptr(), p._version) for p in clf.parameters())
    hit = _REF_CACHE.get(clf)
    if hit is None or hit[0] != versions:
        tr, te = digits(16, split="train"), digits(16, split="test")
        hit = (versions, (features_and_predictions(clf, tr.images)[0], features_and_predictions(clf, te.images)[0],
                          accuracy(clf, te.images, te.labels)))
        _REF_CACHE[clf] = hit
    return hit[1]


def floor(clf=None) -> dict:
    """The scores of real digits: FD(train split, held-out split) and the classifier's held-out accuracy."""
    clf = clf or load_classifier()
    f_tr, f_te, acc = reference_features(clf)
    return {"fd": frechet_distance(f_tr, f_te), "accuracy": acc, "n": len(f_tr), "n_ref": len(f_te)}


def evaluate(model, *, sampler="dpmsolver++", steps=20, guidance=1.0, n_per_class=50, seed=0,
             dtype=torch.float32, device=None, batch_size=None, clf=None, progress=False, checkpoint=None,
             autoencoder="auto") -> dict:
    """Sample n_per_class of each digit and score them: accuracy on the requested class, FD to the held-out
    split (a latent-diffusion model's samples decoded by `autoencoder`, as in :func:`fastdiff.pretrained.generate`).
    Returns a dict (sampler, steps, guidance, n, accuracy, fd, seconds)."""
    from fastdiff.pretrained import generate

    clf = clf or load_classifier()
    _, f_te, _ = reference_features(clf)
    t0 = time.perf_counter()
    x, y, sec = generate(model, sampler=sampler, steps=steps, guidance=guidance, classes=range(10), n=n_per_class,
                         seed=seed, dtype=dtype, device=device, batch_size=batch_size, progress=progress,
                         checkpoint=checkpoint, autoencoder=autoencoder)
    f, pred = features_and_predictions(clf, x)
    return {"sampler": sampler, "steps": steps, "guidance": guidance, "n": len(x),
            "accuracy": float((pred == y).float().mean()), "fd": frechet_distance(f, f_te),
            "sampling_s": sec, "seconds": time.perf_counter() - t0}


#: The settings of the README's table: (sampler, steps, guidance).
TABLE = [("ddpm", 1000, 1.0), ("ddim", 50, 1.0), ("ddim", 20, 1.0), ("ddim", 10, 1.0), ("dpmsolver++", 20, 1.0),
         ("dpmsolver++", 10, 1.0), ("dpmsolver++", 20, 2.0), ("dpmsolver++", 20, 4.0)]
