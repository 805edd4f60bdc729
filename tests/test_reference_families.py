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
