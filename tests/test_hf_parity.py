"""Block-level parity with HF PyTorch models built from tiny random configs (float32, CPU).

Every model's weights go THROUGH the checkpoint name mapping: the HF state dict is renamed to the
released MGM names (`model.layers.*`, `model.vision_tower.vision_tower.vision_model.*`,
`model.vision_tower_aux.vision_{stem,stages}.*`, Mixtral's per-expert `w1/w2/w3`) and loaded with
`mgjax.convert.load_params`, so a wrong name, layout or transpose fails here too.

Tolerances: every float check allows max abs error <= rel x max|expected| with rel = 1e-5 (the same
bound as the golden tests); none needed more. Parameters that HF initialises to constants (norm
weights, biases, ConvNeXt's 1e-6 layer scale) are randomised so that they are actually tested.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from mgjax.config import CLIPConfig, LMConfig, MGMConfig
from mgjax.convert import load_params
from mgjax.convert.source import Source
from mgjax.lm.decoder import Decoder
from mgjax.vision.clip import CLIPVisionTower
from mgjax.vision.convnext import ConvNextTrunk, multi_stage_map
import tiny
from helpers import assert_close

REL = 1e-5

TINY_CLIP, TINY_CONVNEXT = tiny.CLIP, tiny.CONVNEXT


def mgm_config(lm: LMConfig | None = None) -> MGMConfig:
    return tiny.mgm(image_size_aux=128, **({"lm": lm} if lm else {}))


def check(actual, expected, what: str, rel: float = REL):
    """assert_close, printing the measured error (visible with `pytest -s`)."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape == e.shape:
        print(f"\n[parity] {what}: max abs err {np.abs(a - e).max():.3g}, "
              f"scale {np.abs(e).max():.3g}, rel {np.abs(a - e).max() / np.abs(e).max():.3g} (bound {rel:g})")
    assert_close(actual, expected, rel, what)


# --- loading through the released names ------------------------------------------------------------

class DictReader:
    """The reader interface `load_params` uses, over an in-memory {released name: array} dict."""

    def __init__(self, tensors: dict, where: str = "<hf state dict>"):
        self.tensors = {k: np.asarray(v) for k, v in tensors.items()}
        self.where = where

    def keys(self):
        return list(self.tensors)

    def __contains__(self, key):
        return key in self.tensors

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def get(self, key):
        return self.tensors[key]

    def source(self, key):
        return f"{self.where}[{key}]"


def torch_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def load_subtree(config: MGMConfig, top: str, module: nn.Module, init_args: tuple, released: dict,
                 method=None) -> dict:
    """Params of `module` (MGM's sub-module `top`) read from `released` (MGM names) by load_params."""
    kw = {} if method is None else {"method": method}
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *init_args, **kw))
    shapes = nn.unbox(variables["params"])
    params = load_params(Source(config, DictReader(released)), {top: shapes}, jnp.float32)
    assert set(params) == {top}
    return params[top]


def _randomize_(model: torch.nn.Module, pattern: str, fn):
    """In place: every parameter whose name matches `pattern` becomes fn(shape)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(pattern, name):
                p.copy_(fn(p.shape))


# --- CLIP --------------------------------------------------------------------------------------------

def test_clip_tower_matches_hf_clip_vision_model():
    """Hidden state -2 minus CLS (MGM's select_layer -2, 'patch'); rel 1e-5."""
    torch.manual_seed(0)
    c = TINY_CLIP
    hf_cfg = tf.CLIPVisionConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                 num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                                 image_size=c.image_size, patch_size=c.patch_size, hidden_act="quick_gelu",
                                 layer_norm_eps=c.layer_norm_eps, attn_implementation="eager")
    assert CLIPConfig.from_hf(hf_cfg.to_dict()) == c
    hf = tf.CLIPVisionModel(hf_cfg).eval()
    _randomize_(hf, r"(layer_?norm\w*|layrnorm)\.weight$", lambda s: 1 + 0.1 * torch.randn(s))
    _randomize_(hf, r"\.bias$", lambda s: 0.1 * torch.randn(s))
    pixels = torch.randn(2, 3, c.image_size, c.image_size)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:].numpy()

    config = mgm_config()
    # HF `[vision_model.]*` -> the released `model.vision_tower.vision_tower.vision_model.*`. The dict keeps
    # the unused last layer and post_layernorm: load_params must accept them (names.ignored).
    # transformers 5's CLIPVisionModel has no `vision_model.` level (it strips it when loading files).
    released = {"model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model."): v
                for k, v in torch_state(hf).items()}
    assert any(".encoder.layers.2." in k for k in released) and any("post_layernorm" in k for k in released)
    tower = CLIPVisionTower(c, config.clip_layers_used)
    x = jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1))  # NCHW -> NHWC
    params = load_subtree(config, "vision_tower", tower, (x,), released)
    assert "layers_2" not in params["encoder"]
    ours = tower.apply({"params": params}, x)
    check(ours, ref, "CLIP hidden_states[-2][:, 1:]")


