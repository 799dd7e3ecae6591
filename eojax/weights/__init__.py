"""The one weight-loading contract (`load`) and the shared import / export of published (PyTorch)
checkpoints: `common` (readers, key tables, `common.load_encoder` through each encoder's `converter`),
`prithvi`, `dofa`, `croma` (the shared segmentation encoders) and `gpt2` (Hugging Face GPT-2). A
family's own converters live in its package (SatMAE++: eojax/mae/weights.py; InceptionV3:
eojax/diffusion/inception_weights.py).

Readers use numpy (safetensors / .npz); torch is touched only to read a .pth, and only when it is
installed, with `weights_only=True`.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax

from eojax import checkpoint as ckpt_lib, zoo


def load(init_params: Any, source: str, task, init_model_state: Any = None) -> tuple[Any, Any]:
    """THE weight-loading contract: (params, model_state) for a model whose freshly initialised
    (sharded) variables are `init_params` / `init_model_state`, from `source`:

    - an eojax run folder (or its checkpoints/, best/ or one step folder): its evaluation variables
      (the EMA when the run kept one), every key and shape checked;
    - a published file or folder: the family's converter, `task.load_pretrained_variables(source,
      init_params, init_model_state)` (by default `task.load_pretrained(source, init_params)` with the
      model state as initialised; e.g. Prithvi / DOFA / CROMA / SatMAE++ encoders, Hugging Face GPT-2;
      a torchvision ResNet's running statistics go to the model state), which may keep parts of
      `init_params` (a fresh decoder) and reports missing / unexpected / reshaped keys by name.

    `source` may also be a model-zoo name or Hugging Face URL (zoo:NAME, hf://ORG/REPO/FILE@REV:
    eojax.zoo.resolve downloads it once and checks its sha256).

    The trainer calls it for `config.init_from`; infer, export, FID and the segmentation encoders read
    runs through the same `checkpoint.load_variables`."""
    source = zoo.resolve(source, "config.init_from")
    init_model_state = {} if init_model_state is None else init_model_state
    if ckpt_lib.is_eojax_checkpoint(source):
        return ckpt_lib.load_variables(source, jax_abstract(init_params), jax_abstract(init_model_state))
    if not os.path.exists(source):
        raise FileNotFoundError(f"config.init_from: {source} does not exist")
    params, model_state = task.load_pretrained_variables(source, init_params, init_model_state)
    logging.info("initialised params from the published checkpoint %s", source)
    return params, model_state


def jax_abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with the arrays' shardings) of a tree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)
