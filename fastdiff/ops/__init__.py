"""The public functional ops. Each validates its arguments, picks a backend and calls the fused kernel."""
from fastdiff.ops.attention import attention
from fastdiff.ops.group_norm import group_norm

__all__ = ["group_norm", "attention"]
