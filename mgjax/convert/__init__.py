"""Released PyTorch MGM checkpoints <-> mgjax, one module per job.

readers     named tensors from safetensors / .bin files, folders and views (the `Reader` interface)
names       the name and layout table between mgjax parameters and the released state dict
source      a released checkpoint (config.json, weights, tower folders) as a `Source`
mgjax_ckpt  mgjax checkpoint folders: `convert` writes them, `restore_params` reads them
export      an mgjax checkpoint folder -> the released layout
"""

from __future__ import annotations

import os

from mgjax.convert.mgjax_ckpt import restore_params
from mgjax.convert.source import Source


def load_params(src: Source | str | os.PathLike, shapes: dict, dtype, shardings: dict | None = None) -> dict:
    """Every parameter of `shapes` (a tree of ShapeDtypeStructs) in `dtype`, from a released checkpoint
    (`src` a `Source`: names mapped, layouts converted, everything checked) or an mgjax checkpoint
    folder. With `shardings` (a matching tree of NamedShardings) each process reads only what its
    devices hold."""
    if isinstance(src, Source):
        return src.load(shapes, dtype, shardings)
    return restore_params(src, shapes, dtype, shardings)
