"""Tower weights come from where the original's loader takes them.

The original (`load_pretrained_model` in mgm/model/builder.py) builds both towers from their folders, then
`initialize_uni_modules` (mgm/model/mgm_arch.py) reads the shards holding vlm_uni_* and overwrites CLIP with
the checkpoint's copy found there, and the ConvNeXt only when config.json's `optimize_vision_tower_aux` is
true. Each test here writes a released-layout bfloat16 checkpoint of a tiny MGM (an LLM built like each
released family, and HD) beside float32 tower folders, as MGM's bf16 recipe leaves them, with the
checkpoint's tower copies made to differ from the folders (offset by 0.25, then rounded): every tower
tensor must come from the right copy, bit for bit. No program is compiled: loading only places arrays.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

import mgjax
import tiny
from mgjax.cli import main
from mgjax.config import config_to_hf
from mgjax.convert.export import export
from mgjax.convert.mgjax_ckpt import convert
from mgjax.convert.names import CLIP_PREFIX, CONVNEXT_PREFIX, param_specs
from mgjax.convert.readers import Checkpoint
from mgjax.errors import MGJaxError
from mgjax.model import MGM, abstract_params
from mgjax.pretrained import Pretrained

CONFIGS = Path(__file__).parents[1] / "configs"
KINDS = [*tiny.LMS, "vicuna-hd"]  # every released LLM family, and HD
CLIP_DIR = "model_zoo/OpenAI/clip-vit-large-patch14-336-tiny"
CONVNEXT_DIR = "model_zoo/OpenAI/openclip-convnext-large-d-320-tiny"
TOWER_PREFIXES = (CLIP_PREFIX, CONVNEXT_PREFIX)
FOLDER_NAMES = {CLIP_PREFIX: "vision_model.", CONVNEXT_PREFIX + "vision_": "visual.trunk."}


def bf16(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16)


def write_release(root, kind="vicuna", *, aux_flag=False, clip_with_uni=True):
    """A released MGM checkpoint `root/MGM-tiny` (bf16, two shards: the LLM, then the towers with the mining
    and projector, as the releases are) and its tower folders under `root/model_zoo`. Returns (checkpoint
    folder, {name: float32 value} of the checkpoint, {name: float32 value} of the folders under the
    checkpoint's names). `clip_with_uni=False` puts CLIP in the LLM's shard, which the original never opens."""
    family, hd = kind.removesuffix("-hd"), kind.endswith("-hd")
    config = tiny.mgm(family, hd=hd)
    rng = np.random.default_rng(len(kind))
    tensors = {}
    for spec in param_specs(abstract_params(MGM(config)), config):
        value = rng.standard_normal(spec.shape).astype(np.float32) * 0.5
        tensors.update(zip(spec.torch_keys, spec.to_torch(value)))
    last = config.vision.num_layers - 1  # CLIP's last layer and post-LN: saved by the original, unused by MGM
    for k in [k for k in tensors if k.startswith(CLIP_PREFIX + "encoder.layers.0.")]:
        tensors[k.replace(".layers.0.", f".layers.{last}.")] = rng.standard_normal(tensors[k].shape, np.float32)
    for leaf in ("weight", "bias"):
        tensors[CLIP_PREFIX + f"post_layernorm.{leaf}"] = rng.standard_normal(config.vision.hidden_size, np.float32)
    folders = {k: v for k, v in tensors.items() if k.startswith(TOWER_PREFIXES)}
    ckpt_values = {k: bf16(v + 0.25 if k in folders else v) for k, v in tensors.items()}

    clip = root / CLIP_DIR
    clip.mkdir(parents=True)
    v = config.vision
    (clip / "config.json").write_text(json.dumps({
        "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
        "patch_size": v.patch_size, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}))
    convnext = root / CONVNEXT_DIR
    convnext.mkdir(parents=True)
    (convnext / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"vision_cfg": {"timm_model_name": "convnext_tiny_test", "timm_drop_path": 0.0}}}))
    for folder, file in ((clip, "model.safetensors"), (convnext, "open_clip_model.safetensors")):
        save_numpy({FOLDER_NAMES[p] + k[len(p):]: v for k, v in folders.items() for p in FOLDER_NAMES
                    if k.startswith(p) and (folder == clip) == (p == CLIP_PREFIX)}, folder / file)

    ckpt = root / "MGM-tiny"
    ckpt.mkdir()
    hf = {**config_to_hf(config), "mm_vision_tower": CLIP_DIR, "mm_vision_tower_aux": CONVNEXT_DIR,
          "optimize_vision_tower": False, "optimize_vision_tower_aux": aux_flag, "torch_dtype": "bfloat16"}
    (ckpt / "config.json").write_text(json.dumps(hf))
    in_llm_shard = ("model.layers", "model.embed", "model.norm", "lm_head") + (() if clip_with_uni else (CLIP_PREFIX,))
    shards = {"model-00001-of-00002.safetensors": {k: t for k, t in ckpt_values.items() if k.startswith(in_llm_shard)}}
    shards["model-00002-of-00002.safetensors"] = {k: t for k, t in ckpt_values.items()
                                                  if k not in shards["model-00001-of-00002.safetensors"]}
    for name, part in shards.items():
        save_file(part, ckpt / name, metadata={"format": "pt"})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    return ckpt, {k: t.float().numpy() for k, t in ckpt_values.items()}, folders


def tower_tensors(model) -> dict:
    """The loaded tower parameters under their released names, as float32."""
    out = {}
    for spec in param_specs(model.params, model.config):
        if spec.torch_keys[0].startswith(TOWER_PREFIXES):
            leaf = model.params
            for p in spec.path:
                leaf = leaf[p]
            out.update(zip(spec.torch_keys, spec.to_torch(np.asarray(leaf, np.float32))))
    return out


def assert_from(model, prefix, want: dict):
    got = {k: v for k, v in tower_tensors(model).items() if k.startswith(prefix)}
    assert got, prefix
    for k, v in got.items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)


def load(ckpt, kind="vicuna", **kw):
    return mgjax.load_pretrained(ckpt, template=tiny.TEMPLATE[kind.removesuffix("-hd")], **kw)


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # config.json's relative tower paths resolve against the checkpoint's parent


@pytest.mark.parametrize("kind", KINDS)
def test_clip_from_the_checkpoint_convnext_from_its_folder(tmp_path, kind):
    """As released (`optimize_vision_tower_aux` false): CLIP is the checkpoint's bf16 copy, the ConvNeXt the
    folder's float32 weights; with the flag true the ConvNeXt is the checkpoint's copy too."""
    ckpt, in_ckpt, in_folders = write_release(tmp_path, kind)
    model = load(ckpt, kind)
    assert_from(model, CLIP_PREFIX, in_ckpt)
    assert_from(model, CONVNEXT_PREFIX, in_folders)
    assert model.tower_sources["vision_tower"]["weights"] == "checkpoint"
    aux = model.tower_sources["vision_tower_aux"]
    assert aux["weights"] == "folder" and aux["folder"] == str((tmp_path / CONVNEXT_DIR).resolve())
    assert "optimize_vision_tower_aux is false" in aux["why"]

    hf = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**hf, "optimize_vision_tower_aux": True}))
    model = load(ckpt, kind)
    assert_from(model, CLIP_PREFIX, in_ckpt)
    assert_from(model, CONVNEXT_PREFIX, in_ckpt)
    assert model.tower_sources["vision_tower_aux"]["weights"] == "checkpoint"


def test_clip_outside_the_mining_shards_comes_from_its_folder(tmp_path):
    """The original reads tower weights only from the shards that hold vlm_uni_* / vision_stages keys."""
    ckpt, in_ckpt, in_folders = write_release(tmp_path, clip_with_uni=False, aux_flag=True)
    model = load(ckpt)
    assert_from(model, CLIP_PREFIX, in_folders)
    assert_from(model, CONVNEXT_PREFIX, in_ckpt)
    assert "not in the shards holding vlm_uni_*" in model.tower_sources["vision_tower"]["why"]


def test_single_file_checkpoint_counts_as_one_shard(tmp_path):
    ckpt, in_ckpt, in_folders = write_release(tmp_path)
    tensors = {k: bf16(v) for k, v in in_ckpt.items()}  # exact: the values are bf16 already
    for f in list(ckpt.glob("model*.safetensors*")):
        f.unlink()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    model = load(ckpt)
    assert_from(model, CLIP_PREFIX, in_ckpt)
    assert_from(model, CONVNEXT_PREFIX, in_folders)


def test_a_missing_folder_the_original_reads_is_an_error_unless_asked(tmp_path, capsys):
    """Never the checkpoint's copy silently: the error names the folder tried, the flag and both ways out;
    `towers_from_checkpoint` (`--towers-from-checkpoint`) takes the copy and says so."""
    ckpt, in_ckpt, _ = write_release(tmp_path)
    shutil.rmtree(tmp_path / CONVNEXT_DIR)
    with pytest.raises(MGJaxError) as e:
        load(ckpt)
    msg = str(e.value)
    for part in ("ConvNeXt (vision_tower_aux)", "optimize_vision_tower_aux is false", str(tmp_path / CONVNEXT_DIR),
                 "vision_tower_aux=PATH", "--vision-tower-aux", "towers_from_checkpoint=True"):
        assert part in msg, part
    model = load(ckpt, towers_from_checkpoint=True)
    assert_from(model, CONVNEXT_PREFIX, in_ckpt)
    assert model.tower_sources["vision_tower_aux"]["weights"] == "checkpoint"
    assert "towers_from_checkpoint=True" in model.tower_sources["vision_tower_aux"]["why"]

    assert main(["convert", str(ckpt), str(tmp_path / "o"), "--template", "vicuna_v1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--towers-from-checkpoint" in err and "\n" not in err
    assert main(["convert", str(ckpt), str(tmp_path / "o"), "--template", "vicuna_v1",
                 "--towers-from-checkpoint"]) == 0
    meta = json.loads((tmp_path / "o" / "mgjax_config.json").read_text())
    assert meta["towers"]["vision_tower_aux"]["weights"] == "checkpoint"


def _params(model) -> dict:
    from flax import traverse_util

    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(model.params).items()}


@pytest.mark.parametrize("from_checkpoint", [False, True], ids=["as-the-original", "towers-from-checkpoint"])
def test_convert_records_the_sources_and_export_loads_back_bit_exact(tmp_path, from_checkpoint):
    """convert records where each tower came from; export writes the towers (and the flag) so that loading
    the export takes each tower from where the converted weights are: the same parameters, bit for bit."""
    ckpt, _, _ = write_release(tmp_path)
    direct = load(ckpt, towers_from_checkpoint=from_checkpoint)
    out = convert(ckpt, tmp_path / "orbax", dtype="float32", template="vicuna_v1",
                  towers_from_checkpoint=from_checkpoint)
    meta = json.loads((out / "mgjax_config.json").read_text())
    assert meta["towers"] == direct.tower_sources
    assert meta["towers"]["vision_tower_aux"]["weights"] == ("checkpoint" if from_checkpoint else "folder")
    exported = export(out, tmp_path / "exported", dtype="bfloat16")  # beside model_zoo, as the release
    hf = json.loads((exported / "config.json").read_text())
    assert hf["optimize_vision_tower_aux"] is from_checkpoint
    assert hf["mm_vision_tower_aux"] == CONVNEXT_DIR
    again = load(exported)
    assert again.tower_sources["vision_tower_aux"]["weights"] == meta["towers"]["vision_tower_aux"]["weights"]
    want, got = _params(direct), _params(again)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))
    # the whole CLIP is written back, as the original's strict CLIP load needs it
    keys = Checkpoint.from_folder(exported).keys()
    assert {CLIP_PREFIX + "post_layernorm.weight", CLIP_PREFIX + "encoder.layers.2.mlp.fc1.weight"} <= set(keys)


def test_training_init_and_stage1_release_take_the_towers_as_the_original(tmp_path):
    """`model.init` on a released checkpoint reads the towers by the same rule; stage 2 from a stage-1
    release file (mm_projector.bin) takes CLIP from that file, as the original's stage 2 does with
    `pretrain_mm_mlp_adapter`."""
    from mgjax.train.config import load_train_config
    from mgjax.train.loop import initial_params, run_setup

    ckpt, in_ckpt, in_folders = write_release(tmp_path)
    stage1 = tmp_path / "MGM-tiny-Pretrain"
    stage1.mkdir()
    in_stage1 = {k: bf16(v + 1) for k, v in in_ckpt.items() if k.startswith(("model.mm_projector", "model.vlm_uni",
                                                                              "model.vision_tower"))}
    torch.save(in_stage1, stage1 / "mm_projector.bin")
    in_stage1 = {k: t.float().numpy() for k, t in in_stage1.items()}
    for stage1_arg, clip_from in ((None, in_ckpt), (stage1, in_stage1)):
        cfg = load_train_config(CONFIGS / "demo" / "stage2.yaml", [
            f"run_dir={tmp_path / 'run'}", "model.preset=null", "model.tokenizer=null", f"model.init={ckpt}",
            f"model.stage1={stage1_arg or 'null'}", "global_batch=8", "micro_batch=8"])
        setup = run_setup(cfg, tmp_path / "run")
        params = initial_params(cfg, setup.model, setup.module, setup.mesh, setup.rules, setup.shardings)
        model = Pretrained(setup.model.config, params, setup.module, ckpt)
        assert_from(model, CLIP_PREFIX, clip_from)
        assert_from(model, CONVNEXT_PREFIX, in_folders)
        assert setup.model.towers["vision_tower_aux"]["weights"] == "folder"
        assert setup.model.towers["vision_tower"]["weights"] == ("stage-1 file" if stage1_arg else "checkpoint")
