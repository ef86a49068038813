"""`load_pretrained` and `Pretrained`: a released MGM checkpoint, ready to run."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mgjax.config import IMAGE_TOKEN_INDEX, MGMConfig
from mgjax.convert import load_params
from mgjax.convert.mgjax_ckpt import is_mgjax_checkpoint, read_meta
from mgjax.convert.source import open_source
from mgjax.data.image import ImageLike, preprocess_image
from mgjax.data.templates import build_prompt, get_template, with_image_markers
from mgjax.data.tokenize import checkpoint_template, load_tokenizer, tokenize_with_images
from mgjax.errors import MGJaxError
from mgjax.infer.beam import make_beam_search
from mgjax.infer.generate import make_generate
from mgjax.model import MGM, abstract_params, merged_lengths
from mgjax.quant import SCALE_SUFFIX, matrix_layout, quantize_params
from mgjax.sharding import DEFAULT_RULES, Rules, activate, batch_sharding, batch_shards, param_shardings
from mgjax.train.checkpoints import is_run_dir, restore_run_params, run_param_reader

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("int8", "int4")  # load_pretrained(quantize=...): `LMConfig.quant` modes beyond "none"
# Float bytes of the LLM matrices read per step when loading quantised: the float copy held beside the
# quantised model stays this small, and an mgjax checkpoint is opened a few times, not once per matrix.
QUANTIZE_CHUNK_BYTES = 1 << 30
# Preprocessed pixels lie in [-1.8, 2.2] (CLIP normalisation of [0, 1]); far beyond is raw pixels.
PIXEL_LIMIT = 10.0


@dataclass
class Generation:
    """What `Pretrained.generate` returns: token_ids int [B, N] (N = max_new_tokens; a row's stop token is
    kept, the pad id follows it), text (B strings: special tokens skipped, stop strings cut, stripped) and,
    with output_scores, scores float32 [B, N, V] (the logits each token was chosen from)."""

    token_ids: np.ndarray
    text: list[str]
    scores: np.ndarray | None = None
    lengths: np.ndarray | None = None  # int [B]: the answer's tokens, its stop included
    stopped: np.ndarray | None = None  # bool [B]: ended at a stop (else at max_new_tokens)


def _left_padded(input_ids, attention_mask, pad_id: int) -> tuple[np.ndarray, np.ndarray | None]:
    """[B, T] ids and mask from a [B, T] array (and mask) or a list of 1-D sequences, left-padded."""
    if isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise MGJaxError("attention_mask goes with a [B, T] input_ids array; a list of sequences needs none")
        seqs = [np.asarray(x) for x in input_ids]
        if not seqs or any(x.ndim != 1 or not len(x) for x in seqs):
            raise MGJaxError("input_ids as a list must hold B non-empty 1-D id sequences")
        width = max(len(x) for x in seqs)
        ids = np.full((len(seqs), width), pad_id, np.int64)
        mask = np.zeros((len(seqs), width), np.int64)
        for i, x in enumerate(seqs):
            if not np.issubdtype(x.dtype, np.integer):
                raise MGJaxError(f"input_ids[{i}] holds {x.dtype}, not token ids")
            ids[i, width - len(x):], mask[i, width - len(x):] = x, 1
        return ids, mask
    return np.asarray(input_ids), attention_mask


def _padded_to(ids: np.ndarray, mask: np.ndarray, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, T] ids and mask left-padded (masked) to `width` columns, as the serving engine pads its prompts: one
    compiled program then serves every prompt length of a bucket (jax.jit traces again for every new shape).
    The model drops masked tokens when it merges text and images, so the padding changes nothing else."""
    extra = max(width - ids.shape[1], 0)
    return np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id), np.pad(mask, ((0, 0), (extra, 0)))


def _budget(n: int) -> int:
    """The cache room compiled for `n` new tokens: a power of two >= 16."""
    return max(16, 1 << (n - 1).bit_length())


