"""Generation (`Pretrained.generate`): the original's greedy tokens, a batch row == that prompt alone
(mixed prompt lengths and image counts, every LLM family, scanned layers, on a mesh), the KV cache ==
the uncached forward, sampling filters, stops, bad arguments."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mgjax
import tiny
from helpers import GOLDEN, golden_model, nhwc
from mgjax.config import IMAGE_TOKEN_INDEX, MeshConfig
from mgjax.errors import MGJaxError
from mgjax.infer.sampling import filter_logits
from mgjax.model import MGM, init_params
from mgjax.pretrained import Pretrained
from mgjax.sharding import make_mesh

FAMILIES = ["vicuna", "llama_3", "yi", "gemma", "mixtral"]


@pytest.mark.parametrize("case", ["llama_vicuna", "gemma"])
def test_greedy_tokens_and_scores_equal_the_original(case, tmp_path, monkeypatch):
    """The original's `generate` (greedy, 8 new tokens) on the golden case, per-layer and scanned layers;
    the batch of two prompts (case A) too. Prompt lengths of one bucket share a compiled program."""
    from mgjax.convert.mgjax_ckpt import convert

    monkeypatch.chdir(GOLDEN / case)  # config.json names the tower folders relative to the case folder
    meta = json.loads((GOLDEN / case / "case.json").read_text())
    ref = np.load(GOLDEN / case / "expected.npz")
    src = GOLDEN / case / meta["checkpoint_dir"]
    inputs = (ref["input_ids"], nhwc(ref["images"]), nhwc(ref["images_aux"]))
    model = golden_model(case)
    out = model.generate(*inputs, max_new_tokens=8, output_scores=True)
    np.testing.assert_array_equal(out.token_ids, ref["generate_ids"])
    np.testing.assert_allclose(out.scores[0], ref["generate_scores"], atol=2e-5, rtol=0)
    # a prompt one token shorter (the same length bucket) runs the same compiled program, not a new trace
    programs = {k: f._cache_size() for k, f in model._jitted.items()}
    model.generate([ref["input_ids"][0][:-1]], *inputs[1:], max_new_tokens=8, output_scores=True)
    assert {k: f._cache_size() for k, f in model._jitted.items()} == programs
    scanned = mgjax.load_pretrained(convert(src, tmp_path / "scanned", dtype="float32", scan_layers=True))
    np.testing.assert_array_equal(scanned.generate(*inputs, max_new_tokens=8).token_ids, ref["generate_ids"])
    if "batch_generate_ids" in ref.files:
        batch = scanned.generate(ref["batch_input_ids"], nhwc(ref["batch_images"]), nhwc(ref["batch_images_aux"]),
                                 attention_mask=ref["batch_attention_mask"], max_new_tokens=8)
        np.testing.assert_array_equal(batch.token_ids, ref["batch_generate_ids"])


@functools.cache
def _model(kind: str, tokenizer_dir: str, scan: bool = False, mesh: tuple | None = None,
           hd: bool = False) -> Pretrained:
    """A tiny random model of `kind`, its vocabulary the test tokenizer's (so every id decodes)."""
    from mgjax.data.tokenize import load_tokenizer

    vocab = len(load_tokenizer(tokenizer_dir))
    config = tiny.mgm(kind, hd=hd, small=True, lm=tiny.lm(kind, vocab_size=vocab, scan_layers=scan))
    module = MGM(config)
    params = init_params(module, jax.random.key(1))
    m = None if mesh is None else make_mesh(MeshConfig(*mesh))
    if m is not None:
        from mgjax.model import abstract_params
        from mgjax.sharding import param_shardings

        params = jax.device_put(params, param_shardings(abstract_params(module, boxed=True), m))
    return Pretrained(config, params, module, tokenizer_dir, mesh=m)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    out = {}
    for kind in FAMILIES:
        folder = tmp_path_factory.mktemp(f"tok_{kind}")
        tiny.save_tokenizer(kind, folder)
        out[kind] = str(folder)
    return out


