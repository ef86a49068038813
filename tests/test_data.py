"""Training data: records, `mgjax data pack` (grain + TFDS), the batch pipeline, synthetic data.

Chat-template samples use the golden fixture's small Llama tokenizer: its label masks come out as the
original's. tiny.save_tokenizer's word-level tokenizer adds no BOS, so every chat sample it tokenizes is a
"tokenization mismatch" (fully masked): it serves the no-supervised-token case and the plain template.
"""

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

import tiny
from helpers import GOLDEN
from mgjax.cli import main
from mgjax.data.conversation import conversation_to_ids
from mgjax.data.image import preprocess_image
from mgjax.data.pipeline import DataConfig, HostOrder, epoch_order, make_dataset, pad_to
from mgjax.data.records import BadRecords, modality_length, read_records
from mgjax.data.sources import JsonSource, PackedSource
from mgjax.data.synthetic import CHANCE, SyntheticShapes
from mgjax.data.tokenize import load_tokenizer
from mgjax.errors import MGJaxError

CONFIG = tiny.mgm("vicuna")
TPI = CONFIG.tokens_per_image
SMALL = dict(num_threads=2, prefetch=4)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GOLDEN / "llama_vicuna" / "MGM-7B-tiny")


def _png(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _turns(*values):
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


class ListSource:
    def __init__(self, records):
        self.records = records
        self.lengths = np.asarray([modality_length(r) for r in records], np.int32)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def _image_record(i, n_words=3, images=1):
    """One `<image>` per human message (the original merges several in one message into one)."""
    question = " ".join(["word"] * n_words)
    turns = [v for j in range(images) for v in (f"<image>\nquestion {i} {question}", f"answer {i}.{j}")]
    return {"id": f"img{i}", "images": [_png((10 * i % 255, 40 * j, 90)) for j in range(images)],
            "conversations": _turns(*turns)}


def _text_record(i):
    return {"id": f"txt{i}", "images": [], "conversations": _turns(f"text question {i}", f"text answer {i}")}


def _batches(source, tok, n, config=CONFIG, **kw):
    it = iter(make_dataset(source, tok, config, DataConfig(**{**SMALL, "shuffle": False, **kw})))
    return [next(it) for _ in range(n)], it


def _rows(batch):
    """Per row, per segment: (input_ids, labels)."""
    out = []
    for ids, labels, seg in zip(batch["input_ids"], batch["labels"], batch["segment_ids"]):
        out.append([(ids[seg == k], labels[seg == k]) for k in range(1, seg.max() + 1)])
    return out


# ---- records ----

def test_records_json_jsonl_and_bad_records(tmp_path, caplog):
    good = [{"id": "a", "image": "x.png", "conversations": _turns("<image>\nq", "r")},
            {"id": "b", "conversations": _turns("q", "r", "q2", "r2")},
            {"id": "c", "image": ["x.png", "y.png"], "conversations": _turns("<image> q", "r", "<image>", "r")}]
    bad = [[1, 2],
           {"id": "no_conv"},
           {"id": "bad_from", "conversations": [{"from": "system", "value": "q"}]},
           {"id": "bad_image", "image": 3, "conversations": _turns("q", "r")},
           {"id": "no_gpt", "conversations": _turns("<image> q")[:1], "image": "x.png"},
           {"id": "empty_gpt", "conversations": _turns("q", "  ")},
           {"id": "markers", "image": ["x.png", "y.png"], "conversations": _turns("<image> q", "r")},
           {"id": "two_in_one", "image": ["x.png", "y.png"], "conversations": _turns("<image> <image> q", "r")}]
    (tmp_path / "d.json").write_text(json.dumps(good + bad))
    (tmp_path / "d.jsonl").write_text("\n".join([json.dumps(r) for r in good] + ["{broken"]) + "\n")
    counts = BadRecords("test")
    with caplog.at_level(logging.WARNING):
        records = list(read_records(tmp_path / "d.json", counts))
    assert [r["id"] for r in records] == ["a", "b", "c"]
    assert records[2]["images"] == ["x.png", "y.png"] and records[1]["images"] == []
    assert dict(counts.counts) == {"malformed": 4, "no_assistant_turn": 2, "image_count": 2}
    assert "markers" in caplog.text and "no_conv" in caplog.text
    counts = BadRecords("test")
    assert [r["id"] for r in read_records(tmp_path / "d.jsonl", counts)] == ["a", "b", "c"]
    assert dict(counts.counts) == {"malformed": 1}
    assert [modality_length(r) for r in records] == [3, -4, 5]
    (tmp_path / "obj.json").write_text("[1,")
    with pytest.raises(MGJaxError, match="not valid JSON"):
        list(read_records(tmp_path / "obj.json"))


# ---- pack ----

@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    src = root / "src"
    json_path = SyntheticShapes(6, seed=3).write(src)
    records = json.loads(json_path.read_text())
    (src / "images" / "two.png").write_bytes(_png((1, 2, 3)))
    (src / "images" / "corrupt.png").write_bytes(b"\x89PNG not an image")
    records += [{"id": "two", "image": ["images/two.png", "images/two.png"],
                 "conversations": _turns("<image>\nleft?", "yes", "<image>\nright?", "yes")},
                {"id": "text", "conversations": _turns("hello", "hi")},
                {"id": "missing", "image": "images/nope.png", "conversations": _turns("<image>", "x")},
                {"id": "corrupt", "image": "images/corrupt.png", "conversations": _turns("<image>", "x")},
                {"id": "malformed", "conversations": "no"}]
    json_path.write_text(json.dumps(records))
    return root, json_path, src


def test_pack_read_back_with_grain_and_tfds(packed, capsys):
    root, json_path, src = packed
    assert main(["data", "pack", str(json_path), str(src), str(root / "out"), "--shard-size", "3"]) == 0
    assert "packed 8 records" in capsys.readouterr().out
    expected = JsonSource(json_path, src)
    assert dict(expected.bad.counts) == {"malformed": 1}
    expected = [r for r in expected if r["id"] not in ("missing", "corrupt")]
    got = PackedSource(root / "out")
    assert got.meta["skipped"] == {"corrupt_image": 1, "malformed": 1, "missing_image": 1}
    assert got.meta["shard_lengths"] == [3, 3, 2] and len(got) == 8
    np.testing.assert_array_equal(got.lengths, [modality_length(r) for r in expected])
    for r, g in zip(expected, got):
        assert g["id"] == r["id"] and g["conversations"] == r["conversations"]
        assert g["images"] == [open(p, "rb").read() for p in r["images"]]  # the files' bytes, not re-encoded

    import tensorflow_datasets as tfds

    train = tfds.builder_from_directory(str(root / "out")).as_data_source()["train"]
    assert len(train) == 8
    for r, t in zip(got, train):
        assert t["id"].decode() == r["id"] and json.loads(t["conversations"]) == r["conversations"]
        assert list(t["images"]) == r["images"]


def test_pack_bad_input_exits_2(packed, capsys):
    root, json_path, src = packed
    out = root / "out2"
    assert main(["data", "pack", str(root / "none.json"), str(src), str(out)]) == 2
    assert main(["data", "pack", str(json_path), str(root / "no_dir"), str(out)]) == 2
    (root / "empty.json").write_text("[]")
    assert main(["data", "pack", str(root / "empty.json"), str(src), str(out)]) == 2
    assert not out.exists() and not list(root.glob(".out2*"))  # nothing half-written
    out.mkdir()
    (out / "keep").write_text("x")
    assert main(["data", "pack", str(json_path), str(src), str(out)]) == 2
    assert (out / "keep").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("mgjax data: error:") for line in err if "skipped record" not in line)
    with pytest.raises(SystemExit) as e:
        main(["data", "pack", str(json_path), str(src), str(out), "--shard-size", "0"])
    assert e.value.code == 2


