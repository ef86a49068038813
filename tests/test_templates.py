"""The conversation template is read from what the checkpoint says (tokenizer special tokens, model
family, folder name; families.detect_template), for every released model, and can be overridden."""

import shutil

import pytest

import mgjax
from mgjax.data.templates import TEMPLATES
from mgjax.data.tokenize import load_tokenizer
from mgjax.families import LLMS, detect_template
from mgjax.presets import PRESETS
import tiny
from helpers import GOLDEN

# Released model -> the kind of LLM it is built on (tests/tiny.py), from docs/mgm_spec.md section 1.
RELEASES = {"MGM-2B": "gemma", "MGM-7B": "vicuna", "MGM-13B": "vicuna", "MGM-8B": "llama_3",
            "MGM-8x7B": "mixtral", "MGM-34B": "yi"}
CASES = [(name, kind) for name, kind in RELEASES.items()] + [
    (f"{name}-HD", kind) for name, kind in RELEASES.items() if name != "MGM-2B"]


@pytest.mark.parametrize("name,kind", CASES)
def test_each_release_gets_its_template(tmp_path, name, kind):
    """From its tokenizer (built like its own) in a folder that carries the release's name, from the
    tokenizer alone (an anonymous folder), and from the folder name alone (no tokenizer files)."""
    want = PRESETS[name].template
    assert want == tiny.TEMPLATE[kind]
    family = tiny.LMS[kind].family
    tiny.save_tokenizer(kind, tmp_path / "tok")
    vocab = load_tokenizer(tmp_path / "tok").get_vocab()
    assert detect_template(family, vocab, [tmp_path / name])[0] == want
    assert detect_template(family, vocab, [tmp_path / "checkpoint"])[0] == want
    assert detect_template(family, None, [tmp_path / "MGM-Pretrain", tmp_path / name])[0] == want


def test_tokenizer_outranks_the_folder_name(tmp_path):
    """A Llama-3 tokenizer in a folder named like MGM-7B is Llama-3 (the evidence is named)."""
    tiny.save_tokenizer("llama_3", tmp_path)
    template, why = detect_template("llama", load_tokenizer(tmp_path).get_vocab(), ["MGM-7B"])
    assert template == "llama_3" and "<|eot_id|>" in why
    assert detect_template("llama", None, ["my-finetune"]) == (
        "vicuna_v1", "default (a Llama-family tokenizer without chat markers)")


def test_vocabulary_size_alone_decides_nothing():
    """The old rule (vocab 128256 -> llama_3, 64000 -> chatml) is gone: a Llama-3-sized vocabulary
    without Llama-3's special tokens in an anonymous folder is the default."""
    assert detect_template("llama", {f"t{i}": i for i in range(128256)}, ["ckpt"])[0] == "vicuna_v1"


def test_every_llm_row_names_a_registered_template():
    assert {m.template for m in LLMS.values()} <= set(TEMPLATES)


def _golden_copy(tmp_path, name, kind):
    """The tiny golden Vicuna checkpoint and its tower folders, under another name, with `kind`'s tokenizer."""
    ckpt = tmp_path / name
    shutil.copytree(GOLDEN / "llama_vicuna" / "MGM-7B-tiny", ckpt)
    shutil.copytree(GOLDEN / "llama_vicuna" / "model_zoo", tmp_path / "model_zoo")
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (ckpt / f).unlink()
    tiny.save_tokenizer(kind, ckpt)
    return ckpt


@pytest.mark.parametrize("kind", ["llama_3", "yi", "vicuna"])
def test_load_pretrained_reads_the_template(tmp_path, kind):
    """The Llama-architecture releases, told apart by their tokenizers alone (an anonymous folder)."""
    model = mgjax.load_pretrained(_golden_copy(tmp_path, "checkpoint", kind))
    assert model.config.template == tiny.TEMPLATE[kind]
    assert ("tokenizer special token" if kind != "vicuna" else "default") in model.template_evidence
    prompt = model.build_prompt("what is this ?")
    assert prompt.startswith({"llama_3": "<|start_header_id|>system", "yi": "<|im_start|>system",
                              "vicuna": "A chat between"}[kind])


def test_template_argument_wins(tmp_path):
    ckpt = _golden_copy(tmp_path, "MGM-8B", "llama_3")
    model = mgjax.load_pretrained(ckpt, template="vicuna_v1")
    assert model.config.template == "vicuna_v1" and model.template_evidence == "template= argument"
    with pytest.raises(mgjax.MGJaxError, match="unknown conversation template 'llama3'"):
        mgjax.load_pretrained(ckpt, template="llama3")


@pytest.mark.parametrize("kind", list(tiny.SPECIAL_TOKENS))
def test_stop_tokens_are_tokens_of_that_tokenizer(tmp_path, kind):
    """Each LLM's stop tokens exist in a tokenizer built like its own, and its template ends a finished
    answer with the first of them (what generation must stop on)."""
    tiny.save_tokenizer(kind, tmp_path)
    vocab = load_tokenizer(tmp_path).get_vocab()
    llm = LLMS[kind]
    assert all(t in vocab for t in llm.stop_tokens), (kind, llm.stop_tokens)
    answered = TEMPLATES[llm.template].render(["q", "ANSWER"])
    assert answered.split("ANSWER", 1)[1].strip().startswith(llm.stop_tokens[0]), answered


def test_convert_records_the_detected_template(tmp_path):
    """`mgjax convert` reads the template like load_pretrained and records it; --template overrides it."""
    from mgjax.cli import main

    ckpt = _golden_copy(tmp_path, "checkpoint", "llama_3")
    assert main(["convert", str(ckpt), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    assert mgjax.load_pretrained(tmp_path / "out").config.template == "llama_3"
    assert main(["convert", str(ckpt), str(tmp_path / "out2"), "--template", "gemma"]) == 0
    assert mgjax.load_pretrained(tmp_path / "out2").config.template == "gemma"
