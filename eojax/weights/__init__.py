"""Import and export of published (PyTorch) checkpoints into eojax parameter trees.

Readers use numpy (safetensors / .npz); torch is touched only to read a .pth, and only when it is
installed, with `weights_only=True`. `satmae` covers SatMAE++ (techmn/satmae_pp).
"""
