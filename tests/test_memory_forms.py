"""The forms of the memory's recurrences and the function choosing between them (memory_step.choose_form, in the
shape of mlx-lm's gated_delta.py): the loop form (the reference) agrees with the per-token oracle of
tests/test_variants_oracle.py (written from the paper, none of titans_mlx's code) over hundreds of steps, every
other form the dispatcher can pick agrees with the reference over hundreds of chunks, and a kernel registered for a
backend is what runs there, outside training only."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from test_variants_oracle import rel_err, run_memory

from titans_mlx import memory as memory_module
from titans_mlx import memory_step as ms
from titans_mlx.memory import NeuralMemory

STEPS = 320  # tokens: with chunk 1 every token is a step of the recurrences, as in a gated delta rule


def _memory(chunk, heads, momentum, batch_size, dim=16):
    mx.random.seed(3)
    dh = dim // heads
    return NeuralMemory(dim, chunk_size=chunk, batch_size=batch_size, heads=heads, dim_head=dh, momentum=momentum,
                        model={"class": "MemoryMLP", "dim": dh, "depth": 1}, mem_model_norm_add_residual=False)


@pytest.fixture(autouse=True)
def _fresh_compiles():
    memory_module._COMPILED.clear()  # the forms are chosen when a store is traced
    yield
    memory_module._COMPILED.clear()


@pytest.mark.parametrize("chunk,heads,momentum", [(1, 1, True), (1, 2, False), (2, 2, True)])
def test_the_reference_matches_the_per_token_oracle_over_hundreds_of_steps(chunk, heads, momentum, monkeypatch):
    # the oracle takes each chunk's gradients at the weights it starts from: a TTT mini-batch of one chunk
    monkeypatch.setattr(ms, "DUAL_FORM", False)
    mem = _memory(chunk, heads, momentum, batch_size=chunk)
    x = mx.random.normal((1, STEPS, 16))
    got, _ = mem(x)
    cfg = dict(heads=heads, dim_head=16 // heads, chunk=chunk, momentum=momentum)
    assert rel_err(got[0], run_memory(dict(tree_flatten(mem.parameters())), "", x[0], cfg)) <= 1e-5


def _counting(monkeypatch, name):
    calls, form = [], getattr(ms, name)

    def counted(*args):
        calls.append(args[2].decay.shape[1])  # chunks of the store it was traced into
        return form(*args)

    monkeypatch.setattr(ms, name, counted)
    return calls


@pytest.mark.parametrize("chunk,momentum", [(1, True), (2, False), (4, True)])
def test_the_dual_form_matches_the_reference_over_hundreds_of_chunks(chunk, momentum, monkeypatch):
    # one TTT mini-batch of the whole sequence: blocks of many chunks, where the dual form applies
    mem = _memory(chunk, 2, momentum, batch_size=None)
    x = mx.random.normal((1, STEPS * chunk, 16))
    monkeypatch.setattr(ms, "DUAL_FORM", False)
    want, want_state = mem(x)
    monkeypatch.setattr(ms, "DUAL_FORM", True)  # part of the compiled store's key: the next call retraces
    calls = _counting(monkeypatch, "dual_store")
    got, state = mem(x)
    assert calls and max(calls) > 1
    assert rel_err(got, want) <= 1e-5
    assert rel_err(state.last_update[0], want_state.last_update[0]) <= 1e-5


def test_a_registered_kernel_runs_on_its_backend_outside_training(monkeypatch):
    monkeypatch.setattr(ms, "KERNELS", {})
    calls, reference = [], ms.loop_store

    def kernel(*args):  # a stand-in: the reference, counting the stores it is traced into
        calls.append(args[2].decay.shape[1])
        return reference(*args)

    mem = _memory(2, 2, True, batch_size=2)
    x = mx.random.normal((1, 40, 16))
    mem.eval()
    want, _ = mem(x)
    device = mx.default_device().type.name
    ms.register_kernel("gpu" if device == "cpu" else "cpu", lambda *a: True, kernel)  # another backend's
    mem(x)
    assert not calls
    ms.register_kernel(device, lambda s, K, want_updates, want_stats: not want_updates, kernel)
    got, _ = mem(x)
    assert calls and rel_err(got, want) <= 1e-6
    n = len(calls)
    mem(x, return_updates=True)  # the kernel declines: the reference runs
    mem.train()
    mem(x)  # training: the kernel is not used
    assert len(calls) == n
