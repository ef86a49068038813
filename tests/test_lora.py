"""LoRA as the original trains it (`--lora_enable`: PEFT adapters on the LLM's linear layers): the adapters'
parameters and targets, a LoRA (and QLoRA) run that trains only them, merged and PEFT-layout exports, and
the original's LoRA folder read back with its base model, for an LLM built like each released family.

References: the model with the adapters merged into its weights (W + alpha / r A B, the math PEFT's
merge_and_unload does), HF PEFT's own LoRA layers on transformers' Llama and Gemma, and the base model
(zero B: an untrained adapter changes nothing)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

import mgjax
import tiny
from helpers import GOLDEN, assert_close
from mgjax.cli import main
from mgjax.config import LORA_TARGETS, LoraConfig
from mgjax.convert.export import write_adapters
from mgjax.errors import MGJaxError
from mgjax.lora import adapted, init_adapters, is_adapter, merged_params
from mgjax.model import MGM, abstract_params
from mgjax.train.config import load_train_config
from mgjax.train.loop import run_setup, train
from mgjax.train.step import split_params
from test_tower_sources import write_release
from test_train import CONFIGS, small_run

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0)


def _with_lora(model: mgjax.Pretrained, lora: LoraConfig, params: dict) -> mgjax.Pretrained:
    config = dataclasses.replace(model.config, lm=dataclasses.replace(model.config.lm, lora=lora))
    return dataclasses.replace(model, config=config, module=MGM(config), params=params, _jitted={})


def _prompt_logits(model: mgjax.Pretrained, text_only: bool = False) -> np.ndarray:
    ids = model.tokenize("what is this ?" if text_only else "<image> what is this ?")[None]
    images = model.zero_images() if text_only else [im + 0.3 for im in model.zero_images()]
    return np.asarray(model.logits(ids, *images))


def _hf_llm(folder, config, peft_folder):
    """transformers' LLM of a released folder with HF PEFT's adapters of `peft_folder` on it."""
    import transformers
    from peft import PeftModel

    hf = json.loads((folder / "config.json").read_text())
    llm_config = {k: v for k, v in hf.items() if not k.startswith(("mm_", "image_", "architectures", "model_type"))}
    cls, cfg = ((transformers.GemmaForCausalLM, transformers.GemmaConfig) if config.lm.family == "gemma" else
                (transformers.LlamaForCausalLM, transformers.LlamaConfig))
    llm = cls.from_pretrained(folder, config=cfg(**llm_config), torch_dtype=torch.float32)
    return PeftModel.from_pretrained(llm, peft_folder).eval()


@pytest.mark.parametrize("family", list(tiny.LMS))
def test_adapters_merge_export_and_load_for_every_family(tmp_path, family):
    """Random adapters on every linear layer the original's find_all_linear_names picks: the adapted model's
    logits equal the merged model's; written in PEFT's layout (+ non_lora_trainables.bin) and read back with
    the base release (`base_llm`, the original's --model-base) they give the same logits; HF PEFT puts them on
    transformers' LLM and gets the same text logits (Llama family, Gemma: transformers 5 fuses Mixtral's
    experts, which the original's per-expert adapters name one by one)."""
    release, _, _ = write_release(tmp_path, family)
    tiny.save_tokenizer(family, release)
    if family == "gemma":  # transformers 5's Gemma runs tanh GELU whatever config.json says: the reference's
        hf = json.loads((release / "config.json").read_text())
        (release / "config.json").write_text(json.dumps({**hf, "hidden_activation": "gelu_pytorch_tanh"}))
    base = mgjax.load_pretrained(release)
    config = dataclasses.replace(base.config, lm=dataclasses.replace(base.config.lm, lora=LORA))
    a_adapters = split_params(abstract_params(MGM(config)), ())[0]
    layers = {"/".join(p) for p in adapted(a_adapters)}
    want = {"self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj"}
    want |= ({"block_sparse_moe/gate", *(f"block_sparse_moe/experts/w{i}" for i in (1, 2, 3))} if family == "mixtral"
             else {"mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"})
    assert {p.split("/", 2)[2].removesuffix("/kernel") for p in layers} == want  # not lm_head, not the towers
    assert all(p.startswith("llm/") for p in layers)

    def with_base(adapters):
        return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base.params),
                                             **traverse_util.flatten_dict(adapters)})

    # Models that differ in parameters only share their compiled programs (dataclasses.replace keeps `_jitted`).
    zero_b = _with_lora(base, LORA, with_base(init_adapters(a_adapters, jax.random.key(0))))
    assert_close(_prompt_logits(zero_b), _prompt_logits(base), 1e-6, "zero B: the base model")
    rng = np.random.default_rng(1)
    params = with_base(jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.2).astype(np.float32), a_adapters))
    adapted_model = dataclasses.replace(zero_b, params=params)
    logits = _prompt_logits(adapted_model)
    assert np.abs(logits - _prompt_logits(base)).max() > 0.1 * np.abs(logits).max()  # the adapters matter
    assert_close(_prompt_logits(dataclasses.replace(base, params=merged_params(params, LORA.scale))), logits, 1e-5,
                 "merged")

    out = write_adapters(tmp_path / "lora", config, lambda abstract: _subtree(params, abstract), ("mm_projector",),
                         json.loads((release / "config.json").read_text()), str(release))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "config.json", "non_lora_trainables.bin"]
    with pytest.raises(MGJaxError, match="LoRA checkpoint.*base_llm"):
        mgjax.load_pretrained(out)
    loaded = mgjax.load_pretrained(out, base_llm=release)
    assert loaded.config == base.config
    assert_close(_prompt_logits(dataclasses.replace(base, params=loaded.params)), logits, 1e-5,
                 "the original's LoRA folder on its base")
    if family != "mixtral":
        with torch.no_grad():
            ids = adapted_model.tokenize("what is this ?")[None].astype(np.int64)
            theirs = _hf_llm(release, config, out)(torch.from_numpy(ids)).logits.numpy()
        assert_close(_prompt_logits(adapted_model, text_only=True)[:, -ids.shape[1]:], theirs, 1e-5, "HF PEFT")


