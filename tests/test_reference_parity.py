"""Our model math and reference generation vs HF transformers, on every fixture case.

The fixtures (tiny random models of all six families, several configs each, in several checkpoint
formats) and their expected logits / greedy tokens are produced by tests/fixtures/hf_fixtures.py
running transformers; see scripts/fixtures.sh.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HF_FIXTURES, fixture_cases

from checkpoints import load_model
from crosspool_jax.models.reference import ReferenceGenerator

CASES = fixture_cases()
pytestmark = pytest.mark.skipif(not CASES, reason="run `bash scripts/fixtures.sh` to build the HF fixtures")


@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_logits_and_greedy_tokens_match_transformers(case: str) -> None:
    model = load_model(HF_FIXTURES / case, dtype="float32")
    expected = np.load(HF_FIXTURES / case / "expected.npz")
    gen = ReferenceGenerator(model.config, model.weights)
    for p, n in enumerate(expected["prompt_lens"]):
        prompt = [int(t) for t in expected["prompt_ids"][p, :n]]
        logits = gen.prompt_logits(prompt)
        ref = expected["logits"][p, :n]
        assert np.isfinite(logits).all()
        rel = np.linalg.norm(logits - ref) / np.linalg.norm(ref)
        assert rel < 1e-4, f"{case} prompt {p}: relative logit error {rel:.2e}"
        # per-position too, so one bad position cannot hide in the norm of the others
        per_pos = np.linalg.norm(logits - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert per_pos.max() < 1e-4, f"{case} prompt {p}: worst position error {per_pos.max():.2e}"
        result = gen.generate(prompt, max_new_tokens=32)
        assert list(result.token_ids) == [int(t) for t in expected["greedy"][p]], f"{case} prompt {p}"
        assert result.finish_reason == "length"
