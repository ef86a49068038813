"""A config for every released MGM model (docs/mgm_spec.md section 1), by name."""

from __future__ import annotations

from mgjax.config import LMConfig, MGMConfig
from mgjax.errors import MGJaxError
from mgjax.families import LLMS

LM_PRESETS = {
    # exact GELU: MGM-2B was trained with transformers 4.39, where `hidden_act="gelu"` was erf GELU.
    "gemma-2b-it": LMConfig(family="gemma", vocab_size=256000, hidden_size=2048, num_layers=18, num_heads=8,
                            num_kv_heads=1, head_dim=256, intermediate_size=16384, norm_eps=1e-6,
                            activation="gelu", tie_word_embeddings=True, max_position_embeddings=8192),
    "vicuna-7b-v1.5": LMConfig(),
    "vicuna-13b-v1.5": LMConfig(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                                intermediate_size=13824),
    "llama-3-8b-instruct": LMConfig(vocab_size=128256, num_kv_heads=8, intermediate_size=14336,
                                    rope_theta=500000.0, max_position_embeddings=8192),
    "mixtral-8x7b-instruct-v0.1": LMConfig(family="mixtral", num_kv_heads=8, intermediate_size=14336,
                                           rope_theta=1e6, num_experts=8, num_experts_per_tok=2,
                                           max_position_embeddings=32768),
    "nous-hermes-2-yi-34b": LMConfig(vocab_size=64000, hidden_size=7168, num_layers=60, num_heads=56,
                                     num_kv_heads=8, intermediate_size=20480, rope_theta=5e6),
}

_RELEASES = {  # name: (LLM preset, row of families.LLMS, has an HD variant, has a stage-1 release)
    "MGM-2B": ("gemma-2b-it", "gemma", False, True),
    "MGM-7B": ("vicuna-7b-v1.5", "vicuna", True, True),
    "MGM-13B": ("vicuna-13b-v1.5", "vicuna", True, True),
    "MGM-8B": ("llama-3-8b-instruct", "llama_3", True, False),
    "MGM-8x7B": ("mixtral-8x7b-instruct-v0.1", "mixtral", True, True),
    "MGM-34B": ("nous-hermes-2-yi-34b", "yi", True, True),
}


def _release(lm_name: str, llm: str, hd: bool, stage1: bool = False) -> MGMConfig:
    template = LLMS[llm].template
    if stage1 and template not in ("gemma", "llama_3"):  # stage 1 trained on `plain` except these two
        template = "plain"
    return MGMConfig(lm=LM_PRESETS[lm_name], image_size_aux=1536 if hd else 768, image_grid=2 if hd else 1,
                     image_global=hd, max_length=4096 if hd else 2048, template=template)


def _presets() -> dict[str, MGMConfig]:
    out = {}
    for name, (lm, llm, hd, stage1) in _RELEASES.items():
        out[name] = _release(lm, llm, False)
        if hd:
            out[f"{name}-HD"] = _release(lm, llm, True)
        if stage1:
            out[f"{name}-Pretrain"] = _release(lm, llm, False, stage1=True)
    return out


PRESETS: dict[str, MGMConfig] = _presets()


def preset(name: str) -> MGMConfig:
    """A released model's config by name (`MGM-7B`, `MGM-34B-HD`, `MGM-13B-Pretrain`, ...)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise MGJaxError(f"no preset {name!r}; known: {', '.join(PRESETS)}") from None
