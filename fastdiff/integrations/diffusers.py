"""fastdiff.integrations.diffusers: run a diffusers U-Net or VAE on fastdiff's fused layers, in place.

    n = patch(unet)        # how many layers now run fused
    ...
    unpatch(unet)          # the original forwards, modules and attention processors again

What :func:`patch` replaces (each counts one in its return value), keeping every parameter object where it is (the
state_dict keys and tensors are unchanged, so weights load the same before and after):

* ``ResnetBlock2D`` (SiLU nonlinearity, ``nn.GroupNorm`` norms, time_embedding_norm "default" or "scale_shift"):
  the instance's ``forward`` is replaced by ``functools.partial(_resnet_forward, block)`` (picklable, unlike a
  bound method of a function the class lacks), which runs norm1+SiLU as one fused GroupNorm, and norm2
  with the time embedding's AdaGN ``(1 + scale) * h + shift`` and the SiLU as another (2 per block). Blocks with
  another activation or norm, or a subclass with its own forward, keep theirs.
* ``Attention`` modules whose processor is diffusers' default (``AttnProcessor2_0`` or ``AttnProcessor``): the
  processor becomes :class:`FastdiffAttnProcessor` (self and cross attention), which runs the module's own
  to_q/to_k/to_v/to_out, its GroupNorm fused, and fastdiff's attention on per-head strided views of the
  projections (no transposing copies). Calls it does not handle (an attention mask, extra processor arguments)
  go to the original processor.
* ``conv_norm_out`` + ``conv_act`` (SiLU) of ``UNet2DModel``, ``UNet2DConditionModel`` and the VAE's
  ``Encoder``/``Decoder``: the norm becomes ``fastdiff.nn.GroupNorm(activation="silu")`` sharing the parameters,
  the activation ``nn.Identity``.
* Every other plain ``nn.GroupNorm`` (e.g. ``Transformer2DModel.norm``): ``fastdiff.nn.GroupNorm`` sharing the
  parameters.

:func:`sampling_model` adapts a diffusers U-Net to fastdiff's sampling loop (``model(x, t, y=, context=)`` -> a
tensor); :func:`fastdiff.sample` applies it by itself to diffusers models. :class:`FastdiffScheduler` goes the
other way: a pipeline keeps its own loop and steps with a fastdiff sampler
(``pipe.scheduler = FastdiffScheduler.from_scheduler(pipe.scheduler)``).

Needs diffusers (``pip install fastdiff[diffusers]``); ``import fastdiff`` does not import this module.
"""
from __future__ import annotations

import functools
import inspect
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.nn.norm import GroupNorm as _FusedGroupNorm
from fastdiff.ops.attention import FUSED_DTYPES, MAX_HEAD_DIM

try:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    from diffusers.models.autoencoders.vae import Decoder, Encoder
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.unets.unet_2d import UNet2DModel
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
except ImportError as e:  # pragma: no cover - exercised only without diffusers
    raise ImportError("fastdiff.integrations.diffusers needs diffusers: pip install 'fastdiff[diffusers]'") from e

__all__ = ["patch", "unpatch", "is_patched", "FastdiffAttnProcessor", "sampling_model", "FastdiffScheduler"]

