"""Bad checkpoints and bad inputs give one clear `MGJaxError` that names what is wrong and what to do.

Each test copies golden case A (`llama_vicuna`: checkpoint + tower folders) into `tmp_path`, breaks one
thing and loads it. The working directory is `tmp_path` itself, so config.json's relative tower paths
can only resolve against the checkpoint's parent folder (the copied case folder). The few successful
loads compare `Pretrained.logits` on the fixture's recorded prompt with the untouched checkpoint's,
exactly: the same tensors reach the same program.
"""

import functools
import json
import os
import re
import shutil
import stat

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import mgjax
from mgjax import MGJaxError
from helpers import GOLDEN, golden_model, nhwc

CASE = GOLDEN / "llama_vicuna"
CKPT = "MGM-7B-tiny"
INDEX = "model.safetensors.index.json"
CLIP_TOWER = "model_zoo/OpenAI/clip-vit-large-patch14-336-tiny"
CONVNEXT_TOWER = "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup-tiny"
CLIP_KEYS = "model.vision_tower.vision_tower."


@functools.cache
def reference():
    """The untouched fixture: (model, (input_ids, images, images_aux) NHWC, logits as NumPy)."""
    model = golden_model()
    ref = np.load(CASE / "expected.npz")
    inputs = (ref["input_ids"], nhwc(ref["images"]), nhwc(ref["images_aux"]))
    return model, inputs, np.asarray(model.logits(*inputs))


def assert_same_logits(model):
    _, inputs, want = reference()
    np.testing.assert_array_equal(np.asarray(model.logits(*inputs)), want)


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no tower folder is reachable from the working directory


@pytest.fixture
def case(tmp_path):
    """A writable copy of the case folder; returns its checkpoint folder."""
    folder = tmp_path / "llama_vicuna"
    shutil.copytree(CASE, folder)
    for p in folder.rglob("*"):
        os.chmod(p, p.stat().st_mode | stat.S_IWUSR)
    return folder / CKPT


def read_index(ckpt):
    return json.loads((ckpt / INDEX).read_text())


def edit_tensors(ckpt, drop=(), put=None):
    """Rewrites the shards and the index: removes the keys in `drop`, sets the tensors in `put`
    (new keys go into the first shard)."""
    index = read_index(ckpt)
    wmap = index["weight_map"]
    first = sorted(set(wmap.values()))[0]
    by_shard = {}
    for k in drop:
        by_shard.setdefault(wmap.pop(k), []).append((k, None))
    for k, v in (put or {}).items():
        by_shard.setdefault(wmap.setdefault(k, first), []).append((k, v))
    for shard, changes in by_shard.items():
        tensors = load_file(ckpt / shard)
        for k, v in changes:
            if v is None:
                del tensors[k]
            else:
                tensors[k] = v
        save_file(tensors, ckpt / shard, metadata={"format": "pt"})
    (ckpt / INDEX).write_text(json.dumps(index, indent=2))


def state_dict(ckpt):
    out = {}
    for shard in sorted(set(read_index(ckpt)["weight_map"].values())):
        out.update(load_file(ckpt / shard))
    return out


def strip_clip(ckpt):
    """The checkpoint without the CLIP tower weights (as a checkpoint saved without towers)."""
    edit_tensors(ckpt, drop=[k for k in read_index(ckpt)["weight_map"] if k.startswith(CLIP_KEYS)])


# ---------------------------------------------------------------- tower folders


def test_clip_weights_from_tower_folder_next_to_checkpoint(case):
    strip_clip(case)
    assert (case.parent / CLIP_TOWER).is_dir()
    assert_same_logits(mgjax.load_pretrained(case))


def test_missing_tower_folder_names_paths_tried_and_vision_tower(case, tmp_path):
    strip_clip(case)
    shutil.rmtree(case.parent / CLIP_TOWER)
    with pytest.raises(MGJaxError, match=r"vision_tower weights are not in .*pass vision_tower=PATH") as e:
        mgjax.load_pretrained(case)
    msg = str(e.value)
    assert str(case) in msg
    assert str(tmp_path / CLIP_TOWER) in msg  # tried against the working directory
    assert str(case.parent / CLIP_TOWER) in msg  # and against the checkpoint's parent folder


def test_explicit_vision_tower_folder(case, tmp_path):
    strip_clip(case)
    elsewhere = tmp_path / "towers" / "my-clip"
    shutil.move(case.parent / CLIP_TOWER, elsewhere)
    assert_same_logits(mgjax.load_pretrained(case, vision_tower=elsewhere))


@pytest.mark.parametrize("arg", ["vision_tower", "vision_tower_aux"])
def test_explicit_tower_folder_that_does_not_exist(case, tmp_path, arg):
    missing = tmp_path / "no-such-tower"
    with pytest.raises(MGJaxError, match=re.escape(str(missing)) + r".*(does not exist|not found)"):
        mgjax.load_pretrained(case, **{arg: missing})


