"""eojax: Earth-observation model families on one JAX/Flax training spine."""

__version__ = "0.1.0"
