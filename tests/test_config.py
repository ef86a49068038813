"""Configs: presets of every release, construction from released config.json files, validation."""

import dataclasses
import json

import pytest

from mgjax.config import (CLIPConfig, ConvNextConfig, LMConfig, MGMConfig, convnext_from_open_clip,
                          family_of)
from mgjax.presets import PRESETS, preset
from mgjax.errors import MGJaxError
from helpers import GOLDEN

RELEASED = ["MGM-2B", "MGM-7B", "MGM-13B", "MGM-8B", "MGM-8x7B", "MGM-34B",
            "MGM-7B-HD", "MGM-13B-HD", "MGM-8B-HD", "MGM-8x7B-HD", "MGM-34B-HD"]
STAGE1 = ["MGM-2B-Pretrain", "MGM-7B-Pretrain", "MGM-13B-Pretrain", "MGM-8x7B-Pretrain", "MGM-34B-Pretrain"]


def test_every_release_has_a_preset():
    assert sorted(PRESETS) == sorted(RELEASED + STAGE1)
    for name in RELEASED:
        c = preset(name)
        hd = name.endswith("-HD")
        assert c.tokens_per_image == (2880 if hd else 576), name
        assert (c.image_size_aux, c.image_grid, c.image_global, c.max_length) == (
            (1536, 2, True, 4096) if hd else (768, 1, False, 2048)), name
        assert c.mm_hidden_size_aux == 2880 and c.clip_layers_used == 23


@pytest.mark.parametrize("name,family,template,shape", [
    ("MGM-2B", "gemma", "gemma", (2048, 18, 8, 1, 256, 16384, 256000)),
    ("MGM-7B", "llama", "vicuna_v1", (4096, 32, 32, 32, 128, 11008, 32000)),
    ("MGM-13B-HD", "llama", "vicuna_v1", (5120, 40, 40, 40, 128, 13824, 32000)),
    ("MGM-8B", "llama", "llama_3", (4096, 32, 32, 8, 128, 14336, 128256)),
    ("MGM-8x7B-HD", "mixtral", "mistral_instruct", (4096, 32, 32, 8, 128, 14336, 32000)),
    ("MGM-34B", "llama", "chatml_direct", (7168, 60, 56, 8, 128, 20480, 64000)),
])
def test_preset_llm_shapes(name, family, template, shape):
    c = preset(name)
    lm = c.lm
    assert (lm.family, c.template) == (family, template)
    assert (lm.hidden_size, lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.head_dim, lm.intermediate_size,
            lm.vocab_size) == shape


def test_stage1_templates_and_unknown_preset():
    assert preset("MGM-7B-Pretrain").template == "plain"
    assert preset("MGM-2B-Pretrain").template == "gemma"
    with pytest.raises(MGJaxError, match="no preset 'MGM-70B'"):
        preset("MGM-70B")


@pytest.mark.parametrize("case", ["llama_vicuna", "gemma"])
def test_from_released_config(case):
    meta = json.loads((GOLDEN / case / "case.json").read_text())
    hf = json.loads((GOLDEN / case / meta["checkpoint_dir"] / "config.json").read_text())
    vision = CLIPConfig.from_hf(meta["clip_tower_config"])
    aux = ConvNextConfig(tuple(meta["convnext_tower"]["depths"]), tuple(meta["convnext_tower"]["dims"]))
    c = MGMConfig.from_hf(hf, vision, aux)
    m = meta["model_config"]
    assert (c.lm.hidden_size, c.lm.num_layers, c.lm.num_heads, c.lm.num_kv_heads, c.lm.head_dim) == (
        m["hidden_size"], m["num_hidden_layers"], m["num_attention_heads"], m["num_key_value_heads"], m["head_dim"])
    assert c.lm.tie_word_embeddings == (case == "gemma") == c.lm.scale_embeddings
    assert c.template == meta["conv_mode"]
    assert c.tokens_per_image == 16 and c.clip_layers_used == 2
    assert c.vision_tower == meta["towers"]["mm_vision_tower"]


@pytest.mark.parametrize("name", [*RELEASED, *STAGE1])
def test_config_to_hf_inverts_from_hf(name):
    """What `mgjax export` writes as config.json reads back as the same model (towers and template come
    from elsewhere: the tower folders and the tokenizer). Also in the same-family tiny configs with the
    non-default activation, tied embeddings and experts (tests/tiny.py)."""
    import tiny
    from mgjax.config import config_to_hf

    configs = [preset(name)]
    if name in ("MGM-2B", "MGM-7B", "MGM-8x7B"):
        configs.append(tiny.mgm({"MGM-2B": "gemma", "MGM-7B": "vicuna", "MGM-8x7B": "mixtral"}[name]))
    for c in configs:
        hf = json.loads(json.dumps(config_to_hf(c)))  # as written to and read from config.json
        assert MGMConfig.from_hf(hf, c.vision, c.vision_aux, c.template) == c, name
        assert family_of(hf) == c.lm.family


def test_gemma_gelu_choice():
    base = dict(model_type="mgm_gemma", vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=4, intermediate_size=16)
    # transformers <= 4.39 (MGM-2B's training) ran "gelu" as exact GELU
    assert LMConfig.from_hf({**base, "hidden_act": "gelu"}).activation == "gelu"
    assert LMConfig.from_hf({**base, "hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh"}).activation \
        == "gelu_tanh"


def test_rope_theta_from_transformers5_configs():
    from transformers import LlamaConfig

    d = LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                    rope_theta=5e5).to_dict()
    assert LMConfig.from_hf(d).rope_theta == 5e5


def test_families():
    assert family_of({"model_type": "mini_gemini"}) == "llama"
    assert family_of({"model_type": "mgm_mixtral"}) == "mixtral"
    assert family_of({"model_type": "mgm_gemma"}) == "gemma"
    with pytest.raises(MGJaxError, match="not an MGM model"):
        family_of({"model_type": "bert"})


def test_invalid_configs_name_the_field():
    c = preset("MGM-7B")
    with pytest.raises(MGJaxError, match="mm_hidden_size 512 != CLIP hidden_size 1024"):
        dataclasses.replace(c, mm_hidden_size=512)
    with pytest.raises(MGJaxError, match="image_global needs image_grid > 1"):
        dataclasses.replace(c, image_global=True)
    with pytest.raises(MGJaxError, match="num_heads 32 is not a multiple of num_kv_heads 5"):
        dataclasses.replace(c.lm, num_kv_heads=5)
    with pytest.raises(MGJaxError, match="RoPE scaling"):
        LMConfig.from_hf(dict(model_type="mgm", vocab_size=8, hidden_size=8, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=16, rope_scaling={"type": "linear"}))


def test_convnext_from_open_clip():
    assert convnext_from_open_clip({"model_cfg": {"vision_cfg": {"timm_model_name": "convnext_large"}}}, None) \
        == ConvNextConfig()
    shapes = {"stages.0.blocks.0.gamma": (4,), "stages.1.blocks.0.gamma": (8,), "stages.2.blocks.0.gamma": (12,),
              "stages.2.blocks.1.gamma": (12,), "stages.3.blocks.0.gamma": (16,)}
    cfg = convnext_from_open_clip({"model_cfg": {"vision_cfg": {"timm_model_name": "tiny"}}}, shapes)
    assert (cfg.depths, cfg.dims) == ((1, 1, 2, 1), (4, 8, 12, 16))
    with pytest.raises(MGJaxError, match="does not know"):
        convnext_from_open_clip({"model_cfg": {"vision_cfg": {"timm_model_name": "tiny"}}}, None)