def test_missing_clip_folder_with_weights_in_checkpoint_says_which_folder(case):
    """The CLIP weights are in the checkpoint but its architecture is not the released ViT-L/14-336
    that is assumed without the tower folder."""
    shutil.rmtree(case.parent / CLIP_TOWER)
    with pytest.raises(MGJaxError, match=r"vision_tower folder was not found.*pass vision_tower=PATH") as e:
        mgjax.load_pretrained(case)
    assert str(case.parent / CLIP_TOWER) in str(e.value)


def test_missing_convnext_folder_with_weights_in_checkpoint(case):
    """The original reads the ConvNeXt from its folder (the checkpoint's copy only with
    optimize_vision_tower_aux): a missing folder is an error, unless the checkpoint's copy is asked for
    (its architecture then follows from the weight shapes)."""
    shutil.rmtree(case.parent / CONVNEXT_TOWER)
    with pytest.raises(MGJaxError, match=r"reads the ConvNeXt \(vision_tower_aux\) weights from its tower folder.*"
                                         r"optimize_vision_tower_aux is false.*towers_from_checkpoint=True"):
        mgjax.load_pretrained(case)
    assert_same_logits(mgjax.load_pretrained(case, towers_from_checkpoint=True))


# ---------------------------------------------------------------- tensors


