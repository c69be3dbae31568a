"""NeuralMemory equals titans-pytorch 0.5.5's parallel forward (fixtures from tests/fixtures/make_memory_fixtures.py)."""

import pytest

from memory_cases import CASE_NAMES, load_case, load_memory, rel_err

TOL = 1e-5


@pytest.mark.parametrize("name", CASE_NAMES)
def test_matches_titans_pytorch(name):
    case = load_case(name)
    mem = load_memory(case)
    surprises = "surprise_loss" in case
    out = mem(case["x"], prev_weights=case["prev"], return_surprises=surprises)
    y, state = out[0], out[1]
    assert y.shape == case["y"].shape
    assert rel_err(y, case["y"]) <= TOL
    for ours, theirs in zip(state.last_update, case["last_update"]):
        assert rel_err(ours, theirs) <= TOL
    if surprises:
        loss, lr = out[2]
        assert rel_err(loss, case["surprise_loss"]) <= TOL
        assert rel_err(lr, case["surprise_lr"]) <= TOL