def _prompts(config, vocab: int, seed: int = 0):
    """Three prompts: one image, two images and a long text, text only (one zero image slot), as a list
    of id sequences with their images in order."""
    rng = np.random.default_rng(seed)
    words = lambda n: rng.integers(3, vocab, n)  # noqa: E731
    ids = [np.concatenate([[1], [IMAGE_TOKEN_INDEX], words(5)]),
           np.concatenate([[1], words(3), [IMAGE_TOKEN_INDEX], words(9), [IMAGE_TOKEN_INDEX], words(2)]),
           np.concatenate([[1], words(4)])]
    per_row = [1, 2, 1]
    s, sa = config.image_size, config.image_size_aux
    views = () if config.num_views == 1 else (config.num_views,)  # HD: the grid's views and the global one
    images = rng.standard_normal((4, *views, s, s, 3)).astype(np.float32)
    images_aux = rng.standard_normal((4, sa, sa, 3)).astype(np.float32)
    images[3] = images_aux[3] = 0  # the text-only row's slot
    starts = np.cumsum([0, *per_row])
    return ids, [(images[a:b], images_aux[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def _steps(model: Pretrained, ids: np.ndarray) -> int:
    """Tokens up to and including the first stop token."""
    from mgjax.data.templates import get_template
    from mgjax.pretrained import _stops

    stops = _stops(model.tokenizer, get_template(model.config.template).stop)[0]
    hits = np.flatnonzero(np.isin(ids, stops))
    return int(hits[0]) + 1 if len(hits) else len(ids)


def _batched_equals_alone(model: Pretrained, **kw):
    ids, images = _prompts(model.config, model.config.lm.vocab_size)
    batch = model.generate(ids, np.concatenate([i for i, _ in images]), np.concatenate([a for _, a in images]),
                           max_new_tokens=6, output_scores=True, **kw)
    assert batch.token_ids.shape == (3, 6) and len(batch.text) == 3
    for row, (x, (im, aux)) in enumerate(zip(ids, images)):
        alone = model.generate([x], im, aux, max_new_tokens=6, output_scores=True, **kw)
        np.testing.assert_array_equal(batch.token_ids[row], alone.token_ids[0])
        assert batch.text[row] == alone.text[0]
        n = _steps(model, alone.token_ids[0])  # after a stop, a batch row keeps being fed pad tokens
        np.testing.assert_allclose(batch.scores[row][:n], alone.scores[0][:n], atol=1e-5, rtol=1e-5)
    return batch


def _engine_equals(model: Pretrained, batch):
    """The continuous-batching engine (`mgjax serve`'s) on `_prompts` with two slots for three prompts (rows at
    different cache slots and positions, joining and leaving the batch; 256 cache slots: the blocked cache
    attention): each answer's tokens are `batch`'s row, which is what `generate` gives it alone. Asked again,
    the images' visual tokens come from the engine's cache, and the answers are the same."""
    from mgjax.infer.engine import BytesLRU, Engine, Request

    ids, images = _prompts(model.config, model.config.lm.vocab_size)
    engine = Engine(model, slots=2, context=256).start(warm=False)
    keyed = [tuple(f"{row}:{i}" for i in range(len(im))) if (np.asarray(x) == -200).any() else ()
             for row, (x, (im, _)) in enumerate(zip(ids, images))]
    try:
        for again in range(2):
            requests = [Request(np.asarray(x, np.int32), im, aux, max_tokens=6, image_keys=k)
                        for x, (im, aux), k in zip(ids, images, keyed)]
            for r in requests:
                engine.submit(r)
            for r in requests:
                while r.events.get(timeout=300)[0] != "done":
                    pass
            for row, r in enumerate(requests):
                assert r.tokens == batch.token_ids[row][:len(r.tokens)].tolist() and r.answer == batch.text[row]
                assert len(r.tokens) == 6 or r.finish_reason == "stop"
            n = sum(map(len, keyed))
            assert n >= 3 and (engine.encoded.hits, engine.encoded.misses) == (again * n, n)
    finally:
        engine.stop()
    # one image in two prompts prefilled together (an evaluation's questions about it) is encoded once
    x, (im, aux) = ids[0], images[0]
    twice = [Request(np.asarray(x, np.int32), im, aux, max_tokens=6, image_keys=("new",)) for _ in range(2)]
    for r in twice:
        engine.check(r)
    a, b = engine._image_tokens(twice)
    assert a[0] is b[0] and engine.encoded.bytes == (n + 1) * a[0].nbytes
    engine.encoded = BytesLRU(0)  # off (`--encoder-cache 0`): encoded each time, as distinct images would be
    a, b = engine._image_tokens(twice)
    assert a[0] is not b[0] and engine.encoded.misses == 0


@pytest.mark.parametrize("kind", [*FAMILIES, "vicuna-hd"])
def test_a_batch_row_and_a_serving_engine_row_equal_that_prompt_alone(kind, tokenizers):
    """Mixed prompt lengths, two images in one row, a text-only row: each row's tokens, text and scores are
    what it gets alone (another batch size, another prompt length bucket); so are the serving engine's."""
    family, _, hd = kind.partition("-")
    model = _model(family, tokenizers[family], hd=bool(hd))
    _engine_equals(model, _batched_equals_alone(model))


def test_beam_search_rows_equal_alone(tokenizers):
    """Beam search (3 beams) on the mixed batch: each row's answer is the one it gets alone (the B x K cache
    rows of one prompt never mix with another's). Beam sampling repeats with its seed and, nearly cold,
    draws what beam search takes."""
    model = _model("mixtral", tokenizers["mixtral"])
    ids, images = _prompts(model.config, model.config.lm.vocab_size)
    batch = model.generate(ids, np.concatenate([i for i, _ in images]), np.concatenate([a for _, a in images]),
                           max_new_tokens=6, num_beams=3)
    for row, (x, (im, aux)) in enumerate(zip(ids, images)):
        np.testing.assert_array_equal(batch.token_ids[row],
                                      model.generate([x], im, aux, max_new_tokens=6, num_beams=3).token_ids[0])
    # Beam sampling (MMMU's protocol): a seed repeats; nearly cold, the draws are the best candidates.
    args = (ids, np.concatenate([i for i, _ in images]), np.concatenate([a for _, a in images]))
    hot = [model.generate(*args, max_new_tokens=6, num_beams=3, temperature=1.0, seed=1).token_ids for _ in range(2)]
    np.testing.assert_array_equal(hot[0], hot[1])
    cold = model.generate(*args, max_new_tokens=6, num_beams=3, temperature=1e-4, seed=3).token_ids
    np.testing.assert_array_equal(cold, batch.token_ids)


def test_scanned_layers_and_a_mesh_generate_the_same(tokenizers):
    """Scanned layers (one stacked cache; the serving engine's too) and a (data, fsdp, tensor) mesh (Gemma's
    single KV head over a tensor axis of 2) give the per-layer single-device tokens."""
    ref = _batched_equals_alone(_model("gemma", tokenizers["gemma"]))
    base = _model("gemma", tokenizers["gemma"])
    layers = [base.params["llm"].pop(f"layers_{i}") for i in range(base.config.lm.num_layers)]
    scanned = _model("gemma", tokenizers["gemma"], scan=True)
    params = {**base.params, "llm": {**base.params["llm"], "layers": jax.tree.map(lambda *x: jnp.stack(x), *layers)}}
    for i, layer in enumerate(layers):
        base.params["llm"][f"layers_{i}"] = layer
    scanned = dataclasses.replace(scanned, params=params, _jitted={})
    ids, images = _prompts(base.config, base.config.lm.vocab_size)
    args = (ids, np.concatenate([i for i, _ in images]), np.concatenate([a for _, a in images]))
    np.testing.assert_array_equal(scanned.generate(*args, max_new_tokens=6).token_ids, ref.token_ids)
    _engine_equals(scanned, ref)  # the engine's cache rows written into a stacked (scanned) cache
    sharded = _model("gemma", tokenizers["gemma"], mesh=(2, 2, 2, 1))
    np.testing.assert_array_equal(sharded.generate(*args, max_new_tokens=6).token_ids, ref.token_ids)


def test_cached_decode_equals_the_uncached_forward(tokenizers):
    """Each generated token is the argmax of the full forward (`logits`, no cache) over the prompt and the
    tokens before it, and its scores are that forward's last logits."""
    model = _model("llama_3", tokenizers["llama_3"])
    ids, images = _prompts(model.config, model.config.lm.vocab_size)
    x, (im, aux) = ids[1], images[1]
    out = model.generate([x], im, aux, max_new_tokens=5, output_scores=True, stop=())
    seq = list(x)
    for i, token in enumerate(out.token_ids[0]):
        logits = np.asarray(model.logits(np.asarray([seq]), im, aux))[0, -1]
        np.testing.assert_allclose(out.scores[0, i], logits, atol=1e-5, rtol=1e-5)
        if token == model.tokenizer.eos_token_id:
            break
        assert token == int(np.argmax(logits))
        seq.append(int(token))


def test_sampling(tokenizers):
    """top_k=1 is greedy; a seed gives the same samples again; filters keep what they should."""
    model = _model("vicuna", tokenizers["vicuna"])
    ids, images = _prompts(model.config, model.config.lm.vocab_size)
    args = (ids, np.concatenate([i for i, _ in images]), np.concatenate([a for _, a in images]))
    greedy = model.generate(*args, max_new_tokens=6)
    np.testing.assert_array_equal(model.generate(*args, max_new_tokens=6, temperature=0.7, top_k=1).token_ids,
                                  greedy.token_ids)
    a = model.generate(*args, max_new_tokens=6, temperature=1.5, seed=3)
    np.testing.assert_array_equal(a.token_ids, model.generate(*args, max_new_tokens=6, temperature=1.5,
                                                              seed=3).token_ids)
    # probabilities 0.5, 0.25, 0.125, 0.125: top_p 0.6 keeps the first two, top_p 0.4 the first only
    logits = jnp.log(jnp.asarray([[0.125, 0.5, 0.125, 0.25]]))
    kept = lambda p, k=0: np.isfinite(np.asarray(filter_logits(logits, k, jnp.float32(p))))[0].tolist()  # noqa: E731
    assert kept(0.6) == [False, True, False, True]
    assert kept(0.4) == [False, True, False, False]
    assert kept(1.0, k=2) == [False, True, False, True]


def test_stops(tokenizers):
    """A stop string ends the text before it and pads the ids after the token that completes it; the
    template's end-of-turn stops as a token."""
    model = _model("llama_3", tokenizers["llama_3"])
    ids, images = _prompts(model.config, model.config.lm.vocab_size)
    x, (im, aux) = ids[0], images[0]
    free = model.generate([x], im, aux, max_new_tokens=6, stop=())
    words = [model.tokenizer.decode([t]) for t in free.token_ids[0]]
    k = next(i for i, w in enumerate(words) if i >= 1 and w.strip() and w not in words[:i])
    cut = model.generate([x], im, aux, max_new_tokens=6, stop=[words[k]])
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    assert (cut.token_ids[0, k + 1:] == pad).all()
    np.testing.assert_array_equal(cut.token_ids[0, :k + 1], free.token_ids[0, :k + 1])
    assert words[k] not in cut.text[0] and cut.text[0] == model.tokenizer.decode(
        free.token_ids[0, :k], skip_special_tokens=True).strip()
    from mgjax.pretrained import _stops

    token_stops, text_stops = _stops(model.tokenizer, ["<|eot_id|>", "a b"])
    assert model.tokenizer.convert_tokens_to_ids("<|eot_id|>") in token_stops and text_stops == ("a b",)


def test_bad_arguments_are_clear_errors(tokenizers):
    model = _model("vicuna", tokenizers["vicuna"])
    ids, images = _prompts(model.config, model.config.lm.vocab_size)
    im, aux = images[0]
    for kw, culprit in (({"num_beams": 5, "top_k": 3}, "no top_k"), ({"top_p": 0.0}, "top_p"),
                        ({"max_new_tokens": 0}, "max_new_tokens")):
        with pytest.raises(MGJaxError, match=culprit):
            model.generate([ids[0]], im, aux, **{"max_new_tokens": 4, **kw})
    with pytest.raises(MGJaxError, match="1-D id sequences"):
        model.generate([[]], im, aux, max_new_tokens=4)
    with pytest.raises(MGJaxError, match="need 2 images"):
        model.generate([ids[0], ids[2]], im, aux, max_new_tokens=4)
    long = np.concatenate([ids[0], np.full(model.config.max_length, 5)])
    with pytest.raises(MGJaxError, match="maximum length"):
        model.generate([long], im, aux, max_new_tokens=2)
    with pytest.warns(UserWarning, match="truncated"):  # the original cuts the prompt's end
        assert model.generate([long], im, aux, max_new_tokens=2, truncate=True).token_ids.shape == (1, 2)


def test_generate_command(tmp_path, monkeypatch, capsys):
    """`mgjax generate`: one question prints the original's greedy answer; a JSONL batch (two images in a
    prompt, a text-only one) writes one answer line per prompt, each what that prompt gives alone; a bad
    line is exit 2 naming it, with nothing written."""
    from mgjax.cli import main

    case = GOLDEN / "llama_vicuna"
    monkeypatch.chdir(case)
    ref = np.load(case / "expected.npz")
    assert main(["generate", "MGM-7B-tiny", "--image", "input.jpg", "--max-new-tokens", "8",
                 "--question", "What is unusual about this image?"]) == 0
    model = golden_model()
    assert capsys.readouterr().out.strip() == model.tokenizer.decode(ref["generate_ids"][0],
                                                                      skip_special_tokens=True).strip()
    prompts = tmp_path / "p.jsonl"
    records = [{"question_id": "a", "text": "What is this?", "image": "input.jpg"},
               {"question_id": "b", "text": "Two images?", "image": ["input.jpg", "input2.png"]},
               {"question_id": "c", "text": "No image"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "MGM-7B-tiny", "--prompts", str(prompts), "--image-root", ".", "--out", str(out),
                 "--max-new-tokens", "5", "--batch-size", "2"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == ["a", "b", "c"]
    for r, a in zip(records, answers):
        names = r.get("image", [])
        ids, im, aux = model.prompt_inputs(r["text"], [case / n for n in ([names] if isinstance(names, str)
                                                                           else names)])
        assert a["text"] == model.generate([ids], im, aux, max_new_tokens=5).text[0]
    prompts.write_text('{"question_id": 1, "text": "ok"}\n{"question_id": 2, "image": "input.jpg"}\n')
    assert main(["generate", "MGM-7B-tiny", "--prompts", str(prompts), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "line 2" in capsys.readouterr().err and not list(tmp_path.glob("x.jsonl*"))


def test_generate_command_over_a_mesh(monkeypatch, capsys):
    """`--mesh` splits the model over this host's 8 devices (fsdp 2 x data 4; the one prompt is padded to the
    batch shards): the original's greedy answer still."""
    from mgjax.cli import main

    case = GOLDEN / "llama_vicuna"
    monkeypatch.chdir(case)
    ref = np.load(case / "expected.npz")
    assert main(["generate", "MGM-7B-tiny", "--image", "input.jpg", "--max-new-tokens", "8", "--mesh",
                 "data=4,fsdp=2", "--question", "What is unusual about this image?"]) == 0
    assert capsys.readouterr().out.strip() == golden_model().tokenizer.decode(
        ref["generate_ids"][0], skip_special_tokens=True).strip()


def test_chat_turns_and_the_image_prompt(monkeypatch, capsys):
    """Each chat turn answers the whole conversation so far in the template (the image marker in the
    message that brought the image), as generate does on that prompt; `mgjax chat` reads stdin (a bad
    `/image` path is reported and the conversation goes on); `<h>...</h>` gives the image prompt."""
    import io

    from mgjax.cli import main
    from mgjax.data.templates import get_template
    from mgjax.infer.chat import Chat, generation_prompt

    case = GOLDEN / "llama_vicuna"
    monkeypatch.chdir(case)
    model = golden_model()
    chat = Chat(model, {"max_new_tokens": 4})
    first = chat.ask("What is unusual about this image?", ["input.jpg"])
    second = chat.ask("And the colours?")
    ids, im, aux = model.prompt_inputs("What is unusual about this image?", ["input.jpg"])
    assert first == model.generate([ids], im, aux, max_new_tokens=4).text[0]
    prompt = get_template("vicuna_v1").render(["<image>\nWhat is unusual about this image?", first,
                                                "And the colours?", None])
    assert second == model.generate([model.tokenize(prompt)], im, aux, max_new_tokens=4).text[0]

    monkeypatch.setattr("sys.stdin", io.StringIO("/image input.jpg\nWhat is unusual about this image?\n"
                                                 "/image missing.jpg\nAnd the colours?\n/quit\n"))
    assert main(["chat", "MGM-7B-tiny", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [first, second] and "missing.jpg" in captured.err

    assert generation_prompt("Here: <h>a red fox</h> or <h> a cat\nin snow </h>.") == "a cat\nin snow"
    assert generation_prompt("no prompt") is None