def test_missing_tensor_names_the_key(case):
    edit_tensors(case, drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(MGJaxError, match=re.escape(str(case)) + r": 1 .*model\.layers\.1\.mlp\.up_proj\.weight"):
        mgjax.load_pretrained(case)


def test_unexpected_tensor_names_the_key(case):
    edit_tensors(case, put={"model.layers.7.foo.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(MGJaxError, match=r"do not map to any mgjax parameter: model\.layers\.7\.foo\.weight"):
        mgjax.load_pretrained(case)


def test_index_and_shard_disagree(case):
    """A shard that lacks a key its index names (a stale or mixed download)."""
    key = "model.layers.1.mlp.up_proj.weight"
    shard = read_index(case)["weight_map"][key]
    tensors = load_file(case / shard)
    del tensors[key]
    save_file(tensors, case / shard)
    with pytest.raises(MGJaxError, match=re.escape(shard) + r".*index says.*up_proj.*re-download"):
        mgjax.load_pretrained(case)


def test_wrong_shape_names_key_and_both_shapes(case):
    key = "model.layers.0.mlp.up_proj.weight"  # [128, 64] in the checkpoint
    edit_tensors(case, put={key: np.zeros((127, 64), np.float32)})
    shard = read_index(case)["weight_map"][key]
    with pytest.raises(MGJaxError, match=re.escape(shard) + r".*'" + re.escape(key) + r"' has shape \(127, 64\), "
                       r"expected \(128, 64\).*llm/layers_0/mlp/up_proj/kernel"):
        mgjax.load_pretrained(case)


@pytest.mark.parametrize("key,shape,want", [("model.layers.0.mlp.up_proj.weight", (64, 128), (128, 64)),  # transposed
                                            ("model.norm.weight", (8, 8), (64,)),
                                            ("model.layers.0.self_attn.q_proj.weight", (4, 16, 64), (64, 64))])
def test_wrong_shape_same_size_is_rejected(case, key, shape, want):
    """Same number of elements, other shape: must not be reshaped into place."""
    edit_tensors(case, put={key: np.zeros(shape, np.float32)})
    with pytest.raises(MGJaxError, match=re.escape(f"{key}' has shape {shape}, expected {want}")):
        mgjax.load_pretrained(case)


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("keep", [-1000, 100], ids=["last-1000-bytes-cut", "header-cut"])
def test_truncated_shard_names_the_file(case, keep):
    shard = case / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:keep])
    with pytest.raises(MGJaxError, match=re.escape(str(shard)) + r": .*truncated.*re-download"):
        mgjax.load_pretrained(case)


def test_index_names_a_missing_shard(case):
    (case / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(MGJaxError, match=re.escape(INDEX) + r" lists shards that are missing.*model-00003-of-00003"):
        mgjax.load_pretrained(case)


def test_config_without_mm_hidden_size_is_not_an_mgm_config(case):
    cfg = json.loads((case / "config.json").read_text())
    del cfg["mm_hidden_size"]
    (case / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MGJaxError, match=re.escape(str(case / "config.json")) + r":? has no 'mm_hidden_size'.*"
                       r"not an MGM checkpoint"):
        mgjax.load_pretrained(case)


def test_plain_llm_checkpoint_is_not_an_mgm_checkpoint(case):
    """Not told to pass vision_tower=PATH: told it is not an MGM checkpoint."""
    cfg = json.loads((case / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("mm_")}
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (case / "config.json").write_text(json.dumps(cfg))
    edit_tensors(case, drop=[k for k in read_index(case)["weight_map"]
                             if k.startswith(("model.vision_tower", "model.vlm_uni", "model.mm_projector"))])
    with pytest.raises(MGJaxError, match=re.escape(str(case / "config.json")) + r".*'mm_hidden_size'.*not an MGM"):
        mgjax.load_pretrained(case)


def test_folder_without_config_json(case):
    (case / "config.json").unlink()
    with pytest.raises(MGJaxError, match=re.escape(str(case)) + r": no config\.json"):
        mgjax.load_pretrained(case)


def test_config_json_that_is_not_json(case):
    (case / "config.json").write_text("{not json")
    with pytest.raises(MGJaxError, match=re.escape(str(case / "config.json")) + r": invalid JSON"):
        mgjax.load_pretrained(case)


def test_folder_that_does_not_exist(tmp_path):
    with pytest.raises(MGJaxError, match=re.escape(str(tmp_path / "nope")) + r": checkpoint folder not found"):
        mgjax.load_pretrained(tmp_path / "nope")


def test_folder_without_weights(case):
    for f in list(case.glob("model*.safetensors*")):
        f.unlink()
    with pytest.raises(MGJaxError, match=re.escape(str(case)) + r": no weights found.*model\.safetensors\.index\.json"):
        mgjax.load_pretrained(case)


# ---------------------------------------------------------------- torch .bin checkpoints


def to_bin(ckpt):
    """Replaces the safetensors shards and index by one `pytorch_model.bin` (no index)."""
    sd = {k: torch.from_numpy(v.copy()) for k, v in state_dict(ckpt).items()}
    for f in list(ckpt.glob("model*.safetensors*")):
        f.unlink()
    torch.save(sd, ckpt / "pytorch_model.bin")
    return ckpt / "pytorch_model.bin"


def test_torch_bin_checkpoint_equals_safetensors(case):
    to_bin(case)
    model = mgjax.load_pretrained(case)
    want, _, _ = reference()
    for (path, a), (_, b) in zip(_leaves(model.params), _leaves(want.params)):
        np.testing.assert_array_equal(a, b, err_msg=path)
    assert_same_logits(model)


def test_truncated_torch_bin_names_the_file(case):
    f = to_bin(case)
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(MGJaxError, match=re.escape(str(f)) + r": cannot be read.*truncated"):
        mgjax.load_pretrained(case)


def _leaves(tree, path=""):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k], f"{path}/{k}")
    else:
        yield path, np.asarray(tree)


# ---------------------------------------------------------------- inputs to Pretrained.logits


def test_images_in_nchw_are_rejected():
    model, (ids, images, aux), _ = reference()
    with pytest.raises(MGJaxError, match=r"images must be \[n, 56, 56, 3\] \(NHWC\).*\(1, 3, 56, 56\)"):
        model.logits(ids, np.moveaxis(images, -1, 1), aux)


def test_images_aux_of_the_wrong_shape_are_rejected():
    model, (ids, images, aux), _ = reference()
    with pytest.raises(MGJaxError, match=r"images_aux must be \[1, 128, 128, 3\]"):
        model.logits(ids, images, aux[:, :64, :64])
    with pytest.raises(MGJaxError, match=r"images_aux must be \[1, 128, 128, 3\]"):
        model.logits(ids, images, np.concatenate([aux, aux]))


def test_more_image_placeholders_than_images():
    model, (ids, images, aux), _ = reference()
    two = np.concatenate([ids, ids], axis=1)  # two <image> placeholders, one image
    with pytest.raises(MGJaxError, match=r"need 2 images .* but 1 were given"):
        model.logits(two, images, aux)
    batch = np.concatenate([ids, ids], axis=0)  # two rows, one image
    with pytest.raises(MGJaxError, match=r"need 2 images"):
        model.logits(batch, images, aux)


def test_bad_input_ids_and_mask():
    model, (ids, images, aux), _ = reference()
    with pytest.raises(MGJaxError, match=r"input_ids must be an int array \[B, T\]"):
        model.logits(ids[0], images, aux)
    with pytest.raises(MGJaxError, match=r"attention_mask shape \(1, 87\) != input_ids shape \(1, 88\)"):
        model.logits(ids, images, aux, attention_mask=np.ones((1, 87), np.int32))


def test_a_parameter_the_checkpoint_lacks_is_an_error_not_a_placeholder(tmp_path):
    """Orbax's partial restore leaves a leaf the checkpoint does not hold as the ShapeDtypeStruct asked for,
    silently; mgjax names the first such parameter instead of handing back a placeholder."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint.experimental.v1 as ocp

    from mgjax.checkpoint import restore

    ocp.save_pytree(tmp_path / "ckpt", {"params": {"a": jnp.ones(3)}})
    want = jax.ShapeDtypeStruct((3,), jnp.float32)
    assert restore(tmp_path / "ckpt", {"params": {"a": want}}, partial=True)["params"]["a"].sum() == 3
    with pytest.raises(MGJaxError, match=r"has no \['params'\]\['b'\]; it is from another model"):
        restore(tmp_path / "ckpt", {"params": {"a": want, "b": want}}, partial=True)
    with pytest.raises(MGJaxError, match=r"has no \['other'\]\['a'\] \(and 1 more\)"):
        restore(tmp_path / "ckpt", {"other": {"a": want, "b": want}}, partial=True)