def _subtree(tree: dict, like: dict) -> dict:
    return {k: _subtree(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


def test_lora_run_trains_only_the_adapters_and_exports_both_ways(tmp_path, capsys):
    """A LoRA stage 2 from a released checkpoint: the run's state holds the adapters and the projector (what
    `trainable` names) with their optimizer moments, the LLM's weights stay bit for bit the release's; the run,
    its --merge-lora export and its --lora-only export (read with the release as base) give the same logits."""
    case = GOLDEN / "llama_vicuna"
    args = [f"run_dir={tmp_path / 'run'}", "steps=2", "model.preset=null", "model.tokenizer=null",
            f"model.init={case / 'MGM-7B-tiny'}", "model.stage1=null", "global_batch=8", "micro_batch=8",
            "data.num_samples=16", "data.buckets=[64, 128]", "trainable=[mm_projector]", "optim.lr=0.05"]
    cfg = load_train_config(CONFIGS / "demo" / "stage2_lora.yaml", args)
    setup = run_setup(cfg, tmp_path / "run")
    trained = traverse_util.flatten_dict(setup.a_state.params)
    assert all(is_adapter(p) or p[0] == "mm_projector" for p in trained)
    assert sum(is_adapter(p) for p in trained) == 2 * (7 * 2 + 1)  # A and B of 7 linear layers x 2 layers + head
    # AdamW's two moments of each trainable parameter, and step counters: nothing of the frozen LLM
    moments = [tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
               for path, a in jax.tree_util.tree_leaves_with_path(setup.a_state.opt_state) if a.ndim]
    matched = [q for m in moments for q in trained if m[len(m) - len(q):] == q]  # under optax's group labels
    assert len(matched) == len(moments) and sorted(matched) == sorted([*trained, *trained])
    train(cfg)

    release = mgjax.load_pretrained(case / "MGM-7B-tiny")
    run = mgjax.load_pretrained(tmp_path / "run")
    assert run.config.lm.lora == cfg.model.lora
    for path, value in traverse_util.flatten_dict(run.params["llm"]).items():
        if not is_adapter(path):
            np.testing.assert_array_equal(value, traverse_util.flatten_dict(release.params["llm"])[path])
    assert not np.array_equal(run.params["mm_projector"]["0"]["kernel"], release.params["mm_projector"]["0"]["kernel"])
    logits = _prompt_logits(run)
    assert np.abs(logits - _prompt_logits(release)).max() > 1e-3 * np.abs(logits).max()

    assert main(["export", str(tmp_path / "run"), str(tmp_path / "plain")]) == 2
    assert "trained LoRA adapters: pass --merge-lora" in capsys.readouterr().err
    shutil.copytree(case / "model_zoo", tmp_path / "model_zoo")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "lora"), "--lora-only"]) == 0
    merged = mgjax.load_pretrained(tmp_path / "merged")
    assert merged.config == release.config
    assert_close(_prompt_logits(dataclasses.replace(release, params=merged.params)), logits, 1e-5, "--merge-lora")
    # what write_adapters writes is read back, by mgjax and by HF PEFT, in the family test above
    lora = mgjax.load_pretrained(tmp_path / "lora", base_llm=case / "MGM-7B-tiny")
    assert lora.config == release.config
    assert_close(_prompt_logits(dataclasses.replace(release, params=lora.params)), logits, 1e-5,
                 "--lora-only with its base")
    peft = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (peft["r"], peft["lora_alpha"], peft["base_model_name_or_path"]) == (4, 16.0, str(case / "MGM-7B-tiny"))
    assert "lm_head" in peft["target_modules"] and "model.layers.1.mlp.down_proj" in peft["target_modules"]
    assert main(["export", str(tmp_path / "merged"), str(tmp_path / "x"), "--lora-only"]) == 2
    assert "holds no LoRA adapters" in capsys.readouterr().err


