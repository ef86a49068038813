"""mgjax: Mini-Gemini (MGM) in JAX/Flax."""

from mgjax.config import CLIPConfig, ConvNextConfig, LMConfig, MGMConfig
from mgjax.presets import PRESETS, preset
from mgjax.errors import MGJaxError
from mgjax.model import MGM
from mgjax.pretrained import Pretrained, load_pretrained

__all__ = ["CLIPConfig", "ConvNextConfig", "LMConfig", "MGMConfig", "PRESETS", "preset", "MGJaxError", "MGM",
           "Pretrained", "load_pretrained"]
