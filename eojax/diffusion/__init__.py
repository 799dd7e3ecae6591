"""Diffusion building blocks: noise schedules, training targets and losses, samplers, Frechet distance."""