# --- ConvNeXt ----------------------------------------------------------------------------------------

def hf_convnext_to_released(name: str) -> str | None:
    """HF `ConvNextModel` name -> released MGM (timm / OpenCLIP trunk) name; None for the pooler norm."""
    p = "model.vision_tower_aux."
    rules = (
        (r"embeddings\.patch_embeddings\.(weight|bias)", r"vision_stem.0.\1"),
        (r"embeddings\.layernorm\.(weight|bias)", r"vision_stem.1.\1"),
        (r"encoder\.stages\.(\d+)\.downsampling_layer\.([01])\.(weight|bias)", r"vision_stages.\1.downsample.\2.\3"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter", r"vision_stages.\1.blocks.\2.gamma"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.(weight|bias)", r"vision_stages.\1.blocks.\2.conv_dw.\3"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.(weight|bias)", r"vision_stages.\1.blocks.\2.norm.\3"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.(weight|bias)", r"vision_stages.\1.blocks.\2.mlp.fc1.\3"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.(weight|bias)", r"vision_stages.\1.blocks.\2.mlp.fc2.\3"),
    )
    for pat, rep in rules:
        if re.fullmatch(pat, name):
            return p + re.sub(pat, rep, name)
    if re.fullmatch(r"layernorm\.(weight|bias)", name):  # ConvNextModel's pooled-output norm: not in the trunk
        return None
    raise KeyError(f"unmapped HF ConvNext tensor {name}")


@pytest.fixture(scope="module")
def convnext_pair():
    """(HF stage outputs NCHW, our stage outputs NHWC) for one random batch."""
    torch.manual_seed(1)
    c = TINY_CONVNEXT
    hf = tf.ConvNextModel(tf.ConvNextConfig(depths=list(c.depths), hidden_sizes=list(c.dims), layer_norm_eps=1e-6,
                                            drop_path_rate=0.0, hidden_act="gelu")).eval()
    # HF's layer scale starts at 1e-6 (blocks ~ identity): make every block matter.
    _randomize_(hf, r"layer_scale_parameter$", lambda s: 0.5 * torch.randn(s))
    _randomize_(hf, r"(layernorm|downsampling_layer\.0)\.weight$", lambda s: 1 + 0.1 * torch.randn(s))
    _randomize_(hf, r"\.bias$", lambda s: 0.1 * torch.randn(s))
    # O(1) GELU inputs, so that exact GELU (timm's nn.GELU) is told apart from the tanh approximation.
    _randomize_(hf, r"pwconv1\.weight$", lambda s: 0.3 * torch.randn(s))
    config = mgm_config()
    pixels = torch.randn(2, 3, config.image_size_aux, config.image_size_aux)
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_hidden_states=True)
    # hidden_states = (stem output, stage 0, 1, 2, 3); last_hidden_state is stage 3 without any norm.
    assert len(out.hidden_states) == 5
    ref = [h.numpy() for h in out.hidden_states[1:]]
    np.testing.assert_array_equal(ref[3], out.last_hidden_state.numpy())

    released = {}
    for k, v in torch_state(hf).items():
        name = hf_convnext_to_released(k)
        if name is not None:
            released[name] = v
    trunk = ConvNextTrunk(c)
    x = jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1))
    params = load_subtree(config, "vision_tower_aux", trunk, (x,), released)
    ours = trunk.apply({"params": params}, x)  # deterministic=True by default
    return ref, ours