# model -> list of undo callables, in the order they were applied. Weak keys: no attribute is added to the model
# (so its pickling, deepcopy and state_dict are untouched) and a dropped model is not kept alive.
_UNDO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_INIT_ARGS: dict = {}  # diffusers scheduler class -> the names its __init__ takes
_OUTPUT_TYPES: dict = {}  # diffusers scheduler class -> (its step output class, that class's fields)
_COUNT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layers patch replaced, per model (unpatch's answer)

_OUT_NORM_OWNERS = (UNet2DModel, UNet2DConditionModel, Encoder, Decoder)


# The config key listing the options a FastdiffScheduler saved beyond its diffusers class's arguments (s_noise, ...).
FASTDIFF_OPTIONS = "fastdiff_options"


# -- the fused pieces ---------------------------------------------------------------------------------------------

def _group_norm(norm: torch.nn.GroupNorm, x, scale=None, shift=None, activation=None):
    """norm(x) (with AdaGN scale/shift and activation) as one fused op, with norm's own parameters."""
    w, b = norm.weight, norm.bias
    # The fused op takes one dtype: under autocast (or with an fp32 norm in a half model) cast the C-sized
    # parameters to x's, as fastdiff.nn.GroupNorm does; statistics are fp32 whatever the dtype.
    w = w if w is None or w.dtype == x.dtype else w.to(x.dtype)
    b = b if b is None or b.dtype == x.dtype else b.to(x.dtype)
    if scale is not None:
        scale = scale.to(x.dtype).contiguous()
        shift = shift.to(x.dtype).contiguous()
    return ops.group_norm(x, norm.num_groups, w, b, norm.eps, scale=scale, shift=shift, activation=activation)


def _attention(q, k, v, scale):
    """fastdiff's attention where its kernels take the problem, else SDPA (rather than ops.attention's fallback to
    the materialised-softmax reference, which is slower than SDPA on a GPU for float32)."""
    d = q.shape[-1]
    if q.device.type == "cpu" or (q.dtype in FUSED_DTYPES and d % 8 == 0 and 8 <= d <= MAX_HEAD_DIM):
        return ops.attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """ResnetBlock2D.forward with norm1+SiLU and norm2(+scale-shift)+SiLU fused (bound to a patched instance)."""
    if args or kwargs.get("scale") is not None:  # the deprecated `scale` argument: let diffusers warn about it
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    h = _group_norm(self.norm1, input_tensor, activation="silu")
    if self.upsample is not None:
        if h.shape[0] >= 64:  # as diffusers: upsample_nearest_nhwc fails with large batches
            input_tensor = input_tensor.contiguous()
            h = h.contiguous()
        input_tensor = self.upsample(input_tensor)
        h = self.upsample(h)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        h = self.downsample(h)
    h = self.conv1(h)
    if self.time_emb_proj is not None:  # temb=None fails here, as in diffusers (not run without the embedding)
        if not self.skip_time_act:
            temb = F.silu(temb)
        temb = self.time_emb_proj(temb)
    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(" `temb` should not be None when `time_embedding_norm` is scale_shift")
        scale, shift = temb.chunk(2, dim=1)
        h = _group_norm(self.norm2, h, scale=scale, shift=shift, activation="silu")
    else:
        if temb is not None:
            h = h + temb[:, :, None, None]
        h = _group_norm(self.norm2, h, activation="silu")
    h = self.dropout(h)
    h = self.conv2(h)
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    out = input_tensor + h
    if self.output_scale_factor != 1.0:
        out = out / self.output_scale_factor
    return out


def _is_plain_group_norm(m) -> bool:
    return type(m) is torch.nn.GroupNorm and m.affine


def _resnet_supported(block) -> bool:
    return (isinstance(block, ResnetBlock2D) and type(block).forward is ResnetBlock2D.forward
            and "forward" not in block.__dict__ and isinstance(block.nonlinearity, torch.nn.SiLU)
            and _is_plain_group_norm(block.norm1) and _is_plain_group_norm(block.norm2)
            and block.time_embedding_norm in ("default", "scale_shift"))


class FastdiffAttnProcessor:
    """A diffusers attention processor on fastdiff's fused attention and GroupNorm, for ``Attention`` modules.

    Computes what ``AttnProcessor2_0`` does (spatial_norm, group_norm, norm_cross, norm_q/norm_k, to_out,
    residual_connection, rescale_output_factor) with q, k, v passed to ``fastdiff.ops.attention`` as (B, H, S, D)
    views of the (B, S, H·D) projections. ``fallback`` (the processor it replaced) runs the calls it does not
    handle: an attention mask, or extra arguments.
    """

    def __init__(self, fallback=None):
        self.fallback = fallback if fallback is not None else AttnProcessor2_0()
        # AttnProcessor2_0 leaves the scale to SDPA (D ** -0.5) whatever attn.scale says; AttnProcessor uses
        # attn.scale. Match the processor being replaced.
        self._use_attn_scale = not isinstance(self.fallback, AttnProcessor2_0)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if attention_mask is not None or args or kwargs:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            if attn.group_norm is not None:  # the same statistics over (C, H, W) as over (C, H·W), read in place
                hidden_states = _group_norm(attn.group_norm, hidden_states)
            hidden_states = hidden_states.reshape(batch, channel, height * width).transpose(1, 2)
        elif attn.group_norm is not None:  # (B, S, C) seen as a channels-last (B, C, S): read in place
            hidden_states = _group_norm(attn.group_norm, hidden_states.transpose(1, 2)).transpose(1, 2)
        batch = hidden_states.shape[0] if encoder_hidden_states is None else encoder_hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        # (B, S, H·D) -> (B, H, S, D) views: the fused kernels read these strides in place
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = _attention(query, key, value, float(attn.scale) if self._use_attn_scale else None)
        # the fused kernels write (B, S, H, D) memory for such views: this reshape is free
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def __repr__(self):
        return f"FastdiffAttnProcessor(fallback={type(self.fallback).__name__})"


# -- patch / unpatch ----------------------------------------------------------------------------------------------
def _named_parents(model):
    """(parent, attribute name, child) for every submodule, the root's children included."""
    for parent in model.modules():
        for name, child in parent.named_children():
            yield parent, name, child


def _swap(parent, name, new, undo):
    old = getattr(parent, name)
    setattr(parent, name, new)
    # weak references to the modules in the tree (parent may be the model, the key of _UNDO: a strong one would
    # keep a dropped model alive); the original `old`, out of the tree now, is held here
    parent_ref, new_ref = weakref.ref(parent), weakref.ref(new)

    def restore():
        parent, new = parent_ref(), new_ref()
        if parent is None or new is None or getattr(parent, name, None) is not new:
            return  # replaced since the patch (by the user): theirs stays
        # what the swapped-in module holds now goes back with the original: parameters and buffers replaced
        # since the patch (load_state_dict(assign=True), to_empty, accelerate's offloading) and the mode
        for pname, p in list(old.named_parameters(recurse=False)):
            q = getattr(new, pname, None)
            if isinstance(q, torch.nn.Parameter) and q is not p:
                setattr(old, pname, q)
        for bname, b in list(old.named_buffers(recurse=False)):
            q = getattr(new, bname, None)
            if isinstance(q, torch.Tensor) and q is not b:
                setattr(old, bname, q)
        old.train(new.training)
        setattr(parent, name, old)

    undo.append(restore)


def _has_fused_forward(m) -> bool:
    f = m.__dict__.get("forward")
    return isinstance(f, functools.partial) and f.func is _resnet_forward and len(f.args) == 1 and f.args[0] is m


def _restore_forward(m_ref):
    m = m_ref()
    if m is not None and _has_fused_forward(m):  # a forward set since the patch (a hook) is the user's: kept
        del m.__dict__["forward"]


def _restore_processor(m_ref, proc, ours):
    m = m_ref()
    # a processor set since the patch (set_attn_processor: IP-Adapter, LoRA, fused QKV) is the user's: kept
    if m is not None and m.processor is ours:
        m.set_processor(proc)


def _fused_group_norm_like(norm: torch.nn.GroupNorm, activation):
    new = _FusedGroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=True, device="meta",
                          activation=activation)
    new.weight, new.bias = norm.weight, norm.bias  # the same Parameter objects: nothing is copied
    new.train(norm.training)
    return new