def _stops(tokenizer, stops: Sequence[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(token ids, strings): each stop that is one token of the vocabulary is checked on device as that id (a
    row ends there at once), and every stop that is not a special token on the decoded text too, since other
    tokens can spell it ("an" inside "ang"); the tokenizer's eos always stops."""
    return _stop_sets(tokenizer, tuple(stops))


@functools.lru_cache(maxsize=256)
def _stop_sets(tokenizer, stops: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    # cached: the vocabulary dict is rebuilt by every get_vocab() (256k entries for Gemma), and a server
    # or an evaluation asks for the same stops with every request or batch
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    texts = []
    vocab, special = tokenizer.get_vocab(), set(tokenizer.all_special_tokens)
    for s in dict.fromkeys(stops):
        encoded = tokenizer.encode(s, add_special_tokens=False)
        if s in vocab:
            ids.add(vocab[s])
        elif len(encoded) == 1 and tokenizer.decode(encoded) == s:
            ids.add(encoded[0])
        if s not in special:
            texts.append(s)
    return tuple(sorted(ids)), tuple(texts)


def _stop_at(tokenizer, row: np.ndarray, text_stops: tuple[str, ...]) -> int:
    """How many of `row`'s tokens stay: up to the first token whose text completes a stop string (or all)."""
    def has_stop(k: int) -> bool:
        text = tokenizer.decode(row[:k])
        return any(s in text for s in text_stops)

    if not text_stops or not has_stop(len(row)):
        return len(row)
    lo, hi = 1, len(row)  # the smallest k with a stop in the text of the first k tokens (more tokens keep it)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if has_stop(mid) else (mid + 1, hi)
    return lo


def _text(tokenizer, ids: np.ndarray, stops: Sequence[str]) -> str:
    """The answer: special tokens skipped, cut before the first stop string, stripped."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for s in stops:
        text = text.split(s)[0]
    return text.strip()


def length_bucket(n: int, limit: int, per_octave: int = 32) -> int:
    """The compiled sequence length serving `n` tokens, capped at `limit`: 64, 96, 128, 192, 256 up to 256
    tokens (short prompts are cheap; their programs are few), beyond that `n` rounded up to a multiple of 16
    or of 1/`per_octave` of the power of two below it, whichever is larger. Inference takes 32 per octave
    (multiples of 16 up to 1024, of 32 up to 2048, ...: under max(16, n / 32) tokens of padding, <= 5% of the
    work from 320 tokens on, <= 3.1% from 512); training's steps, each bucket a compile of the whole step,
    take `TRAIN_PER_OCTAVE`."""
    if n <= 64:
        return min(64, limit)
    octave = 1 << ((n - 1).bit_length() - 1)  # the power of two below n
    step = octave // 2 if n <= 256 else max(16, octave // per_octave)
    return min(-(-n // step) * step, limit)


# Training's merged-length buckets: 64, 96, 128, 192, 256, 384, ... (two per octave, at most a third of a
# step padding): its rows already differ in length within a batch, and each bucket compiles a whole step.
TRAIN_PER_OCTAVE = 2


@dataclass
class Pretrained:
    """A loaded MGM model: `config`, `params`, `module` (the linen module) and `tokenizer`."""

    config: MGMConfig
    params: Any
    module: MGM
    path: Path
    tokenizer_path: Path | None = None  # where the tokenizer files are, when not in `path`
    mesh: Mesh | None = None
    rules: Rules = DEFAULT_RULES
    template_evidence: str = ""  # why config.template was chosen (families.TEMPLATE_ORDER)
    # Per tower, where its weights came from and why (`convert.source.open_source`): {"vision_tower":
    # {"weights": "checkpoint" | "folder", "folder": path or None, "why": ...}, "vision_tower_aux": ...}
    tower_sources: dict = field(default_factory=dict)
    _tokenizer: Any = field(default=None, repr=False)
    _jitted: dict = field(default_factory=dict, repr=False)

    @property
    def tokenizer(self):
        """From the checkpoint's own files (or the base LLM's, for a stage-1 release); never the network."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path or self.path)
        return self._tokenizer

    def preprocess(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray]:
        """One image (PIL, uint8 NumPy H x W x 3, or a path) -> (images, images_aux) NHWC without batch
        axis, exactly as the original builds them."""
        return preprocess_image(image, self.config)

    def build_prompt(self, question: str, template: str | None = None) -> str:
        """A one-turn prompt for one image in the checkpoint's template (or `template`)."""
        return build_prompt(question, template or self.config.template)

    def prompt_inputs(self, question: str, images: Sequence[ImageLike] = ()) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
        """(ids [T], images [n, ...], images_aux [n, ...]) of a one-turn prompt in the model's template with
        one `<image>` per image leading the question; without images, one zero image (which the prompt does
        not use), as the original feeds text-only samples."""
        t = get_template(self.config.template)
        ids = self.tokenize(t.render([with_image_markers(t, question, len(images)), None]))
        if not images:
            return ids, *self.zero_images()
        pre = [self.preprocess(im) for im in images]
        return ids, np.stack([a for a, _ in pre]), np.stack([b for _, b in pre])

    def zero_images(self, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """`n` zero (images, images_aux): what a prompt without `<image>` is given, as in the original."""
        c = self.config
        views = () if c.num_views == 1 else (c.num_views,)
        return (np.zeros((n, *views, c.image_size, c.image_size, 3), np.float32),
                np.zeros((n, c.image_size_aux, c.image_size_aux, 3), np.float32))

    def tokenize(self, prompt: str) -> np.ndarray:
        """Prompt text with `<image>` markers -> int ids with -200 placeholders."""
        return np.asarray(tokenize_with_images(self.tokenizer, prompt), np.int32)

    def logits(self, input_ids, images, images_aux, attention_mask=None, *, truncate: bool = False) -> jax.Array:
        """float32 logits [B, L, V] over the merged (text + visual) sequence, padded on the config's side
        like the original; L = the longest merged row.

        input_ids int [B, T] with -200 at image positions; images [n, h, w, 3] (HD: [n, V, h, w, 3],
        global view last) as `preprocess` makes them; images_aux [n, S, S, 3]; attention_mask [B, T],
        1 = real token. A merged row longer than `config.max_length` is an error, or with
        `truncate=True` cut to it (as the original does) with a warning.
        """
        ids, mask, images, images_aux, length = self._check_inputs(input_ids, images, images_aux, attention_mask,
                                                                   truncate)
        # Prompts of any length run through a few compiled programs: the merged length is bucketed and
        # the padding (masked, after every real token) sliced off again.
        bucket = length_bucket(length, self.config.max_length)
        ids, mask = _padded_to(ids, mask, bucket, 0)
        if bucket not in self._jitted:
            self._jitted[bucket] = jax.jit(
                lambda p, i, im, aux, m: self.module.apply({"params": p}, i, im, aux, m, length=bucket)[0])
        inputs = (ids, images, images_aux, mask)
        if self.mesh is None:
            out = self._jitted[bucket](self.params, *inputs)
        else:
            with activate(self.mesh, self.rules):
                out = self._jitted[bucket](self.params, *(self._place(x) for x in inputs))
        return out[:, :length] if self.config.padding_side == "right" else out[:, bucket - length:]

    def generate(self, input_ids, images, images_aux, *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, num_beams: int = 1, stop: Sequence[str] | None = None,
                 seed: int = 0, attention_mask=None, output_scores: bool = False,
                 truncate: bool = False) -> "Generation":
        """Answers for a batch of prompts, each row what that prompt gives alone (exactly, at temperature 0).

        input_ids: int [B, T] with -200 at image positions (with `attention_mask` for padding), or a list of
        B 1-D id sequences of any lengths; images, images_aux: batched as for `logits`. Greedy at
        `temperature` 0, else sampled from softmax(logits / temperature) within the `top_k` most likely
        (0 = all) and the `top_p` nucleus, from `seed`. `num_beams` > 1: beam search as HF's generate does it,
        or at `temperature` > 0 its beam sampling (MMMU's protocol). A row stops at the tokenizer's eos, at its
        template's end-of-turn (`Template.stop`) or at any of `stop` (strings), or after `max_new_tokens`.
        Prompt lengths, batch sizes and budgets are bucketed, so a few compiled programs serve any workload.
        A prompt longer than `config.max_length` with its images expanded is an error, or with `truncate`
        cut to it at the end, as the original does.
        """
        if max_new_tokens < 1 or top_k < 0 or not 0.0 < top_p <= 1.0 or temperature < 0 or num_beams < 1:
            raise MGJaxError(f"max_new_tokens {max_new_tokens} must be >= 1, top_k {top_k} >= 0, top_p {top_p} in "
                             f"(0, 1], temperature {temperature} >= 0, num_beams {num_beams} >= 1")
        if num_beams > 1 and (output_scores or top_k or top_p < 1.0):
            raise MGJaxError(f"num_beams={num_beams}: beam search gives no output_scores and takes no top_k / top_p "
                             "(beam sampling draws from the whole softmax)")
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids, mask = _left_padded(input_ids, attention_mask, pad_id)
        ids, mask, images, images_aux, length = self._check_inputs(ids, images, images_aux, mask, truncate)
        rows = ids.shape[0]
        ids, mask, images, images_aux = self._pad_batch(ids, mask, images, images_aux, pad_id)
        stops = (*get_template(self.config.template).stop, *(stop or ()))
        token_stops, text_stops = _stops(tok, stops)
        bucket, budget = length_bucket(length, self.config.max_length), _budget(max_new_tokens)
        ids, mask = _padded_to(ids, mask, bucket, pad_id)
        greedy = temperature == 0.0
        key = ("generate", bucket, budget, greedy, top_k, token_stops, output_scores, num_beams)
        if key not in self._jitted:
            if num_beams > 1:
                self._jitted[key] = jax.jit(make_beam_search(self.module, bucket, budget, num_beams=num_beams,
                                                             stop_ids=token_stops, pad_id=pad_id, sample=not greedy))
            else:
                self._jitted[key] = jax.jit(make_generate(self.module, bucket, budget, greedy=greedy, top_k=top_k,
                                                          stop_ids=token_stops, pad_id=pad_id,
                                                          with_scores=output_scores))
        inputs = (ids, images, images_aux, mask)
        scalars = (jax.random.key(seed), np.int32(max_new_tokens), np.float32(temperature or 1.0),
                   np.float32(top_p))
        if self.mesh is None:
            out, scores = self._jitted[key](self.params, *inputs, *scalars)
        else:
            with activate(self.mesh, self.rules):
                out, scores = self._jitted[key](self.params, *(self._place(x) for x in inputs), *scalars)
        token_ids = np.array(out)[:rows, :max_new_tokens]
        texts, lengths, stopped = [], [], []
        for row in token_ids:
            hits = np.flatnonzero(np.isin(row, token_stops))
            text_cut = _stop_at(tok, row, text_stops)
            cut = min(text_cut, int(hits[0]) + 1 if len(hits) else len(row))
            stopped.append(bool(len(hits)) and int(hits[0]) + 1 == cut or
                           cut == text_cut and any(s in tok.decode(row[:cut]) for s in text_stops))
            row[cut:] = pad_id
            texts.append(_text(tok, row[:cut], stops))
            lengths.append(cut)
        return Generation(token_ids, texts, None if scores is None else np.asarray(scores)[:rows, :max_new_tokens],
                          np.asarray(lengths), np.asarray(stopped))

    def _pad_batch(self, ids, mask, images, images_aux, pad_id):
        """The batch grown to its bucket (a power of two; with a mesh, a multiple of the batch shards) with
        one-token rows and a zero image each, so that a few programs serve every batch size."""
        rows = ids.shape[0]
        target = 1 << (rows - 1).bit_length()
        if self.mesh is not None:
            target = -(-target // batch_shards(self.mesh)) * batch_shards(self.mesh)
        extra = target - rows
        if not extra:
            return ids, mask, images, images_aux
        filler = np.full((extra, ids.shape[1]), pad_id, np.int32)
        filler_mask = np.zeros_like(filler)
        filler_mask[:, -1] = 1
        zeros = lambda x: np.zeros((extra, *x.shape[1:]), x.dtype)  # noqa: E731
        return (np.concatenate([ids, filler]), np.concatenate([mask, filler_mask]),
                np.concatenate([images, zeros(images)]), np.concatenate([images_aux, zeros(images_aux)]))

    def _place(self, x):
        """A batch array onto the mesh: split like `act_batch` when the batch divides, else replicated."""
        s = batch_sharding(self.mesh, x.ndim, self.rules)
        if x.shape[0] % batch_shards(self.mesh):
            s = NamedSharding(self.mesh, PartitionSpec())
        return jax.device_put(x, s)

    def _check_inputs(self, input_ids, images, images_aux, attention_mask, truncate: bool, check_values: bool = True):
        """The inputs as int32 / float32 arrays and the merged length, after checking everything that
        would otherwise fail inside the program or silently give garbage (out-of-vocabulary ids give NaN)."""
        c = self.config
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise MGJaxError(f"input_ids must be an int array [B, T], got {ids.dtype} {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise MGJaxError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        bad = np.argwhere((mask != 0) & (mask != 1))
        if len(bad):
            r, t = bad[0]
            raise MGJaxError(f"attention_mask[{r}, {t}] = {mask[r, t]}: the mask holds 1 (token) or 0 (padding)")
        bad = np.argwhere((mask == 1) & (ids != IMAGE_TOKEN_INDEX) & ((ids < 0) | (ids >= c.lm.vocab_size)))
        if len(bad):
            r, t = bad[0]
            raise MGJaxError(f"input_ids[{r}, {t}] = {ids[r, t]} is not a token id of this model "
                             f"(0..{c.lm.vocab_size - 1}; {IMAGE_TOKEN_INDEX} marks an image)")
        images, images_aux = self._check_images(ids, mask, images, images_aux, check_values)
        merged = merged_lengths(ids, mask, c.tokens_per_image)
        row = int(np.argmax(merged))
        if merged[row] > c.max_length:
            what = (f"prompt row {row} is {merged[row]} tokens long with its images expanded, more than the model's "
                    f"maximum length {c.max_length}")
            if not truncate:
                raise MGJaxError(f"{what}; shorten it, or pass truncate=True to cut it like the original does")
            warnings.warn(f"{what}: truncated to {c.max_length}", stacklevel=3)
        length = int(min(merged[row], c.max_length))
        return ids.astype(np.int32), mask.astype(np.int32), images, images_aux, length

    def _check_images(self, ids, mask, images, images_aux, check_values: bool = True):
        """The images as float32 (not copied when they are); `check_values=False` skips the scan of their
        values, for arrays `preprocess` made (finite and in range by construction; about 5 ms for an HD image)."""
        c = self.config
        images, images_aux = np.asarray(images), np.asarray(images_aux)
        for name, x in (("images", images), ("images_aux", images_aux)):
            if not np.issubdtype(x.dtype, np.floating):
                raise MGJaxError(f"{name} are {x.dtype}: pass the preprocessed float pixels that "
                                 "Pretrained.preprocess() (use preprocess()) makes from an image")
            if check_values and (not np.isfinite(x).all() or np.abs(x).max(initial=0) > PIXEL_LIMIT):
                raise MGJaxError(f"{name} hold values in [{x.min():.3g}, {x.max():.3g}], far outside the "
                                 "preprocessed range (about -1.8 .. 2.2): raw pixels? use preprocess()")
        s, sa = c.image_size, c.image_size_aux
        want = (s, s, 3) if c.num_views == 1 else (c.num_views, s, s, 3)
        if images.shape[1:] != want:
            raise MGJaxError(f"images must be [n, {', '.join(map(str, want))}] (NHWC) for this model, "
                             f"got {images.shape}")
        if images_aux.shape[1:] != (sa, sa, 3) or images_aux.shape[0] != images.shape[0]:
            raise MGJaxError(f"images_aux must be [{images.shape[0]}, {sa}, {sa}, 3], got {images_aux.shape}")
        per_row = ((ids == IMAGE_TOKEN_INDEX) & (mask != 0)).sum(1)
        needed = int(np.maximum(per_row, 1).sum())
        if needed != images.shape[0]:
            raise MGJaxError(f"the prompts need {needed} images (one per <image> marker, and one for each row "
                             f"without a marker, as in the original) but {images.shape[0]} were given")
        return images.astype(np.float32, copy=False), images_aux.astype(np.float32, copy=False)


def load_pretrained(path: str | os.PathLike, *, dtype: str = "float32", vision_tower: str | os.PathLike | None = None,
                    vision_tower_aux: str | os.PathLike | None = None, base_llm: str | os.PathLike | None = None,
                    towers_from_checkpoint: bool = False, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                    template: str | None = None, quantize: str | None = None) -> Pretrained:
    """Loads an MGM checkpoint folder: the released layout (config.json plus safetensors or .bin
    shards), a stage-1 release (`mm_projector.bin`, with `base_llm` = the base LLM checkpoint folder),
    or a folder written by `mgjax convert`, or a `run_dir` of `mgjax train` (its newest readable checkpoint).

    Released layout: each tower's weights come from where the original's loader takes them: CLIP from
    the checkpoint, the ConvNeXt from its tower folder unless config.json's `optimize_vision_tower_aux`
    is true (README, "How checkpoints are loaded"). Tower folders are `vision_tower` / `vision_tower_aux`,
    else the paths config.json names, tried relative to the working directory and to the checkpoint's
    parent folder; a folder the original would read that is not found is an error, unless
    `towers_from_checkpoint=True` takes every tower the checkpoint holds from the checkpoint. Every
    parameter is filled; any checkpoint tensor that maps nowhere (beyond the documented ignore list) is
    an error. `Pretrained.tower_sources` says where each tower came from.

    `template` names the conversation template; None reads it from the checkpoint (see
    `families.detect_template`; an mgjax checkpoint records the one chosen when it was converted).
    With a `mesh`, every parameter goes straight into its shards (laid out by `rules`), and
    `logits` runs sharded over that mesh.

    `quantize` "int8" / "int4": the LLM's matrices (linear layers, experts, embedding) are read as `dtype` a
    few at a time and stored quantised (`mgjax.quant`: int8 per output channel, int4 in groups of 128, scales
    in `dtype`), the model computing in `dtype` on the dequantised weights; norms, Mixtral's router and the
    towers stay `dtype`. `config.lm.quant` then says which.
    """
    path = Path(path).expanduser().resolve()  # a later chdir must not change what the model reads
    if not path.is_dir():
        raise MGJaxError(f"{path}: checkpoint folder not found")
    if dtype not in DTYPES:
        raise MGJaxError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise MGJaxError(f"quantize={quantize!r} is not one of {', '.join(QUANTIZE)} (or None: no quantisation)")
    if template is not None:
        get_template(template)
    dt = jnp.dtype(dtype)
    tokenizer = None
    if is_run_dir(path):
        config, meta = read_meta(path)
        source, tokenizer_path, evidence = None, Path(meta["tokenizer"]), "recorded by mgjax train"
        towers = meta.get("towers", {})
    elif is_mgjax_checkpoint(path):
        config, meta = read_meta(path)
        source, tokenizer_path, evidence = path, path, "recorded by mgjax convert"
        towers = meta.get("towers", {})
    else:
        source = open_source(path, vision_tower, vision_tower_aux, base_llm, towers_from_checkpoint)
        config, tokenizer_path, towers = source.config, source.tokenizer_dir.resolve(), source.tower_sources
        if template is None:
            detected, evidence, tokenizer = checkpoint_template(config.lm.family, tokenizer_path,
                                                                (path, base_llm, path.parent))
            config = dataclasses.replace(config, template=detected)
    if template is not None:
        config, evidence = dataclasses.replace(config, template=template), "template= argument"
    if quantize is not None and config.lm.quant != "none":
        raise MGJaxError(f"{path} already stores its LLM as {config.lm.quant}: load it without quantize=")
    float_module = MGM(config, dtype=dt, param_dtype=dt)
    if quantize is not None:
        config = dataclasses.replace(config, lm=dataclasses.replace(config.lm, quant=quantize))
    module = MGM(config, dtype=dt, param_dtype=dt)
    shardings = None if mesh is None else param_shardings(abstract_params(module, boxed=True), mesh, rules)
    if quantize is not None:
        params = _load_quantized(path, source, float_module, quantize, mesh, rules, shardings)
    elif source is None:
        abstract = abstract_params(module) if shardings is None else jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params(module), shardings)
        params = restore_run_params(path, abstract)[1]
    else:
        params = load_params(source, abstract_params(module), dt, shardings)
    return Pretrained(config, params, module, path, tokenizer_path=tokenizer_path, mesh=mesh, rules=rules,
                      template_evidence=evidence, tower_sources=towers, _tokenizer=tokenizer)


def _load_quantized(path: Path, source, float_module: MGM, mode: str, mesh: Mesh | None, rules: Rules,
                    shardings: dict | None) -> dict:
    """The parameters of `float_module`'s model with its LLM matrices quantised to `mode`, from a released
    `source`, an mgjax checkpoint folder or (source None) a run dir: the float parameters that stay float in
    one read, then the matrices in chunks of `QUANTIZE_CHUNK_BYTES`, each quantised (into `shardings`, the
    quantised tree's) before the next is read, so the whole float LLM is never held."""
    from flax import traverse_util

    dt = jnp.dtype(float_module.param_dtype)
    flat = traverse_util.flatten_dict(abstract_params(float_module))
    float_shardings = None if mesh is None else traverse_util.flatten_dict(
        param_shardings(abstract_params(float_module, boxed=True), mesh, rules))
    q_shardings = None if shardings is None else traverse_util.flatten_dict(shardings)
    chunks, rest = [], [p for p in flat if matrix_layout(p) is None]
    for p in (p for p in flat if matrix_layout(p) is not None):
        size = math.prod(flat[p].shape) * dt.itemsize
        if not chunks or chunks[-1][0] + size > QUANTIZE_CHUNK_BYTES:
            chunks.append([0, []])
        chunks[-1][0] += size
        chunks[-1][1].append(p)

    def subtree(paths, tree):
        return None if tree is None else traverse_util.unflatten_dict({p: tree[p] for p in paths})

    def load(read) -> dict:
        out = traverse_util.flatten_dict(read(subtree(rest, flat), subtree(rest, float_shardings)))
        for _, paths in chunks:
            floats = read(subtree(paths, flat), subtree(paths, float_shardings))
            q_paths = [x for p in paths for x in (p, (*p[:-1], p[-1] + SCALE_SUFFIX))]
            out.update(traverse_util.flatten_dict(quantize_params(floats, mode, subtree(q_paths, q_shardings))))
            del floats
        return traverse_util.unflatten_dict(out)

    if source is None:
        with run_param_reader(path) as (_, read_run):
            return load(lambda shapes, sh: read_run(shapes if sh is None else jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, sh)))
    if isinstance(source, Path):
        return load(lambda shapes, sh: load_params(source, shapes, dt, sh))
    # A released layout: checked whole once (every tensor present, none left over), then read by parameter.
    specs = {s.path: s for s in source.plan(abstract_params(float_module))}

    return load(lambda shapes, sh: source.place([specs[p] for p in traverse_util.flatten_dict(shapes)], dt, sh))
