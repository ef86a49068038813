"""mgjax: Mini-Gemini (MGM) in JAX/Flax.

The names below load on first use (PEP 562), so that `import mgjax` (and the `mgjax` command, before it has
installed its Ctrl-C handling) does not import JAX and Flax.
"""

import importlib

_HOMES = {"CLIPConfig": "mgjax.config", "ConvNextConfig": "mgjax.config", "LMConfig": "mgjax.config",
          "MGMConfig": "mgjax.config", "PRESETS": "mgjax.presets", "preset": "mgjax.presets",
          "MGJaxError": "mgjax.errors", "MGM": "mgjax.model", "Pretrained": "mgjax.pretrained",
          "load_pretrained": "mgjax.pretrained"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'mgjax' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