# ---- pipeline ----

def test_samples_match_conversation_to_ids(tok):
    source = ListSource([_image_record(i, n_words=i) for i in range(4)] + [_text_record(0)])
    (b,), _ = _batches(source, tok, 1, batch_size=5, image_capacity=5, buckets=(64, 128, 256))
    assert b["input_ids"].shape == (5, 128) and b["images"].shape == (5, 56, 56, 3)
    assert b["images_aux"].shape == (5, 64, 64, 3)
    assert all(v.dtype == np.int32 for k, v in b.items() if "image" not in k and k != "sample_ids")
    assert b["sample_ids"].tolist() == [str(r["id"]) for r in source.records]  # row by row, for the logs
    for r, [(ids, labels)], mask in zip(source.records, _rows(b), b["attention_mask"]):
        want_ids, want_labels = conversation_to_ids(tok, r["conversations"], "vicuna_v1", bool(r["images"]), 2048)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(labels, want_labels)
        assert mask.sum() == len(want_ids)
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    for i in range(4):
        images, aux = preprocess_image(source.records[i]["images"][0], CONFIG)
        np.testing.assert_array_equal(b["images"][i], images)
        np.testing.assert_array_equal(b["images_aux"][i], aux)
    assert not b["images"][4].any() and not b["images_aux"][4].any()  # the text-only row's zero image


def test_text_only_and_several_images_consume_slots(tok):
    source = ListSource([_image_record(0), _text_record(1), _image_record(2, images=2)])
    (b,), _ = _batches(source, tok, 1, batch_size=3, image_capacity=5, buckets=(128, 256))
    assert b["images"].shape[0] == 5
    used = [preprocess_image(r, CONFIG)[0] for r in (source[0]["images"][0], *source[2]["images"])]
    np.testing.assert_array_equal(b["images"][[0, 2, 3]], np.stack(used))
    assert not b["images"][[1, 4]].any()  # text-only row: one zero slot; trailing slot unused
    assert ((b["input_ids"] == -200).sum(1) == [1, 0, 2]).all()


