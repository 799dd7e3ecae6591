"""Scene classification: single- and multi-label heads on the shared encoders, linear probe, fine-tune, k-NN."""