def test_lora_config_and_its_errors(tmp_path):
    """model.lora in a train config; what it rejects, each with the key and the fix."""
    cfg = load_train_config(CONFIGS / "demo" / "stage2_lora.yaml",
                            small_run(tmp_path / "run", "model.lora={rank: 2, targets: [llm/*self_attn/q_proj]}"))
    assert (cfg.model.lora.rank, cfg.model.lora.targets, cfg.trainable) == (2, ("llm/*self_attn/q_proj",), ())
    assert LoraConfig().targets == LORA_TARGETS
    assert load_train_config(CONFIGS / "demo" / "stage2_lora.yaml").model.lora.targets == (*LORA_TARGETS[:2],
                                                                                            "llm/lm_head")
    setup = run_setup(cfg, tmp_path / "run")
    assert {p[-2:] for p in traverse_util.flatten_dict(setup.a_state.params)} == \
        {("q_proj", "lora_a"), ("q_proj", "lora_b")}
    for bad, culprit in ((["model.lora.rank=0"], "rank 0 must be >= 1"),
                         (["model.lora.dropout=1.5"], "dropout 1.5"),
                         (["model.lora=null", "model.quantize=int8"], "set model.lora"),
                         (["model.quantize=int3"], "none|int8|int4"),
                         (["model.lora.targets=[llm/*/qproj]"], "'llm/\\*/qproj' matches none"),
                         (["trainable=[llm]"], "trainable 'llm' covers llm/layers_0/.*lora adapts")):
        with pytest.raises(MGJaxError, match=culprit):
            run_setup(load_train_config(CONFIGS / "demo" / "stage2_lora.yaml",
                                        small_run(tmp_path / "run", *bad)), tmp_path / "run")


def test_expert_adapters_in_both_expert_implementations():
    """Mixtral's per-expert adapters: the ragged dispatch equals the dense reference (relative 1e-5); under
    dropout (a "dropout" rng: training) each draws its masks from the key, the same key the same output,
    without one no dropout at all."""
    from mgjax.layers.mlp import MoE

    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    out = {}
    for impl in ("dense", "ragged"):
        moe = MoE(4, 2, 16, "silu", impl, lora=LoraConfig(rank=2, dropout=0.5, targets=("*",)))
        params = jax.tree.map(lambda a: a + 0.1, moe.init(jax.random.key(0), x)["params"])  # B != 0
        out[impl] = moe.apply({"params": params}, x)
        drawn = [moe.apply({"params": params}, x, rngs={"dropout": jax.random.key(k)}) for k in (1, 1, 2)]
        np.testing.assert_array_equal(drawn[0], drawn[1])
        assert not np.allclose(drawn[0], out[impl]) and not np.allclose(drawn[0], drawn[2])
        assert np.isfinite(np.asarray(drawn[0])).all()
    assert {p[-1] for p in traverse_util.flatten_dict(params)} >= {"w1_lora_a", "w2_lora_b", "lora_a"}
    assert_close(out["ragged"], out["dense"], 1e-5, "ragged vs dense experts with adapters")


def test_lora_folder_errors(tmp_path):
    """An original LoRA folder that does not fit its base: each error names the file or tensor and the fix
    (nothing is compiled: loading stops while planning)."""
    from safetensors.numpy import save_file

    base, zoo = GOLDEN / "llama_vicuna" / "MGM-7B-tiny", GOLDEN / "llama_vicuna" / "model_zoo" / "OpenAI"
    clip, convnext = "clip-vit-large-patch14-336-tiny", "openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup-tiny"
    hidden = json.loads((base / "config.json").read_text())["hidden_size"]
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    good = {f"{q}.lora_A.weight": np.zeros((2, hidden), np.float32),
            f"{q}.lora_B.weight": np.zeros((hidden, 2), np.float32)}
    cases = {"no adapters": (None, {}, "no adapter_model"),
             "unknown layer": ({k.replace("q_proj", "x_proj"): v for k, v in good.items()}, {},
                               "x_proj.weight' is not"),
             "half a pair": ({f"{q}.lora_A.weight": good[f"{q}.lora_A.weight"]}, {}, "pair is incomplete"),
             "wrong shape": ({**good, f"{q}.lora_A.weight": np.zeros((2, hidden + 1), np.float32)}, {},
                             "belong to another model"),
             "DoRA": (good, {"use_dora": True}, "use_dora is not supported")}
    for name, (tensors, extra, culprit) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        shutil.copy(base / "config.json", folder / "config.json")
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **extra}))
        if tensors is not None:
            save_file(tensors, folder / "adapter_model.safetensors")
        with pytest.raises(MGJaxError, match=culprit):
            mgjax.load_pretrained(folder, base_llm=base, vision_tower=zoo / clip, vision_tower_aux=zoo / convnext)