def test_hd_and_stage1_images(tok):
    hd = tiny.mgm("vicuna", hd=True)
    source = ListSource([_image_record(0)])
    (b,), _ = _batches(source, tok, 1, config=hd, batch_size=1, buckets=(128,), pad_images=False)
    assert b["images"].shape == (1, 5, 56, 56, 3) and b["images_aux"].shape == (1, 128, 128, 3)
    np.testing.assert_array_equal(b["images"][0], preprocess_image(source[0]["images"][0], hd, pad=False)[0])


def test_buckets_and_capacity_give_static_shapes(tok):
    source = ListSource([_image_record(i, n_words=5 if i % 2 else 60) for i in range(8)])
    batches, _ = _batches(source, tok, 4, batch_size=2, buckets=(128, 256, 512))
    shapes = {k: {b[k].shape for b in batches} for k in batches[0]}
    assert shapes["input_ids"] == {(2, 512)}  # one long row makes the batch T=512
    (b,), _ = _batches(ListSource([_image_record(i, n_words=1) for i in range(2)]), tok, 1, batch_size=2,
                       buckets=(128, 256, 512))
    assert b["input_ids"].shape == (2, 128) and b["images"].shape == (2, 56, 56, 3)
    # 4 slots for 3 rows: a second 2-image sample does not fit (1 + 2 + 2 > 4): it waits for the next batch,
    # and the batch is closed with an empty row (which takes the last slot).
    source = ListSource([_image_record(0), _image_record(1, images=2), _image_record(2, images=2)])
    (b1, b2), _ = _batches(source, tok, 2, batch_size=3, image_capacity=4, buckets=(256,), num_epochs=1)
    assert (b1["input_ids"] == -200).sum(1).tolist() == [1, 2, 0] and b1["attention_mask"][2].sum() == 0
    assert (b2["input_ids"] == -200).sum(1).tolist() == [2, 0, 0]
    padded = pad_to(b2, 300, 0)
    assert padded["input_ids"].shape == (3, 300) and (padded["labels"][:, 256:] == -100).all()


def test_bad_records_at_load_time_and_max_fraction(tok, caplog):
    corrupt = {**_image_record(1), "id": "corrupt", "images": [b"\x89PNG broken"]}
    long = {**_image_record(2, n_words=100), "id": "long"}
    plain_text = {**_text_record(3), "id": "wrong_count", "conversations": _turns("q <image>", "r")}
    good = [_image_record(i) for i in range(10, 14)]
    source = ListSource([good[0], corrupt, good[1], long, plain_text, good[2], good[3]])
    with caplog.at_level(logging.WARNING):
        (b1, b2), it = _batches(source, tok, 2, batch_size=2, buckets=(128,), max_bad_fraction=0.5, num_epochs=1)
    assert it.get_state()["bad"] == {"image": 1, "image_count": 1, "too_long": 1}
    assert "corrupt" in caplog.text and "long" in caplog.text
    with pytest.raises(StopIteration):
        next(it)
    with pytest.raises(MGJaxError, match="max_bad_fraction"):
        _batches(ListSource([good[0], corrupt, long, good[1]]), tok, 5, batch_size=1, buckets=(128,),
                 max_bad_fraction=0.2, bad_check_after=4)


def test_no_supervised_token_is_bad(tmp_path):
    tiny.save_tokenizer("vicuna", tmp_path)
    word_tok = load_tokenizer(tmp_path)
    source = ListSource([_text_record(0), _image_record(1)])
    plain = [{"id": "cap", "images": [_png((9, 9, 9))], "conversations": _turns("<image>", "a b")}]
    (b,), it = _batches(ListSource(plain), word_tok, 1, batch_size=1, buckets=(16,), template="plain",
                        pad_images=False, num_epochs=1)
    ids, labels = conversation_to_ids(word_tok, plain[0]["conversations"], "plain", True, 2048)
    assert b["input_ids"][0, :len(ids)].tolist() == ids and b["labels"][0, :len(ids)].tolist() == labels
    assert labels[0] == -100 and labels[1] != -100  # the image masked, the caption supervised
    _, it = _batches(source, word_tok, 0, batch_size=1, buckets=(64,), num_epochs=1)
    with pytest.raises(StopIteration):
        next(it)
    assert it.get_state()["bad"] == {"no_supervised": 2}


