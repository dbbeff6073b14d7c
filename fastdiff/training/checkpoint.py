"""Checkpoints: tensors in safetensors, everything else in JSON, written crash-safely.

A checkpoint directory holds ``checkpoint.json`` (model class and config, training config, step, optimizer
hyper-parameters, scaler and history...) and the safetensors file it names, ``ckpt-<step>.safetensors``
(``model.*``, ``ema.*``, ``optim.*``, ``rng.*``, ``sampler.*`` tensors). Each file is written to a temporary name
in the same directory and renamed into place (``os.replace`` is atomic on POSIX): the tensors first, then the
JSON, which is the commit point. An interruption at any moment leaves the previous checkpoint readable; stale
tensor files are removed only after the new JSON is in place.
"""
from __future__ import annotations

import json
import os

import torch

from fastdiff._io import atomic_write, atomic_write_file


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ImportError("checkpoints need safetensors: pip install safetensors (or pip install 'fastdiff[train]')") from e
    return st

JSON_NAME = "checkpoint.json"
FORMAT = "fastdiff-checkpoint"
VERSION = 1


def _plain(tensors: dict) -> dict:
    # safetensors wants contiguous tensors that share no memory
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save(directory: str, tensors: dict, meta: dict) -> str:
    """Write a checkpoint (tensors + JSON meta) to `directory`; returns the JSON path."""
    step = int(meta.get("step", 0))
    name = f"ckpt-{step:09d}.safetensors"
    atomic_write(os.path.join(directory, name), lambda p: _safetensors().save_file(_plain(tensors), p, metadata={"step": str(step)}))
    import fastdiff

    meta = dict(meta, format=FORMAT, version=VERSION, tensors=name, fastdiff=fastdiff.__version__,
                torch=torch.__version__)
    path = os.path.join(directory, JSON_NAME)
    atomic_write_file(path, lambda f: json.dump(meta, f, indent=1, sort_keys=True), mode="w")
    for f in os.listdir(directory):  # older tensor files, now unreferenced
        if f.startswith("ckpt-") and f.endswith(".safetensors") and f != name:
            try:
                os.remove(os.path.join(directory, f))
            except OSError:
                pass
    return path


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (damaged, truncated, not a checkpoint): the message names the file."""


def _folder(directory: str) -> str:
    """A checkpoint folder, given the folder or its checkpoint.json."""
    if os.path.basename(directory) == JSON_NAME and os.path.isfile(directory):
        return os.path.dirname(os.path.abspath(directory))
    return directory


def exists(directory: str) -> bool:
    return os.path.isfile(os.path.join(_folder(directory), JSON_NAME))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: damaged or not a checkpoint's JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: damaged or not a checkpoint's JSON (a {type(meta).__name__}, not an object)")
    return meta


def load_meta(directory: str) -> dict:
    """The JSON meta of the checkpoint in `directory` (the folder or its checkpoint.json), without its tensors."""
    return _read_json(os.path.join(_folder(directory), JSON_NAME))


def load(directory: str, device="cpu") -> tuple[dict, dict]:
    """(tensors, meta) of the checkpoint in `directory` (the folder or its checkpoint.json). A file that cannot
    be read raises CheckpointError (a ValueError) naming it."""
    directory = _folder(directory)
    path = os.path.join(directory, JSON_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint in {directory!r} (expected {JSON_NAME})")
    meta = _read_json(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastdiff checkpoint (format={meta.get('format')!r})")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta['version']} is newer than this fastdiff reads "
                              f"({VERSION})")
    if not isinstance(meta.get("tensors"), str):
        raise CheckpointError(f"{path}: damaged: it names no tensor file")
    tpath = os.path.join(directory, meta["tensors"])
    if not os.path.isfile(tpath):
        raise CheckpointError(f"{tpath}: missing (named by {path})")
    st = _safetensors()
    try:
        tensors = st.load_file(tpath, device=str(device))
    except MemoryError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) for a damaged file
        raise CheckpointError(f"{tpath}: damaged or not a safetensors file ({type(e).__name__}: {e})") from None
    return tensors, meta


def prefixed(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def model_meta(model) -> dict:
    """How checkpoint.json describes a model: its class name and config (build_model's input)."""
    return {"class": type(model).__name__, "config": model.config}


def build_model(meta_model: dict):
    from fastdiff.models import MODELS

    cls = MODELS.get(meta_model["class"])
    if cls is None:
        raise ValueError(f"checkpoint: unknown model class {meta_model['class']!r}; known: {sorted(MODELS)}")
    return cls.from_config(meta_model["config"])


def load_autoencoder(directory: str, device="cpu"):
    """The (frozen) autoencoder a latent-diffusion checkpoint was trained with, or None for a pixel-space one."""
    tensors, meta = load(directory, device)
    if "autoencoder" not in meta:
        return None
    ae = build_model(meta["autoencoder"]).to(device)
    ae.load_state_dict(prefixed(tensors, "autoencoder."))
    return ae.eval()


def load_model(directory: str, ema: bool = True, device="cpu") -> torch.nn.Module:
    """The model saved in a checkpoint directory, with its EMA weights (ema=True, when there are any) or its
    raw weights, in eval mode."""
    tensors, meta = load(directory, device)
    model = build_model(meta["model"]).to(device)
    weights = prefixed(tensors, "ema.") if ema else {}
    if not weights:
        weights = prefixed(tensors, "model.")
    model.load_state_dict(weights)
    return model.eval()