def test_convnext_stages_match_hf_convnext_model(convnext_pair):
    """The four stage maps (HF hidden_states[1..4], NCHW -> NHWC); rel 1e-5 each."""
    ref, ours = convnext_pair
    assert len(ours) == 4
    for s in range(4):
        check(ours[s], ref[s].transpose(0, 2, 3, 1), f"ConvNeXt stage {s}")


def _torch_multi_stage(stages_nchw):
    h, w = stages_nchw[0].shape[-2:]
    ts = [torch.from_numpy(s) for s in stages_nchw]
    up = [ts[0]] + [F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False) for s in ts[1:]]
    return torch.cat(up, dim=1).numpy().transpose(0, 2, 3, 1)


def test_multi_stage_map_matches_torch_interpolate(convnext_pair):
    """multi_stage_map vs F.interpolate(bilinear, align_corners=False) + concat; rel 1e-5.

    Checked on the HF stages themselves (isolating the resize) and end to end from our trunk."""
    ref, ours = convnext_pair
    expected = _torch_multi_stage(ref)
    isolated = multi_stage_map([jnp.asarray(s.transpose(0, 2, 3, 1)) for s in ref])
    check(isolated, expected, "multi_stage_map on HF stages")
    check(multi_stage_map(ours), expected, "multi_stage_map end to end")


# --- LLMs ----------------------------------------------------------------------------------------------

def released_lm_state(hf_model: torch.nn.Module) -> dict:
    """HF causal-LM state dict -> released MGM names (identical except Mixtral's fused experts, which
    transformers 5 stores as mlp.gate / mlp.experts.{gate_up_proj, down_proj})."""
    out = {}
    for k, v in torch_state(hf_model).items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)", k)
        if m is None:
            out[k] = v
            continue
        base = f"model.layers.{m.group(1)}.block_sparse_moe"
        if m.group(2) == "gate.weight":  # router [E, D]
            out[f"{base}.gate.weight"] = v
        elif m.group(2) == "experts.gate_up_proj":  # [E, 2F, D]: gate rows first, then up (chunk(2, -1))
            f = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{base}.experts.{e}.w1.weight"] = v[e, :f]  # gate [F, D]
                out[f"{base}.experts.{e}.w3.weight"] = v[e, f:]  # up [F, D]
        else:  # down [E, D, F]
            for e in range(v.shape[0]):
                out[f"{base}.experts.{e}.w2.weight"] = v[e]  # [D, F]
    return out


def lm_config_from_hf(hf_cfg) -> LMConfig:
    """LMConfig.from_hf on the dict a released config.json holds.

    transformers 5 moves `rope_theta` into `rope_parameters` in `to_dict()`; released MGM config.json
    files (written by transformers 4.x) have it at the top level, so put it back there.
    """
    d = hf_cfg.to_dict()
    rp = d.pop("rope_parameters", None) or {}
    assert rp.get("rope_type", "default") == "default"
    d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
    return LMConfig.from_hf(d)


def load_decoder(hf_model, lm: LMConfig):
    decoder = Decoder(lm)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = load_subtree(mgm_config(lm), "llm", decoder, (ids, ids, ids > -1), released_lm_state(hf_model),
                          method=Decoder.forward_ids)
    return decoder, params


def run_ours(decoder, params, ids, valid=None):
    ids = jnp.asarray(ids)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    valid = jnp.ones(ids.shape, bool) if valid is None else jnp.asarray(valid)
    return np.asarray(decoder.apply({"params": params}, ids, positions, valid, method=Decoder.forward_ids))


def run_hf(hf_model, ids, mask=None):
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.long)
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()


def random_ids(seed: int, shape=(2, 12), vocab: int = 128):
    return np.random.default_rng(seed).integers(0, vocab, shape)


LLAMA_CASES = {"mha": (4, 10000.0), "gqa": (2, 500000.0)}