@pytest.mark.parametrize("pack", [False, True])
def test_state_round_trip_is_bitwise(tok, pack):
    """Across epochs, with a bad record, and (packing) a sample held over to the next batch."""
    records = [_image_record(i, n_words=i % 7) for i in range(9)] + [_text_record(i) for i in range(5)]
    records[4] = {**records[4], "images": [b"bad"]}
    source = ListSource(records)
    data = DataConfig(batch_size=3, buckets=(128, 256), seed=7, max_bad_fraction=0.5, pack=pack, **SMALL)
    ds = make_dataset(source, tok, CONFIG, data)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    after = [next(it) for _ in range(6)]  # crosses epoch boundaries
    restored = iter(make_dataset(source, tok, CONFIG, data))
    restored.set_state(state)
    for a, b in zip(after, [next(restored) for _ in range(6)]):
        assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert restored.get_state() == it.get_state()


def test_hosts_disjoint_and_covering():
    lengths = np.asarray([5, -3, 8, 2, -7, 4, 9, -1, 6, 3, -2, 7], np.int32)
    data = DataConfig(batch_size=2, seed=1)
    hosts = [HostOrder(lengths, data, i, 2) for i in range(2)]
    for epoch in (0, 1):
        shares = [set(h.epoch(epoch).tolist()) for h in hosts]
        assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(12))
    assert hosts[0].epoch(0).tolist() != hosts[0].epoch(1).tolist()  # reshuffled each epoch
    assert [hosts[1](s) for s in range(6, 12)] == hosts[1].epoch(1).tolist()
    with pytest.raises(MGJaxError, match="process index"):
        HostOrder(lengths, data, 2, 2)


def test_grouping_by_modality_and_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 50) * np.where(rng.random(50) < 0.3, -1, 1)
    order = epoch_order(lengths, epoch=0, seed=0, megabatch=8)
    assert sorted(order.tolist()) == list(range(50))
    n_img, n_txt = (lengths > 0).sum(), (lengths < 0).sum()
    body = len(order) - (n_img % 8 or 8) - (n_txt % 8 or 8)
    for start in range(0, body, 8):
        mb = lengths[order[start:start + 8]]
        assert (mb > 0).all() or (mb < 0).all()
        assert (np.diff(np.abs(mb)) <= 0).all()
    assert not np.array_equal(order, epoch_order(lengths, epoch=1, seed=0, megabatch=8))


def test_packing_keeps_samples_intact(tok):
    records = [_image_record(i, n_words=i) for i in range(5)] + [_text_record(i) for i in range(3)]
    source = ListSource(records)
    (b,), _ = _batches(source, tok, 1, batch_size=2, image_capacity=6, buckets=(512,), pack=True)
    rows = _rows(b)
    assert sum(len(r) for r in rows) > 2  # several samples per row
    flat = [seg for row in rows for seg in row]
    for r, (ids, labels) in zip(records, flat):
        want_ids, want_labels = conversation_to_ids(tok, r["conversations"], "vicuna_v1", bool(r["images"]), 2048)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(labels, want_labels)  # its first label is masked anyway (BOS)
    pad = b["segment_ids"] == 0
    assert (b["attention_mask"][pad] == 0).all() and (b["labels"][pad] == -100).all()
    assert (b["attention_mask"][~pad] == 1).all()
    n_img = (b["input_ids"] == -200).sum(1)
    merged = b["attention_mask"].sum(1) + n_img * (TPI - 1)
    assert (merged <= CONFIG.max_length).all() and np.maximum(n_img, 1).sum() <= 6


# ---- synthetic ----

def test_synthetic_deterministic_and_heldout_disjoint(tmp_path):
    a, b = SyntheticShapes(20, seed=5), SyntheticShapes(20, seed=5)
    for i in (0, 7, 19):
        assert a[i]["conversations"] == b[i]["conversations"]
        np.testing.assert_array_equal(a[i]["images"][0], b[i]["images"][0])
    assert SyntheticShapes(20, seed=6)[0]["conversations"] != a[0]["conversations"] or \
        SyntheticShapes(20, seed=6).spec(0) != a.spec(0)
    held = SyntheticShapes(20, split="heldout", seed=5)
    assert not set(a.specs) & set(held.specs)
    assert len(set(a.specs) | set(held.specs)) == len(a.specs) + len(held.specs)
    assert all(len(held.answer(i)) == 1 for i in range(20))
    caption = SyntheticShapes(3, stage=1, seed=5)[1]["conversations"]
    assert caption[0]["value"] == "<image>" and caption[1]["value"].startswith("a ")
    assert CHANCE == {"colour": 1 / 4, "shape": 1 / 3, "position": 1 / 4}
    path = SyntheticShapes(3, seed=5).write(tmp_path)
    assert [r["id"] for r in read_records(path)] == [a[i]["id"] for i in range(3)]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / json.loads(path.read_text())[0]["image"])),
                                  a[0]["images"][0])
