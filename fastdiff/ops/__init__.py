"""The public functional ops. Each validates its arguments, picks a backend and calls the fused kernel."""
from fastdiff.ops.attention import attention
from fastdiff.ops.group_norm import group_norm
from fastdiff.ops.sampler_step import sampler_step

__all__ = ["group_norm", "attention", "sampler_step"]
