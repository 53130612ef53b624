"""Triton kernels, their torch reference twins, and the torch.library ops (``ops.py``)."""
