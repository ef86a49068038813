"""Shared test helpers: fixture paths and a tolerance check that states its bound."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "mgm_reference"
CASES = {"llama_vicuna": "MGM-7B-tiny", "gemma": "MGM-2B-tiny", "llama_vicuna_bf16": "MGM-7B-tiny"}


@functools.cache
def golden_model(name: str = "llama_vicuna"):
    """A golden case's checkpoint as `load_pretrained` gives it (float32), loaded once per test process, so
    that the programs it compiles (logits and generate per bucket) serve every module that runs them."""
    import mgjax

    return mgjax.load_pretrained(GOLDEN / name / CASES[name])


def assert_close(actual, expected, rel: float = 1e-5, what: str = ""):
    """max |actual - expected| <= rel * max(|expected|): the error relative to the output's scale."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.abs(expected).max()), 1e-12)
    err = float(np.abs(actual - expected).max())
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel:g} x scale {scale:.3g}"


def nhwc(x):
    """NCHW (the fixtures, PyTorch) -> NHWC (mgjax); any leading axes are kept."""
    return np.moveaxis(np.asarray(x), -3, -1)