def patch(model: torch.nn.Module) -> int:
    """Make `model` (a diffusers ``UNet2DModel``, ``UNet2DConditionModel``, ``AutoencoderKL`` or any module
    holding their parts) run fastdiff's fused GroupNorm+SiLU, AdaGN and attention, in place. Returns how many
    layers were replaced (0 for a model already patched). :func:`unpatch` undoes it."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    undo = []
    handled = set()  # ids of GroupNorms that the fused resnet forward or attention processor now run
    count = 0

    for m in model.modules():
        if _resnet_supported(m):
            m.forward = functools.partial(_resnet_forward, m)
            undo.append(functools.partial(_restore_forward, weakref.ref(m)))
            handled.update((id(m.norm1), id(m.norm2)))
            count += 2
        elif isinstance(m, ResnetBlock2D) and _has_fused_forward(m):
            handled.update((id(m.norm1), id(m.norm2)))  # patched before

    for m in model.modules():
        if not isinstance(m, Attention):
            continue
        proc = getattr(m, "processor", None)
        if isinstance(proc, FastdiffAttnProcessor):
            handled.add(id(m.group_norm))
        elif type(proc) in (AttnProcessor2_0, AttnProcessor):
            m.set_processor(ours := FastdiffAttnProcessor(proc))
            undo.append(functools.partial(_restore_processor, weakref.ref(m), proc, ours))
            handled.add(id(m.group_norm))
            count += 1

    for m in model.modules():
        if isinstance(m, _OUT_NORM_OWNERS) and _is_plain_group_norm(getattr(m, "conv_norm_out", None)) \
                and isinstance(getattr(m, "conv_act", None), torch.nn.SiLU):
            _swap(m, "conv_norm_out", _fused_group_norm_like(m.conv_norm_out, "silu"), undo)
            _swap(m, "conv_act", torch.nn.Identity(), undo)
            count += 1

    for parent, name, child in list(_named_parents(model)):
        if _is_plain_group_norm(child) and id(child) not in handled:
            _swap(parent, name, _fused_group_norm_like(child, None), undo)
            count += 1

    if undo:
        _UNDO.setdefault(model, []).extend(undo)
        _COUNT[model] = _COUNT.get(model, 0) + count
    return count


def unpatch(model: torch.nn.Module) -> int:
    """Restore what :func:`patch` (called on this same `model`) replaced: the original forwards, GroupNorm and
    SiLU modules and attention processors. Returns how many layers were restored: the count patch returned
    (it returned the number of undo steps, 22 where patch said 29)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    undo = _UNDO.pop(model, [])
    for fn in reversed(undo):
        fn()
    return _COUNT.pop(model, 0)


