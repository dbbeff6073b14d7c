"""Drop-in nn.Modules over the fused ops."""
from fastdiff.nn.norm import AdaGroupNorm, GroupNorm

__all__ = ["GroupNorm", "AdaGroupNorm"]
