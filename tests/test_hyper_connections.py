"""Parity of titans_mlx.hyper_connections with hyper-connections as used by titans-pytorch's MAC.

Expected values: tests/fixtures/hyper_*.npz, made by tests/fixtures/make_hyper_fixtures.py with the real packages.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from titans_mlx.hyper_connections import HyperConnection, StreamEmbed, expand_streams, reduce_streams

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CASES = ["s4_add", "s4_gate", "s2_add", "s2_gate"]
RTOL = 1e-5


def load(name: str) -> dict:
    with np.load(FIXTURES / f"hyper_{name}.npz") as z:
        return {k: z[k] for k in z.files}


FIX = {name: load(name) for name in ("mhc", "legacy", "legacy_mixed")}


def assert_close(got: mx.array, want: np.ndarray) -> None:
    got = np.array(got)
    assert got.shape == want.shape
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= RTOL, f"relative error {err:.2e}"


def build(fix: dict, case: str, prefix: str, legacy: bool, dtype: mx.Dtype = mx.float32, **kwargs) -> HyperConnection:
    """HyperConnection loaded strictly from the checkpoint keys under `prefix`, names unchanged."""
    start = f"{case}/params/{prefix}"
    weights = {k[len(start):]: mx.array(v).astype(dtype) for k, v in fix.items() if k.startswith(start)}
    s, dim = weights["static_alpha"].shape[0], weights["norm.gamma"].shape[0]
    hc = HyperConnection(dim, s, legacy=legacy, add_branch_out_to_residual="static_beta" in weights, **kwargs)
    hc.load_weights(list(HyperConnection.sanitize(weights).items()), strict=True)
    return hc


def check_hc(fix: dict, case: str, prefix: str, branch: str, legacy: bool, **kwargs) -> None:
    hc = build(fix, case, prefix, legacy, **kwargs)
    p = f"{case}/{branch}"
    branch_in, finish = hc(mx.array(fix[f"{p}/streams"]))
    assert branch_in.dtype == mx.float32
    assert_close(branch_in, fix[f"{p}/branch_in"])
    branch_out = mx.array(fix[f"{p}/branch_out"])
    if f"{p}/out" in fix:
        assert hc.add_branch_out_to_residual
        assert_close(finish(branch_out), fix[f"{p}/out"])
    else:  # gate mode: no beta parameters, finish hands the branch output back as the package does
        assert not hc.add_branch_out_to_residual
        assert finish(branch_out) is branch_out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("branch,prefix", [("mem", "layers.0.0."), ("attn", "layers.0.1.")])
@pytest.mark.parametrize("variant", ["mhc", "legacy"])
def test_parity(variant: str, case: str, branch: str, prefix: str) -> None:
    check_hc(FIX[variant], case, prefix, branch, legacy=variant == "legacy")


@pytest.mark.parametrize("case", ["s4_add", "s2_add"])
def test_legacy_mixed_residuals(case: str) -> None:
    # hyper-connections >= 0.3.10 plain HC: same keys, residual streams mixed
    check_hc(FIX["legacy_mixed"], case, "layers.0.1.", "attn", legacy=True, legacy_mix_residuals=True)


def test_legacy_unmixed_differs_from_mixed() -> None:
    # guards that the fixtures really tell the two legacy behaviours apart
    fix = FIX["legacy_mixed"]
    hc = build(fix, "s4_add", "layers.0.1.", legacy=True)
    _, finish = hc(mx.array(fix["s4_add/attn/streams"]))
    out = np.array(finish(mx.array(fix["s4_add/attn/branch_out"])))
    assert np.max(np.abs(out - fix["s4_add/attn/out"])) > 1e-2


@pytest.mark.parametrize("variant", ["mhc", "legacy"])
@pytest.mark.parametrize("case", CASES)
def test_expand_reduce(variant: str, case: str) -> None:
    fix = FIX[variant]
    embed = fix[f"{case}/params/expand_streams.stream_embed"]
    module = StreamEmbed(*embed.shape)
    module.load_weights([("stream_embed", mx.array(embed))], strict=True)
    expanded = module(mx.array(fix[f"{case}/x"]))
    assert_close(expanded, fix[f"{case}/expanded"])
    assert_close(expand_streams(mx.array(fix[f"{case}/x"]), mx.array(embed)), fix[f"{case}/expanded"])
    assert_close(reduce_streams(mx.array(fix[f"{case}/expanded"])), fix[f"{case}/reduced"])


@pytest.mark.parametrize("case", CASES)
def test_parameter_names_match_checkpoint(case: str) -> None:
    for variant in ("mhc", "legacy"):
        keys = [str(k) for k in FIX[variant][f"{case}/sd_keys"]]
        for prefix in ("layers.0.0.", "layers.0.1.", "layers.0.2."):
            want = sorted(k[len(prefix):] for k in keys if k.startswith(prefix))
            s = int(case[1])
            gate = prefix == "layers.0.0." and case.endswith("gate")
            hc = HyperConnection(16, s, legacy=variant == "legacy", add_branch_out_to_residual=not gate)
            got = sorted(k for k, _ in tree_flatten(hc.parameters()))
            assert got == want, (variant, prefix)


@pytest.mark.parametrize("case", CASES)
def test_is_legacy_state_dict(case: str) -> None:
    assert HyperConnection.is_legacy_state_dict(str(k) for k in FIX["legacy"][f"{case}/sd_keys"])
    assert not HyperConnection.is_legacy_state_dict(str(k) for k in FIX["mhc"][f"{case}/sd_keys"])


def test_is_legacy_state_dict_edge_cases() -> None:
    assert not HyperConnection.is_legacy_state_dict(["token_emb.weight", "norm.weight"])  # num_residual_streams=1
    with pytest.raises(ValueError):
        HyperConnection.is_legacy_state_dict(["layers.0.1.dynamic_alpha_scale", "layers.0.1.pre_branch_scale"])


def test_fresh_init_reads_one_stream() -> None:
    alpha = np.array(HyperConnection(16, 4).static_alpha)
    assert alpha[:, 0].sum() == 1 and set(alpha[:, 0]) == {0, 1}
    np.testing.assert_array_equal(alpha[:, 1:], np.eye(4))


def test_one_stream_rejected() -> None:
    with pytest.raises(ValueError):
        HyperConnection(16, 1)


def assert_bf16_matches(got: mx.array, want: np.ndarray) -> None:
    # bit-exact on CPU; tolerate isolated one-ulp flips from another backend's accumulation order. Rounding at a
    # different point than torch (e.g. the sqrt(d) scale in bf16) flips a third of the elements and fails this.
    assert got.dtype == mx.bfloat16
    diff = np.abs(np.array(got.astype(mx.float32)) - want)
    assert np.mean(diff > 0) <= 0.01, f"{np.mean(diff > 0):.1%} of elements differ"
    assert np.max(diff) <= 2**-7 * np.max(np.abs(want))


@pytest.mark.parametrize("branch,prefix", [("mem", "layers.0.0."), ("attn", "layers.0.1.")])
@pytest.mark.parametrize("variant", ["mhc", "legacy"])
def test_bfloat16_rounds_like_torch(variant: str, branch: str, prefix: str) -> None:
    fix, case = FIX[variant], "s4_add_bf16"
    hc = build(fix, case, prefix, legacy=variant == "legacy", dtype=mx.bfloat16)
    p = f"{case}/{branch}"
    branch_in, finish = hc(mx.array(fix[f"{p}/streams"]).astype(mx.bfloat16))
    assert_bf16_matches(branch_in, fix[f"{p}/branch_in"])
    assert_bf16_matches(finish(mx.array(fix[f"{p}/branch_out"]).astype(mx.bfloat16)), fix[f"{p}/out"])
    embed = mx.array(fix[f"{case}/params/expand_streams.stream_embed"]).astype(mx.bfloat16)
    expanded = expand_streams(mx.array(fix[f"{case}/x"]).astype(mx.bfloat16), embed)
    assert_bf16_matches(expanded, fix[f"{case}/expanded"])
    assert_bf16_matches(reduce_streams(expanded), fix[f"{case}/reduced"])
