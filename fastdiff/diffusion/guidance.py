"""Guidance: classifier-free guidance (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021).

Classifier-free guidance is combined inside the fused sampler step (``Sampler.step(..., uncond=,
guidance_scale=)``); :func:`cfg_combine` is its plain definition. Classifier guidance needs the gradient of a
classifier, taken here with autograd, and applied by the sampler: as a shift of the score, eps <- eps - sigma_t
s grad (Algorithm 2, DDIM and the ODE samplers), or of the mean, mu <- mu + s Sigma grad (Algorithm 1, DDPM).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """uncond + guidance_scale * (cond - uncond): 1 is the conditional model, 0 the unconditional one."""
    return uncond + guidance_scale * (cond - uncond)


def classifier_grad(classifier, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x log p(y | x, t) for a classifier called as classifier(x, t) -> logits (N, num_classes).

    x is the model's input at this step (for Euler, the scaled input); y: (N,) integer labels. The gradient is
    taken in float32 and returned in x's dtype, without host syncs (gather, not indexing with a Python list).
    """
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y: expected an (N,) = ({x.shape[0]},) tensor of class labels")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"y: expected integer class labels, got {y.dtype}")  # gather would truncate 1.7 to 1
    # autograd on, also inside torch.inference_mode() (which forbids it): x is cloned outside inference mode, so
    # the classifier's graph holds no inference tensor; the gradient is a normal tensor.
    with torch.inference_mode(False), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        if isinstance(t, torch.Tensor) and t.is_inference():
            t = t.clone()
        logits = classifier(x_in, t)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError("classifier: expected classifier(x, t) to return logits of shape (N, num_classes)")
        log_probs = F.log_softmax(logits.float(), dim=-1)
        selected = log_probs.gather(1, y.reshape(-1, 1).to(device=log_probs.device, dtype=torch.int64).clone())
        (grad,) = torch.autograd.grad(selected.sum(), x_in)
    return grad.to(x.dtype)
