"""The segmentation family: decoders on frozen / fine-tuned / random encoders, PANGAEA-style."""
