"""reference.py agrees with transformers' own MoE blocks (tiny random configs, same weights)."""

import numpy as np
import pytest

from families import FAMILIES, block_output
from moefuse.reference import moeffn

pytest.importorskip("transformers")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (3, 17)], ids=["T1", "B2S5", "B3S17"])
def test_reference_matches_transformers(family, shape):
    fam = FAMILIES[family]
    module = fam.build(seed=3)
    attrs, weights, logits_fn = fam.to_moeffn(module)
    x = np.random.default_rng(7).standard_normal(shape + (fam.hidden,), dtype=np.float32)
    want = block_output(module, x)
    routing = {}
    if attrs.routing != "precomputed":
        routing["router_logits"] = logits_fn(x.reshape(-1, fam.hidden)).astype(np.float32)
    got = moeffn(attrs, X=x, **routing, **weights)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_deepseek_v2_groups_rank_by_their_best_probability():
    """The family's reading is discriminating: with a group's two best scores as its score, or
    without groups, the reference leaves transformers on some of 256 tokens."""
    fam = FAMILIES["deepseek_v2"]
    module = fam.build(seed=3)
    attrs, weights, logits_fn = fam.to_moeffn(module)
    x = np.random.default_rng(7).standard_normal((4, 64, fam.hidden), dtype=np.float32)
    want = block_output(module, x)
    logits = logits_fn(x.reshape(-1, fam.hidden)).astype(np.float32)
    for wrong in (attrs.replace(group_score="top2_sum"),
                  attrs.replace(n_group=1, topk_group=1, group_score="top2_sum")):
        got = moeffn(wrong, X=x, router_logits=logits, **weights)
        assert not np.allclose(got, want, rtol=1e-4, atol=1e-5), wrong
    np.testing.assert_allclose(moeffn(attrs, X=x, router_logits=logits, **weights), want,
                               rtol=1e-4, atol=1e-5)
