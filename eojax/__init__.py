"""eojax: Earth-observation model families on one JAX/Flax training spine."""

__version__ = "0.1.0"


def load(workdir, *, best: bool = False, step: int | None = None):
    """A trained run of `workdir` (eojax.api.Trained: config, spec, model, params, predict). Imported
    on first use, so `import eojax` stays free of jax."""
    from eojax import api

    return api.load(workdir, best=best, step=step)