def is_patched(model: torch.nn.Module) -> bool:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return bool(_UNDO.get(model))


# -- sampling -----------------------------------------------------------------------------------------------------
class _SamplingModel(torch.nn.Module):
    """model(x, t, y=None, context=None) -> tensor, over a diffusers U-Net's
    unet(sample, timestep, encoder_hidden_states=context, class_labels=y, return_dict=False)[0]."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        target = getattr(unet, "_orig_mod", unet)  # a torch.compile'd U-Net: look at the module it wraps
        params = inspect.signature(target.forward).parameters
        self._return_dict = "return_dict" in params
        self._timestep_kw = "timestep" in params
        self._ctx = "encoder_hidden_states" in params
        # UNet2DConditionModel takes class_labels whatever its config and ignores them without a class embedding
        # (class_embed_type and num_class_embeds None): refuse y there, or guidance on labels would silently be none
        self._cls = "class_labels" in params
        self._no_cls_embedding = getattr(target, "class_embedding", True) is None

    def forward(self, x, t, y=None, context=None, **extra):
        kw = dict(extra)  # fastdiff.sample's model_kwargs (added_cond_kwargs, pooled_projections, ...)
        for name, given, ours in (("context", context, "encoder_hidden_states"), ("y", y, "class_labels"),
                                  ("t", t, "timestep")):
            if ours in kw and (given is not None or ours == "timestep"):
                raise TypeError(f"model_kwargs: {ours!r} is what {name} is passed as; give it once, as {name}")
        if context is not None:
            if not self._ctx:
                raise TypeError(f"context: {type(self.unet).__name__} takes no encoder_hidden_states")
            kw["encoder_hidden_states"] = context
        if y is not None:
            if not self._cls or self._no_cls_embedding:
                why = " (it has no class embedding)" if self._cls else ""
                raise TypeError(f"y: {type(self.unet).__name__} takes no class_labels{why}")
            kw["class_labels"] = y
        if self._return_dict:
            kw["return_dict"] = False
        # the timestep by name: U-Nets take it second, the SD3 / Flux transformers after encoder_hidden_states
        out = self.unet(x, timestep=t, **kw) if self._timestep_kw else self.unet(x, t, **kw)
        if isinstance(out, (tuple, list)):
            return out[0]
        return getattr(out, "sample", out)


def is_diffusers_model(model) -> bool:
    target = getattr(model, "_orig_mod", model)
    return type(target).__module__.startswith("diffusers.")


def sampling_model(unet) -> torch.nn.Module:
    """`unet` (a diffusers U-Net, patched or not, possibly torch.compile'd) as a fastdiff sampling model:
    ``m(x, t, y=None, context=None)`` returning the prediction tensor. Other models are returned as they are."""
    if isinstance(unet, _SamplingModel) or not is_diffusers_model(unet):
        return unet
    return _SamplingModel(unet)


# -- a diffusers pipeline's scheduler -------------------------------------------------------------------------------
def _same(a, b) -> bool:
    """Whether an option's value equals its default (arrays and sequences compared by value)."""
    try:
        return bool(a == b) if not isinstance(a, (list, tuple)) else list(a) == list(b)
    except (TypeError, ValueError):  # (an array against a scalar default: not the default)
        return False


def _same_value(a, b) -> bool:
    """Config values compared as JSON would hold them (tuples as lists, arrays and tensors as lists)."""
    def plain(v):
        if isinstance(v, (np.ndarray, torch.Tensor)):
            return v.tolist()
        if isinstance(v, (list, tuple)):
            return [plain(u) for u in v]
        return v

    try:
        return bool(plain(a) == plain(b))
    except (TypeError, ValueError):
        return False


class FastdiffScheduler(SchedulerMixin):
    """A diffusers scheduler that steps with a fastdiff sampler: ``pipe.scheduler = FastdiffScheduler.from_scheduler(
    pipe.scheduler)`` and the pipeline's own loop runs the fused sampler step (guidance combination aside, which the
    pipeline does itself), on the trajectory of the scheduler it replaces (fastdiff.diffusion.from_scheduler picks
    the sampler; DDPM, DDIM, Euler, Euler ancestral, Heun, DPM-Solver++, UniPC, LCM, flow-matching Euler).

    It speaks the scheduler protocol pipelines use: ``set_timesteps(n, device=, mu=)``, ``timesteps``, ``order``,
    ``init_noise_sigma``, ``scale_model_input(x, t)``, ``step(model_output, t, x, ...)`` (a ``SchedulerOutput``, or a
    tuple with ``return_dict=False``), ``add_noise`` / ``scale_noise`` and ``set_begin_index`` (image-to-image),
    ``config`` (the replaced scheduler's), ``save_pretrained`` / ``from_pretrained`` (the replaced scheduler's
    config file: ``pipe.save_pretrained`` then ``from_pretrained`` gives a FastdiffScheduler again, and the saved
    scheduler folder loads into the diffusers scheduler too). Steps are counted as diffusers counts them: the step index starts
    at the first ``step`` (or ``scale_model_input``) of a run, at ``begin_index`` or where `t` is in ``timesteps``.

    Noise: a stochastic sampler draws it in the kernel from a seed; the ``generator`` a pipeline passes to ``step``
    gives that seed (one draw from it at a run's first step), so the same generator gives the same images, but not
    the images diffusers' scheduler draws with it. ``eta`` (DDIM) and ``use_clipped_model_output`` take effect at a
    run's first step; custom ``timesteps=`` (e.g. Align Your Steps) are taken by DDPM, Euler, Heun, DPM-Solver++
    (multistep and single-step), LCM, TCD and flow matching, custom ``sigmas=`` by Euler and flow matching (Flux's
    pipeline passes them), as by the diffusers schedulers they replace; the others refuse them with a ValueError
    naming the argument.
    """

    def __init__(self, sampler, scheduler=None):
        from fastdiff.diffusion import Sampler
        from fastdiff.diffusion.samplers import DIFFUSERS_SCHEDULERS

        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler: expected a fastdiff sampler, got {type(sampler).__name__}")
        if scheduler is None:  # the diffusers scheduler this sampler follows, for config and save_pretrained
            import diffusers

            name = next((k for k, v in DIFFUSERS_SCHEDULERS.items() if v is type(sampler)), None)
            if name is None:
                raise ValueError(f"sampler: {type(sampler).__name__} has no diffusers scheduler counterpart")
            cls = getattr(diffusers, name)
            # options the diffusers class does not take (DPM++ SDE's s_noise, a step argument there) go into its
            # config only where they differ from their defaults (kept for save_pretrained; diffusers warns of them)
            takes = inspect.signature(cls.__init__).parameters
            cfg = {k: v for k, v in sampler.config.items()
                   if (k != "trained_betas" or v is not None) and (k in takes or not _same(v, sampler._options[k]))}
            own = sorted(k for k in cfg if k not in takes)
            if own:  # named, so that a conversion back keeps them (it drops what the class ignores otherwise)
                cfg[FASTDIFF_OPTIONS] = own
            scheduler = cls.from_config(cfg)
        self.sampler = sampler
        self._base = scheduler
        self._step = None  # the step index of the run under way (diffusers' step_index)
        self._begin = None
        self._started = False  # the run's first step has applied eta / use_clipped_model_output / generator
        self._sigmas = None  # the custom sigmas of the run (flow matching, Euler), for its re-plans
        self._timesteps = None  # likewise its custom timesteps
        self._run_kw = {}  # and the set_timesteps arguments it passed (LCM's strength)
        self._n = None  # the num_inference_steps of the run, likewise
        self._run_edits = {}  # sampler options this run changed, with their values before it (restored after it)

    @classmethod
    def from_scheduler(cls, scheduler, **overrides) -> "FastdiffScheduler":
        """The FastdiffScheduler that follows `scheduler` (a diffusers scheduler), with its config plus overrides."""
        from fastdiff.diffusion import from_scheduler

        return cls(from_scheduler(scheduler, **overrides), scheduler)

    # -- what pipelines read ---------------------------------------------------------------------------------------
    @property
    def config(self):
        return self._synced_base().config

    def _synced_base(self):
        """The replaced scheduler with this sampler's options as they are now (overrides given to from_scheduler,
        edits of sampler.config), rebuilt where they differ: what ``config`` shows and ``save_pretrained`` writes.
        They showed and saved the replaced scheduler's, so a saved and reloaded scheduler followed another
        trajectory. Options the diffusers class has no argument for go under "fastdiff_options" (as __init__ puts
        them); options changed for one run only (set_timesteps' options, step's eta) are left out."""
        base, s = self._base, self.sampler
        cfg = base.config
        takes = _INIT_ARGS.get(type(base))
        if takes is None:
            takes = _INIT_ARGS[type(base)] = frozenset(inspect.signature(type(base).__init__).parameters)
        own = set(cfg.get(FASTDIFF_OPTIONS) or ())
        update = {}
        for k, v in s.config.items():
            if k in self._run_edits or (k == "trained_betas" and v is None):
                continue
            if k in cfg and _same_value(cfg[k], v):
                continue
            if k in takes:
                update[k] = v
            elif not _same_value(v, s._options.get(k)):
                update[k] = v
                own.add(k)
        if update:
            new = {**cfg, **update}
            if "_use_default_values" in new:  # from_config resets the keys listed there to the class's defaults
                new["_use_default_values"] = [k for k in new["_use_default_values"] if k not in update]
            if own:
                new[FASTDIFF_OPTIONS] = sorted(own)
            self._base = type(base).from_config(new)
        return self._base

    @property
    def order(self) -> int:
        return self.sampler.order

    @property
    def init_noise_sigma(self) -> float:
        return self.sampler.init_noise_sigma

    @property
    def timesteps(self):
        return self.sampler.timesteps

    @property
    def num_inference_steps(self):
        return self.sampler.num_inference_steps

    @property
    def sigmas(self):
        s = self.sampler.sigmas
        return None if s is None else torch.as_tensor(s, dtype=torch.float32)

    @property
    def step_index(self):
        return self._step

    @property
    def begin_index(self):
        return self._begin

    def __len__(self):
        return int(self.config.get("num_train_timesteps", 1000))

    def __repr__(self):
        return f"FastdiffScheduler({self.sampler!r})"

    def save_pretrained(self, *args, **kwargs):
        return self._synced_base().save_pretrained(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, **kwargs) -> "FastdiffScheduler":
        """The FastdiffScheduler for a saved scheduler config (a folder with scheduler_config.json, or a Hub id with
        `subfolder`), following the diffusers scheduler class it names."""
        import diffusers

        cfg = diffusers.DDIMScheduler.load_config(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        name = cfg.get("_class_name")
        base_cls = getattr(diffusers, name, None) if isinstance(name, str) else None
        if base_cls is None:
            raise ValueError(f"pretrained_model_name_or_path: the config names no diffusers scheduler ({name!r})")
        return cls.from_scheduler(base_cls.from_config(cfg))

    # -- the run ----------------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps=None, device=None, mu=None, sigmas=None, timesteps=None, **options):
        """As a diffusers scheduler's. `timesteps`: custom timesteps (DDPM, Euler, Heun, DPM-Solver++ multistep and
        single-step, LCM, TCD, flow matching; e.g. Align Your Steps: pipelines pass them through
        retrieve_timesteps). `sigmas`: custom sigmas (Euler: n + 1 noise levels; flow matching: n sigmas before
        shifting, as the Flux pipeline passes them). `options`: scheduler options some pipelines pass here (LCM's
        original_inference_steps), applied to the sampler's config when not None."""
        s = self.sampler
        if self._run_edits:  # options of the last run (its set_timesteps options, step's eta): diffusers' are per call
            s.config.update(self._run_edits)
            self._run_edits = {}
        if sigmas is not None and "sigmas" not in s._custom_schedules:
            raise ValueError(f"sigmas: custom sigmas are not supported by {type(s).__name__} (Euler and flow "
                             f"matching take them)")
        if timesteps is not None and "timesteps" not in s._custom_schedules:
            s._check_custom_timesteps(timesteps)  # raises, naming the samplers that take them
        if num_inference_steps is None and sigmas is None and timesteps is None:
            raise ValueError("num_inference_steps: required when no custom timesteps or sigmas are given")
        takes = inspect.signature(s.set_timesteps).parameters
        run_kw = {k: v for k, v in options.items() if k in takes and k not in s.config and v is not None}
        options = {k: v for k, v in options.items() if k not in run_kw}  # (LCM's strength: an argument, kept)
        for k, v in options.items():
            if k not in s.config:
                raise TypeError(f"{k}: not an option of {type(s).__name__} (FastdiffScheduler.set_timesteps)")
        kw = dict(run_kw)
        if mu is not None:
            if "mu" not in takes:
                raise ValueError(f"mu: {type(s).__name__} takes no mu (only dynamic shifting does)")
            kw["mu"] = mu
        if sigmas is not None:
            kw["sigmas"] = sigmas
        if timesteps is not None:
            kw["timesteps"] = timesteps
        before = dict(s.config)
        s.config.update({k: v for k, v in options.items() if v is not None})
        try:
            s.set_timesteps(num_inference_steps, device=device, **kw)
        except Exception:
            s.config.clear()
            s.config.update(before)
            raise
        # for this run only (LCM's original_inference_steps stayed for every later run)
        self._run_edits = {k: before[k] for k, v in options.items() if v is not None and not _same(v, before[k])}
        self._sigmas = sigmas  # given again at every re-plan of this run
        self._timesteps = timesteps
        self._run_kw = run_kw
        # the steps asked for, which re-plans ask for again (the sampler's num_inference_steps can count otherwise:
        # Heun and PNDM count model calls, DPM-Solver++ can run fewer)
        self._n = num_inference_steps
        self._step = self._begin = None
        self._started = False

    def set_begin_index(self, begin_index: int = 0):
        """Image-to-image: the run starts at step index `begin_index` (a multistep sampler's first-order step)."""
        self._replan(begin_index=int(begin_index))
        self._begin = int(begin_index)

    def _replan(self, seed=None, begin_index=None):
        s = self.sampler
        s._require()
        kw = {"mu": s.mu} if s.mu is not None else {}
        if self._sigmas is not None:
            kw["sigmas"] = self._sigmas
        if self._timesteps is not None:
            kw["timesteps"] = self._timesteps
        kw.update(self._run_kw)
        n = self._n
        if n is None and "sigmas" not in kw and "timesteps" not in kw:
            raise RuntimeError("FastdiffScheduler: call set_timesteps(num_inference_steps) first")
        s.set_timesteps(n, seed=s.seed if seed is None else seed,
                        begin_index=s._begin_index if begin_index is None else begin_index, **kw)

    def _index(self, timestep) -> int:
        """The step index of the run: where it stands, else its start (begin_index, or `timestep` looked up; a run
        that starts past index 0 without set_begin_index is re-planned to start there, as diffusers counts its
        multistep history from a run's first step)."""
        if self._step is None:
            self.sampler._require()
            start = self._begin if self._begin is not None else self._index_of(timestep)
            if start != self.sampler._begin_index:
                self._replan(begin_index=start)
            self._step = start
        return self._step

    def _index_of(self, timestep) -> int:
        ts = self.sampler.timesteps
        t = timestep.to(ts.device) if isinstance(timestep, torch.Tensor) else timestep
        hits = (ts == t).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep: {timestep!r} is not one of this run's timesteps")
        return int(hits[1 if len(hits) > 1 else 0])  # as diffusers: the second of two equal ones (Heun)

    def scale_model_input(self, sample, timestep=None):
        self._follow(sample)
        return self.sampler.scale_model_input(sample, self._index(timestep))

    def _follow(self, x):
        # pipelines that call set_timesteps(n) without a device run the model elsewhere: the tables follow x
        if isinstance(x, torch.Tensor) and x.device != self.sampler.device:
            self.sampler.to(x.device)

    def step(self, model_output, timestep, sample, eta=None, use_clipped_model_output=None, generator=None,
             return_dict=True, **kwargs):
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        if kwargs:
            raise TypeError(f"{next(iter(kwargs))}: not an argument of FastdiffScheduler.step")
        self._follow(sample)
        i = self._index(timestep)
        if not self._started:
            self._first_step_options(eta, use_clipped_model_output, generator)
            self._started = True
        per_sample = isinstance(generator, (list, tuple)) and self.sampler._stochastic
        # a list of generators (one per sample, as pipelines pass generator=[...]): each sample's noise from its
        # own, drawn at every step (the in-kernel noise of one seed depends on a sample's place in the batch)
        out = self.sampler.step(model_output, i, sample, generator=list(generator) if per_sample else None)
        self._step = i + 1
        # what the replaced scheduler's step returns besides prev_sample: pred_original_sample (DDPM, DDIM, Euler,
        # ...), LCM's denoised (the LCM pipelines unpack `latents, denoised` and decode denoised); fields this
        # sampler has no value for (TCD's pred_noised_sample) are left out, as diffusers leaves out None fields
        cls, fields = self._output_type()
        values = {"prev_sample": out}
        if "pred_original_sample" in fields:
            values["pred_original_sample"] = self.sampler.predict_x0(model_output, i, sample)
        if "denoised" in fields and hasattr(self.sampler, "_consistency"):
            values["denoised"] = self.sampler.denoised(model_output, i, sample)
        result = cls(**values) if cls is not SchedulerOutput else SchedulerOutput(prev_sample=out)
        return result if return_dict else result.to_tuple()

    def _output_type(self):
        """The replaced scheduler's step output class (the BaseOutput its module defines, else SchedulerOutput) and
        its fields; looked up once per class."""
        import dataclasses
        import sys

        from diffusers.schedulers.scheduling_utils import SchedulerOutput
        from diffusers.utils import BaseOutput

        base = type(self._base)
        got = _OUTPUT_TYPES.get(base)
        if got is None:
            mod = sys.modules.get(base.__module__)
            found = [v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, BaseOutput)
                     and v.__module__ == base.__module__ and "Output" in v.__name__] if mod else []
            cls = found[0] if len(found) == 1 else SchedulerOutput
            got = _OUTPUT_TYPES[base] = (cls, tuple(f.name for f in dataclasses.fields(cls)))
        return got

    def _first_step_options(self, eta, use_clipped, generator):
        s = self.sampler
        edits = {}
        if eta is not None and "eta" in s.config and float(eta) != s.config["eta"]:
            edits["eta"] = float(eta)
        if use_clipped is not None and "use_clipped_model_output" in s.config and \
                bool(use_clipped) != s.config["use_clipped_model_output"]:
            edits["use_clipped_model_output"] = bool(use_clipped)
        if edits:
            for k in edits:  # for this run only, as diffusers' step arguments are (eta stayed on for later runs)
                self._run_edits.setdefault(k, s.config[k])
            s.config.update(edits)  # first: eta > 0 is what makes DDIM stochastic
        seed = None
        if isinstance(generator, torch.Generator) and s._stochastic:  # (a list draws its noise at every step)
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        if edits or seed is not None:
            self._replan(seed=seed)

    def add_noise(self, original_samples, noise, timesteps):
        """x0 noised to the level of `timesteps` (one per sample, or one for all), as diffusers' add_noise (flow
        matching: ``scale_noise``), which picks the step as diffusers does: each timestep looked up in the run's
        timesteps when no begin_index was set; else the run's current step (inpainting, after a step), or
        begin_index before the first."""
        t = torch.as_tensor(timesteps).reshape(-1)
        n = original_samples.shape[0]
        if t.numel() not in (1, n):
            raise ValueError(f"timesteps: expected 1 or {n} (the batch) timesteps, got {t.numel()}")
        if self._begin is None and (self.sampler.num_inference_steps is None or not all(
                bool((self.sampler.timesteps == v).any()) for v in t.tolist())):
            # training-time noising (before set_timesteps, or at timesteps outside the run, as a training loop
            # draws them): the diffusers scheduler's own add_noise, which DDPM/DDIM-style schedulers answer from
            # their training schedule (and others, as in diffusers, with an error of their own)
            return self._base.add_noise(original_samples, noise, timesteps)
        if self._begin is None:
            idx = [self._index_of(v) for v in t.tolist()]
        else:
            idx = [self._step if self._step is not None else self._begin]
        if len(set(idx)) == 1:
            return self.sampler.add_noise(original_samples, noise, idx[0])
        return torch.cat([self.sampler.add_noise(original_samples[j:j + 1], noise[j:j + 1], i)
                          for j, i in enumerate(idx)])

    def scale_noise(self, sample, timestep, noise=None):
        return self.add_noise(sample, noise, timestep)
