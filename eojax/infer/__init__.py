"""Inference: feature export, sliding-window prediction, sampling."""
