"""Drop-in nn.Modules over the fused ops."""
from fastdiff.nn.attention import Attention, SpatialSelfAttention
from fastdiff.nn.norm import AdaGroupNorm, GroupNorm

__all__ = ["GroupNorm", "AdaGroupNorm", "Attention", "SpatialSelfAttention"]
