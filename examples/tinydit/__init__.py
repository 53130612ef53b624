"""tinydit: a small MM-DiT trained on procedural captioned shapes, shipped to judge sparsity policies.

Modules: ``data`` (procedural images/videos + captions), ``model`` (the MM-DiT, weight I/O),
``sampler`` (Euler flow matching with a per-step callback), ``metrics`` (PSNR, SSIM, relative L2).
Trained weights live in ``weights/`` (``image.safetensors``, ``video.safetensors``).
"""
