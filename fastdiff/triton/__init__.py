"""Triton kernels. Importing a module here requires Triton; fastdiff.ops imports them only when it is present."""
