"""The bundled recall model (titans_mlx/recall_model) recalls a passkey through its memory, and not without it."""

import random
from pathlib import Path

import mlx.core as mx
import numpy as np

from titans_mlx import load, memory_frozen
from titans_mlx.recall_tasks import make_sample

RECALL = Path(__file__).resolve().parents[1] / "titans_mlx" / "recall_model"


def digit_accuracy(model, tokenizer, samples):
    """Teacher-forced: the fraction of answer digits that are the argmax given the prompt and the digits before."""
    right = total = 0
    for sample in samples:
        digits = tokenizer.encode(" " + sample.answer)
        ids = mx.array([list(sample.ids) + digits[:-1]])
        guess = np.array(mx.argmax(model(ids)[0, -len(digits):], axis=-1))
        right += int((guess[1:] == np.array(digits[1:])).sum())  # the leading space is not a digit
        total += len(digits) - 1
    return right / total


def test_recall_model_recalls_a_passkey_through_its_memory():
    model, tokenizer = load(RECALL)
    assert model.args.sliding_window_attn and not model.args.absolute_positions
    # 1,024-byte prompts, the needle at least 200 bytes before the question: beyond the attention's 36 positions
    samples = []
    for i in range(8):
        rng = random.Random(31337 + i)
        samples.append(make_sample("passkey", tokenizer, 1024, rng.uniform(0, 0.7), rng))
    learning = digit_accuracy(model, tokenizer, samples)
    with memory_frozen(model):
        frozen = digit_accuracy(model, tokenizer, samples)
    # measured 0.975 and 0.075 (chance 0.10): the digits come from what the memory wrote
    assert learning > 0.6 and frozen < 0.3, (learning, frozen)
