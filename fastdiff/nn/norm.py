"""Normalisation layers on the fused GroupNorm op."""
from __future__ import annotations

import numbers

import torch

from fastdiff import ops


def positive_int(v, name: str) -> int:
    """v as an int (any integral type: Python's, numpy's), or a ValueError naming `name`."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return int(v)


def fx_leaf_call(module, *args):
    """How torch.fx.symbolic_trace records a fastdiff attention layer inside a model: one call of this on the layer
    (a get_attr node), as it records torch.nn's layers as leaf modules, instead of tracing into the layer's
    argument checks and layout branches, which a Proxy fails. The traced graph calls the layer itself."""
    return module(*args)


def traced_as_leaf(module, proxy, *args):
    """A layer's forward given a torch.fx Proxy: the fx_leaf_call node (fx patches that name while it traces)."""
    if getattr(proxy.tracer, "root", None) is module:
        raise TypeError(f"symbolic_trace: fastdiff.nn.{type(module).__name__} is recorded as one call inside the "
                        f"model that holds it; trace that model (a layer alone has nothing to record around it)")
    return fx_leaf_call(module, proxy, *args)


def fx_group_norm(x, num_groups, weight, bias, eps, scale, shift, activation):
    """GroupNorm.forward's body: under torch.fx.symbolic_trace one call_function node on the layer's parameters,
    as torch.nn.GroupNorm records F.group_norm."""
    # The fused op takes one dtype. torch.nn.GroupNorm takes fp16/bf16 inputs with fp32 parameters (a norm kept
    # in fp32 in a half model, or autocast, where x arrives in the low-precision dtype and the parameters stay
    # fp32), so the C-sized parameters are cast to x's dtype: statistics are fp32 whatever it is, and the
    # output is in x's dtype -- what autocast wants of a norm, without the round trip through fp32 memory.
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        if weight is not None and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # meta: no autocast state
            # scale/shift may come from an fp32 path (an embedding projection) under autocast
            scale, shift = (None if t is None else t.to(x.dtype) for t in (scale, shift))
    return ops.group_norm(x, num_groups, weight, bias, eps, scale=scale, shift=shift, activation=activation)


torch.fx.wrap("fx_leaf_call")
torch.fx.wrap("fx_group_norm")

_ACTS = (None, "silu")


def _check_activation(activation, name="activation"):
    if activation not in _ACTS:
        raise ValueError(f"{name}: expected None or 'silu', got {activation!r}")
    return activation


class GroupNorm(torch.nn.GroupNorm):
    """A drop-in for ``torch.nn.GroupNorm`` (same arguments, same state_dict keys) that runs the fused op, with an
    optional fused ``activation="silu"``. ``forward(input, scale=None, shift=None)`` also takes AdaGN's per-(N, C)
    scale and shift: ``act((GroupNorm(x) * weight + bias) * (1 + scale) + shift)``.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, activation=None, *, bias: bool = True):
        # bias=False (an affine weight without a bias) is a keyword of newer torch.nn.GroupNorm; passed on only when
        # asked for, so a torch without it still builds the default module.
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype,
                         **({} if bias else {"bias": False}))
        self.activation = _check_activation(activation)

    def forward(self, input, scale=None, shift=None):  # noqa: A002  (torch.nn.GroupNorm's name, for input=x calls)
        return fx_group_norm(input, self.num_groups, self.weight, self.bias, self.eps, scale, shift, self.activation)

    def extra_repr(self):
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


class AdaGroupNorm(torch.nn.Module):
    """GroupNorm whose output is modulated by an embedding (ADM's scale-shift norm, "AdaGN"):

        scale, shift = Linear(emb_activation(emb)).chunk(2)
        y = activation((GroupNorm(x) * weight + bias) * (1 + scale) + shift)

    emb: (N, emb_dim), or (1, emb_dim) for the whole batch (as diffusers' AdaGroupNorm broadcasts it).
    ``affine=False`` drops GroupNorm's own weight and bias (as diffusers' AdaGroupNorm does).
    """

    def __init__(self, num_groups: int, num_channels: int, emb_dim: int, activation="silu", eps: float = 1e-5,
                 affine: bool = True, emb_activation="silu", device=None, dtype=None):
        super().__init__()
        emb_dim = positive_int(emb_dim, "emb_dim")
        self.norm = GroupNorm(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype,
                              activation=activation)
        self.emb_activation = _check_activation(emb_activation, "emb_activation")
        self.linear = torch.nn.Linear(emb_dim, 2 * num_channels, device=device, dtype=dtype)

    def forward(self, x, emb):
        if isinstance(x, torch.fx.Proxy):  # symbolic_trace: the projection and the norm, without the checks
            scale, shift = self.linear(torch.nn.functional.silu(emb) if self.emb_activation else emb).chunk(2, dim=1)
            return self.norm(x, scale=scale.expand(x.shape[0], -1).contiguous(),
                             shift=shift.expand(x.shape[0], -1).contiguous())
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"x: expected shape (N, C, *spatial), got {tuple(x.shape)}")
        if not isinstance(emb, torch.Tensor) or not emb.is_floating_point():
            raise TypeError(f"emb: expected a floating-point tensor, got "
                            f"{emb.dtype if isinstance(emb, torch.Tensor) else type(emb).__name__}")
        if emb.dim() != 2 or emb.shape[0] not in (x.shape[0], 1) or emb.shape[1] != self.linear.in_features:
            raise ValueError(f"emb: expected shape ({x.shape[0]}, {self.linear.in_features}) (or a batch of 1, "
                             f"for every sample), got {tuple(emb.shape)}")
        # Like the GroupNorm inside it (and torch.nn.GroupNorm), the module takes inputs of another float
        # dtype than its parameters: a norm kept in fp32 in a half model gets half x and emb. The projection
        # runs in the module's dtype, and scale/shift go to x's dtype, as GroupNorm casts its weight and bias.
        if emb.dtype != self.linear.weight.dtype:
            emb = emb.to(self.linear.weight.dtype)
        if self.emb_activation == "silu":
            emb = torch.nn.functional.silu(emb)
        scale, shift = self.linear(emb).chunk(2, dim=1)
        if scale.shape[0] != x.shape[0]:  # one embedding for the whole batch, as diffusers' AdaGroupNorm broadcasts
            scale, shift = (t.expand(x.shape[0], -1).contiguous() for t in (scale, shift))
        if x.is_floating_point() and scale.dtype != x.dtype:
            scale, shift = scale.to(x.dtype), shift.to(x.dtype)
        return self.norm(x, scale=scale, shift=shift)
