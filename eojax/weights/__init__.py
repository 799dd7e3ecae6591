"""Import and export of published (PyTorch) checkpoints into eojax parameter trees.

Readers use numpy (safetensors / .npz); torch is touched only to read a .pth, and only when it is
installed, with `weights_only=True`. `satmae` covers SatMAE++ (techmn/satmae_pp); `prithvi`, `dofa`, `croma` the segmentation encoders;
`gpt2` Hugging Face GPT-2; `inception` the FID InceptionV3; `common` holds the shared readers and key tables (`common.load_encoder`
dispatches on the encoder module).
"""
