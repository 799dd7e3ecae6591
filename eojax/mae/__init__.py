"""The MAE family: plain ViT-MAE, SatMAE++ (group-channel, multi-scale) and GRID-MAE pretraining."""