@pytest.fixture(scope="module", params=list(LLAMA_CASES))
def llama(request):
    kv, theta = LLAMA_CASES[request.param]
    torch.manual_seed(2)
    hf_cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=kv, intermediate_size=128, rope_theta=theta, rms_norm_eps=1e-5,
                            tie_word_embeddings=False, attn_implementation="eager")
    hf = tf.LlamaForCausalLM(hf_cfg).eval()
    _randomize_(hf, r"norm\.weight$", lambda s: 1 + 0.1 * torch.randn(s))
    lm = lm_config_from_hf(hf_cfg)
    assert lm == LMConfig(family="llama", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=kv, head_dim=16, intermediate_size=128, rope_theta=theta, norm_eps=1e-5,
                          activation="silu", tie_word_embeddings=False,
                          max_position_embeddings=hf_cfg.max_position_embeddings)
    decoder, params = load_decoder(hf, lm)
    return request.param, hf, decoder, params


def test_llama_logits_match_hf(llama):
    """LlamaForCausalLM (MHA theta 1e4, GQA theta 5e5), [2, 12] ids, all valid; rel 1e-5."""
    name, hf, decoder, params = llama
    ids = random_ids(3)
    check(run_ours(decoder, params, ids), run_hf(hf, ids), f"Llama {name} logits")


def test_right_padding_does_not_change_valid_logits(llama):
    """Row 1 right-padded (last 4 invalid, garbage ids there): its valid logits equal the row run alone,
    and the unpadded row 0 still matches HF; rel 1e-5."""
    name, hf, decoder, params = llama
    ids = random_ids(4)
    valid = np.ones(ids.shape, bool)
    valid[1, -4:] = False
    batched = run_ours(decoder, params, ids, valid)
    alone = run_ours(decoder, params, ids[1:, :-4])
    check(batched[1, :-4], alone[0], f"Llama {name} padded row vs alone")
    check(batched[1, :-4], run_hf(hf, ids, valid)[1, :-4], f"Llama {name} padded row vs HF")
    check(batched[0], run_hf(hf, ids[:1])[0], f"Llama {name} unpadded row vs HF")


def test_gemma_mqa_logits_match_hf():
    """GemmaForCausalLM: MQA, head_dim 2 x hidden/heads, GeGLU (tanh), (1 + w) norms, sqrt(hidden)
    embedding scale, tied head; rel 1e-5."""
    torch.manual_seed(5)
    hf_cfg = tf.GemmaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=32, intermediate_size=128,
                            hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
                            attn_implementation="eager")
    hf = tf.GemmaForCausalLM(hf_cfg).eval()
    # Gemma norm weights start at 0 (so 1 + w = 1): perturb them so the (1 + w) convention is tested.
    _randomize_(hf, r"norm\.weight$", lambda s: 0.1 * torch.randn(s))
    # Gate pre-activations of O(1), where tanh-GELU and exact GELU differ, and an up branch large
    # enough to carry the difference: with the default init (std 0.02) using exact GELU instead
    # changes the logits by only 4e-7 relative (undetectable); with these, by 2.6e-4.
    _randomize_(hf, r"(gate|up)_proj\.weight$", lambda s: 0.2 * torch.randn(s))
    lm = lm_config_from_hf(hf_cfg)
    assert lm == LMConfig(family="gemma", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1,
                          head_dim=32, intermediate_size=128, rope_theta=10000.0, norm_eps=1e-6,
                          activation="gelu_tanh", tie_word_embeddings=True,
                          max_position_embeddings=hf_cfg.max_position_embeddings)
    released = released_lm_state(hf)
    # Tied: HF's state dict may carry lm_head.weight as a copy of the embedding (names.ignored drops it).
    if "lm_head.weight" in released:
        np.testing.assert_array_equal(released["lm_head.weight"], released["model.embed_tokens.weight"])
    decoder, params = load_decoder(hf, lm)
    assert "lm_head" not in params
    ids = random_ids(6)
    check(run_ours(decoder, params, ids), run_hf(hf, ids), "Gemma MQA logits")


