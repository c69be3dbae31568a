"""Live comparison with titans-pytorch, where it is installed (the `parity` extra): fresh seeds and shapes."""

import pytest

pytest.importorskip("titans_pytorch")

from fixtures.make_memory_fixtures import CASES, make_case  # noqa: E402
from memory_cases import from_arrays, load_memory, rel_err  # noqa: E402


@pytest.mark.parametrize("name", ["default", "heads", "ttt_batch", "train_mac_like", "gated_transition", "attention"])
@pytest.mark.parametrize("seed,batch,length", [(1, 1, 50), (2, 3, 19)])
def test_live(name, seed, batch, length):
    kwargs, _, _, extras = CASES[name]
    case = from_arrays(make_case(kwargs, batch, length, seed=seed, **extras))
    y, state = load_memory(case)(case["x"], prev_weights=case["prev"])[:2]
    assert rel_err(y, case["y"]) <= 1e-5
    for ours, theirs in zip(state.last_update, case["last_update"]):
        assert rel_err(ours, theirs) <= 1e-5