@pytest.mark.parametrize("moe_impl", ["dense", "ragged"])
def test_mixtral_logits_match_hf(moe_impl):
    """MixtralForCausalLM: 4 experts, top-2, GQA; fused HF experts unstacked to w1/w3/w2; rel 1e-5; the
    experts as the dense reference and through ragged_dot."""
    torch.manual_seed(9)  # with this seed the smallest 2nd-vs-3rd router gap is 4e-3 (seed 7: 3e-5)
    hf_cfg = tf.MixtralConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=96, num_local_experts=4,
                              num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
                              router_jitter_noise=0.0, attn_implementation="eager")
    hf = tf.MixtralForCausalLM(hf_cfg).eval()
    _randomize_(hf, r"norm\.weight$", lambda s: 1 + 0.1 * torch.randn(s))
    # Sharper routing so that no token's 2nd and 3rd experts are a near tie (checked below).
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.gate.weight.mul_(4.0)
    lm = lm_config_from_hf(hf_cfg)
    assert (lm.family, lm.num_experts, lm.num_experts_per_tok, lm.rope_theta) == ("mixtral", 4, 2, 1e6)
    lm = dataclasses.replace(lm, moe_impl=moe_impl)
    ids = random_ids(8)
    t_ids = torch.as_tensor(ids)
    with torch.no_grad():
        out = hf(input_ids=t_ids, attention_mask=torch.ones_like(t_ids), output_router_logits=True)
    for router_logits in out.router_logits:
        p = torch.softmax(router_logits.float(), -1).sort(-1, descending=True).values
        assert float((p[:, 1] - p[:, 2]).min()) > 1e-3, "near-tie in top-2 routing: pick another seed"
    decoder, params = load_decoder(hf, lm)
    assert params["layers_0"]["block_sparse_moe"]["experts"]["w1"].shape == (4, 64, 96)
    check(run_ours(decoder, params, ids), out.logits.numpy(), "Mixtral logits")


# --- generation ----------------------------------------------------------------------------------------

def _word_tokenizer(folder, vocab: int, eos: str):
    """A word-level tokenizer whose ids cover the whole vocabulary: <pad> 0, <s> 1, </s> 2, w3 ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", *(f"w{i}" for i in range(3, vocab))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>")
    fast.save_pretrained(str(folder))


def _hf_beams(hf, prompts, eos: set[int], new: int = 8) -> np.ndarray:
    """HF's beam search answers [B, new], left-padded prompts; what follows a row's end token is 0."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, num_beams=3, do_sample=False,
                          eos_token_id=sorted(eos), pad_token_id=0)[:, width:].numpy()
    return _after_end_zeroed(np.pad(out, ((0, 0), (0, new - out.shape[1]))), eos)


def _after_end_zeroed(ids: np.ndarray, eos: set[int]) -> np.ndarray:
    """What follows the first end token: padding, whatever a library fills it with."""
    ended = np.cumsum(np.isin(ids, list(eos)), axis=1) - np.isin(ids, list(eos)) > 0
    return np.where(ended, 0, ids)


@pytest.mark.parametrize("frequent_ends", [False, True], ids=["rare-end", "frequent-ends"])
def test_beam_search_matches_hf_generate(llama, tmp_path, frequent_ends):
    """`generate(num_beams=3)` on text prompts of two lengths (left-padded, so positions per row) gives HF
    LlamaForCausalLM.generate(num_beams=3, do_sample=False)'s tokens; with end tokens the model likes (the
    later tokens of HF's beams without them, as `stop` words here and eos ids there), finished hypotheses,
    length normalisation, the early-stop rule and the wider candidate pool all take part."""
    from mgjax.model import MGM, init_params
    from mgjax.pretrained import Pretrained

    _, hf, _, params = llama
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128, 9), rng.integers(3, 128, 5)]
    ends = {2}
    if frequent_ends:
        ends |= {int(t) for t in np.unique(_hf_beams(hf, prompts, {2})[:, 2:]) if t > 2}
    _word_tokenizer(tmp_path, 128, "</s>")
    config = tiny.mgm("vicuna", small=True, lm=lm_config_from_hf(hf.config))
    module = MGM(config)
    model = Pretrained(config, {**init_params(module, jax.random.key(0)), "llm": params}, module, tmp_path)
    ours = model.generate(prompts, *model.zero_images(2), max_new_tokens=8, num_beams=3,
                          stop=[f"w{t}" for t in sorted(ends - {2})]).token_ids
    np.testing.assert_array_equal(_after_end_zeroed(ours, ends), _hf_beams(hf, prompts, ends))
    if frequent_ends:
        assert np.isin(ours, list(ends - {2})).any()  # end tokens did end answers
