"""python -m titans_mlx.evaluate and titans_mlx.recall_tasks: prompts, scoring, the reach rule, the frozen-memory
ablation, bad input, the outputs.

Expected values come from the construction, never from the harness's own output: the template sentences are
written out here as the papers word them; where a fact must sit is computed here from the token counts of the
pieces; babilong's answers come from a small interpreter of the story's sentences found in the decoded prompt;
attention's reach is checked against the model itself (with the memory frozen, a token outside the reach cannot move
the last logits at all); the frozen memory's weights against the memory's own initial state.
"""

import io
import json
import random
import re
import struct

import mlx.core as mx
import pytest

from titans_mlx import evaluate as ev
from titans_mlx.cache import memory_states
from titans_mlx.evaluate import attention_sees, evaluate, greedy_answer, main, make_samples, score
from titans_mlx.io import save_model
from titans_mlx.mac import Model, ModelArgs
from titans_mlx.memory import memory_frozen
from titans_mlx.recall_tasks import NOISE, TaskError, make_sample, sentences_of
from titans_mlx.session import GenerationState
from titans_mlx.tokenizer import ByteTokenizer, SentencePieceTokenizer

# windows of 32 + 2 positions, two layers: attention reaches 68 positions back, enough to see a fact just before a
# short question
CONFIG = dict(
    num_tokens=512, dim=32, depth=2, segment_len=32, num_persist_mem_tokens=2, num_longterm_mem_tokens=2,
    neural_memory_layers=[1, 2], neural_memory_segment_len=8, dim_head=16, heads=2, num_residual_streams=1,
    sliding_window_attn=True, neural_memory_kwargs={"dim_head": 16, "heads": 2, "init_adaptive_step_bias": -1.0},
)
SMALL = dict(CONFIG, segment_len=8)  # windows of 10 positions: short reaches for the rule's test
TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
        "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God "
        "said, Let there be light: and there was light. ")

# the papers' wording (Mohtashami & Jaggi 2023; RULER, Hsieh et al. 2024)
PASSKEY_PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                    "I will quiz you about the important information there.")
PASSKEY_QUESTION = "What is the pass key? The pass key is"
HAYSTACK = sentences_of(TEXT * 3)


def _model(config, seed=0):
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model():
    return _model(CONFIG)


def _spm(path, text, byte_fallback):
    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text.split(". ")), model_writer=buf,
                                             vocab_size=400 if byte_fallback else 60, hard_vocab_limit=False,
                                             byte_fallback=byte_fallback, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return SentencePieceTokenizer(path)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    training = TEXT * 4 + NOISE + " " + PASSKEY_PREAMBLE + " Mary went to the kitchen. VAR ABCDE = 12345."
    return {"bytes": ByteTokenizer(), "sentencepiece": _spm(root / "bf.model", training * 3, True),
            "no digits": _spm(root / "plain.model", TEXT * 6, False)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model(path, model, dict(CONFIG, model_type="titans_mac"), ByteTokenizer())
    return path


def _find(ids, sub):
    hits = [i for i in range(len(ids) - len(sub) + 1) if ids[i:i + len(sub)] == sub]
    assert len(hits) == 1, f"expected the piece once, found it {len(hits)} times"
    return hits[0]


# ---- the prompts -----------------------------------------------------------------------------------------------------


def _fact_texts(task, sample, text):
    """The sentences the answer needs, rebuilt from the template and what the prompt's question asks."""
    if task == "passkey":
        k = sample.answer
        return [f"The pass key is {k}. Remember it. {k} is the pass key."]
    if task == "niah":
        key = re.search(r"magic numbers for (\S+) mentioned", text).group(1)
        return [f"One of the special magic numbers for {key} is: {sample.answer}."]
    if task == "vt":
        names = sample.answer.split()
        value = re.search(r"assigned the value (\d+) in", text).group(1)
        return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    return None


def _haystack_piece_max(tokenizer, sentences):
    return max(len(tokenizer.encode(" " + s)) for s in sentences)


@pytest.mark.parametrize("tok_name", ["bytes", "sentencepiece"])
@pytest.mark.parametrize("task", ["passkey", "niah", "vt"])
@pytest.mark.parametrize("length,depth", [(700, 0.0), (700, 0.3), (900, 0.5), (900, 0.8), (700, 1.0)])
def test_needles_sit_at_the_depth_in_exact_length(task, tok_name, length, depth, tokenizers):
    tok = tokenizers[tok_name]
    sample = make_sample(task, tok, length, depth, random.Random(7))
    ids = sample.ids
    assert len(ids) == length
    text = tok.decode(ids)
    facts = _fact_texts(task, sample, text)
    fact_ids = [tok.encode(" " + f) for f in facts]
    starts = [_find(ids, f) for f in fact_ids]
    assert starts == sorted(starts)  # the chain in order
    assert [tuple(s) for s in sample.needles] == [(a, a + len(f)) for a, f in zip(starts, fact_ids)]
    # the haystack tokens before the first fact, against depth x the haystack's tokens
    preamble = {"passkey": PASSKEY_PREAMBLE,
                "niah": "Some special magic numbers are hidden within the following text. Make sure to memorize "
                        "it. I will quiz you about the numbers afterwards.",
                "vt": "Memorize and track the chain(s) of variable assignment hidden in the following text."}[task]
    head = len(tok.encode(preamble))
    assert ids[:head] == tok.encode(preamble)
    tail = length - sample.question_start
    haystack_tokens = length - head - tail - sum(map(len, fact_ids))
    before = starts[0] - head
    tolerance = _haystack_piece_max(tok, sentences_of(NOISE)) / 2 + 1
    assert abs(before - depth * haystack_tokens) <= tolerance
    # the prompt ends in the question, the answer prefix last
    if task == "passkey":
        assert text.endswith(PASSKEY_QUESTION)
        if tok_name == "bytes":  # on a line of its own
            assert text[text.rindex("\n") + 1:] == PASSKEY_QUESTION
    if task == "niah":
        assert text.endswith("mentioned in the provided text are")
    if task == "vt":
        assert text.endswith(f"5 variables are assigned the value {facts[0].split()[-1][:-1]}, they are:")
    if tok_name == "bytes":  # byte ids are the text's bytes: nothing but the pieces, joined by spaces
        assert tok.encode(text) == ids


# bAbI's sentence forms, read back from the prompt's text to answer the question independently
MOVE = re.compile(r"(Mary|John|Daniel|Sandra) (?:went to|journeyed to|travelled to|moved to|went back to) the (\w+)\.")
GRAB = re.compile(r"(Mary|John|Daniel|Sandra) (?:picked up|grabbed|got|took) the (\w+)\.")


def _answer_story(text):
    where, holder, history, events = {}, {}, {}, []
    for m in re.finditer(f"{MOVE.pattern}|{GRAB.pattern}", text):
        events.append((m.start(), m.group(0)))
    for _, sentence in sorted(events):
        if (m := MOVE.fullmatch(sentence)):
            person, place = m.groups()
            where[person] = place
            for obj, h in holder.items():
                if h == person:
                    history[obj].append(place)
        else:
            person, obj = GRAB.fullmatch(sentence).groups()
            holder[obj] = person
            history.setdefault(obj, []).append(where.get(person))
    question = text[text.rindex("Question:"):]
    if (m := re.match(r"Question: Where is (\w+)\?", question)) and m.group(1)[0].isupper():
        return where[m.group(1)], 1, len(events)
    if (m := re.match(r"Question: Where is the (\w+)\?", question)):
        return history[m.group(1)][-1], 2, len(events)
    m = re.match(r"Question: Where was the (\w+) before the (\w+)\?", question)
    h = history[m.group(1)]
    return h[len(h) - 1 - h[::-1].index(m.group(2)) - 1], 3, len(events)


@pytest.mark.parametrize("tok_name", ["bytes", "sentencepiece"])
@pytest.mark.parametrize("qa", [1, 2, 3])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_babilong_stories_answer_and_depth(qa, depth, tok_name, tokenizers):
    tok = tokenizers[tok_name]
    for seed in range(4):
        sample = make_sample("babilong", tok, 800, depth, random.Random(seed), HAYSTACK, qa=qa)
        assert len(sample.ids) == 800
        text = tok.decode(sample.ids)
        answer, kind, n_facts = _answer_story(text)
        assert (kind, n_facts) == (qa, 5)
        assert sample.answer == answer
        assert len(sample.needles) == qa  # one, two or three supporting facts
        # the first supporting fact: a story sentence, at the depth of the haystack
        first = tok.decode(sample.ids[slice(*sample.needles[0])]).strip()
        assert MOVE.fullmatch(first) or GRAB.fullmatch(first)
        spans = sorted(sample.facts)
        fact_tokens = sum(b - a for a, b in spans)
        head = len(tok.encode("Some facts about people, places and objects are hidden in the following text. Read "
                              "them and answer the question about them."))
        haystack_tokens = sample.question_start - head - fact_tokens
        before = sample.needles[0][0] - head - sum(b - a for a, b in spans if b <= sample.needles[0][0])
        assert abs(before - depth * haystack_tokens) <= _haystack_piece_max(tok, HAYSTACK) / 2 + 1


def test_samples_are_seeded_and_pure(tokenizers):
    tok = tokenizers["bytes"]
    a = make_samples(tok, ["passkey", "babilong"], [600], [0.0, 0.5], 2, seed=3, haystack=HAYSTACK)
    b = make_samples(tok, ["passkey", "babilong"], [600], [0.0, 0.5], 2, seed=3, haystack=HAYSTACK)
    c = make_samples(tok, ["passkey", "babilong"], [600], [0.0, 0.5], 2, seed=4, haystack=HAYSTACK)
    assert [s.ids for _, s in a] == [s.ids for _, s in b]
    assert [s.ids for _, s in a] != [s.ids for _, s in c]
    # a sample rebuilds alone from its recorded seed
    seed, sample = a[5]
    again = make_sample("babilong", tok, 600, 0.0, random.Random(seed), HAYSTACK, qa=2)
    assert again.ids == sample.ids


def test_too_short_and_unwritable_are_refused(tokenizers):
    tok = tokenizers["bytes"]
    key = "12345"
    needed = len(PASSKEY_PREAMBLE) + len(f" The pass key is {key}. Remember it. {key} is the pass key.") + \
        len("\n" + PASSKEY_QUESTION)
    assert len(make_sample("passkey", tok, needed, 0.5, random.Random(0)).ids) == needed  # no haystack at all
    with pytest.raises(TaskError, match=f"at least {needed} tokens"):
        make_sample("passkey", tok, needed - 1, 0.5, random.Random(0))
    with pytest.raises(TaskError, match="cannot write"):
        make_sample("passkey", tokenizers["no digits"], 900, 0.5, random.Random(0))
    with pytest.raises(TaskError, match="unknown task"):
        make_sample("needle", tok, 900, 0.5, random.Random(0))
    with pytest.raises(TaskError, match="depth"):
        make_sample("passkey", tok, 900, 1.5, random.Random(0))


# ---- scoring ---------------------------------------------------------------------------------------------------------


def test_score_counts_right_and_wrong():
    assert score("number", "12345", " 12345. Remember") == {"answer": "12345", "correct": True,
                                                             "digit_accuracy": 1.0, "recall": None}
    s = score("number", "12345", " the key 12395 and 12345")  # the first number counts
    assert (s["correct"], s["digit_accuracy"]) == (False, 0.8)
    assert score("number", "12345", " 1234")["digit_accuracy"] == 0.8  # a missing digit is wrong
    assert score("number", "12345", " 123456")["correct"] is False
    assert score("number", "12345", " nothing")["digit_accuracy"] == 0.0
    assert score("word", "kitchen", " Kitchen. Then")["correct"] is True
    assert score("word", "kitchen", " the kitchen")["correct"] is False
    names = "ABCDE FGHIJ KLMNO PQRST UVWXY"
    assert score("names", names, " UVWXY, ABCDE, KLMNO, FGHIJ, PQRST")["correct"] is True
    s = score("names", names, " ABCDE FGHIJ KLMNO PQRST ZZZZZ UVWXY")
    assert (s["correct"], s["recall"]) == (False, 1.0)
    assert score("names", names, " ABCDE FGHIJ")["recall"] == 0.4


def test_evaluate_tallies_a_known_answerer(model, tokenizers):
    tok = tokenizers["bytes"]
    plan = []  # what the fake answerer said and why, from the prompt's text alone

    def answer(ids, max_tokens, frozen):
        key = re.search(r"The pass key is (\d{5})\.", tok.decode(ids)).group(1)
        i = len(plan)
        out = [" " + key + ".", " " + key[:3] + str((int(key[3]) + 1) % 10) + key[4], " none"][i % 3]
        plan.append((frozen, key, out))
        return out

    results = evaluate(model, tok, ["passkey"], [500], [0.0, 1.0], 3, seed=1, ablation="frozen-memory",
                       answer_fn=answer)
    recs = results["samples"]
    assert len(recs) == len(plan) == 12
    assert [r["ablation"] for r in recs] == [None, "frozen-memory"] * 6
    assert [f for f, _, _ in plan] == [False, True] * 6
    want_correct = [i % 3 == 0 for i in range(12)]
    want_digits = [[1.0, 0.8, 0.0][i % 3] for i in range(12)]
    assert [r["correct"] for r in recs] == want_correct
    assert [r["digit_accuracy"] for r in recs] == pytest.approx(want_digits)
    assert [r["expected"] for r in recs] == [k for _, k, _ in plan]
    summary = results["summary"]["passkey"]
    for c, picks in (("learning", range(0, 12, 2)), ("frozen-memory", range(1, 12, 2))):
        assert summary[c]["correct"] == sum(want_correct[i] for i in picks)
        assert summary[c]["digit_accuracy"] == pytest.approx(sum(want_digits[i] for i in picks) / 6)
        grid = summary[c]["grid"]
        for depth, first in ((0.0, 0), (1.0, 6)):  # samples run depth by depth, three each
            idx = [i for i in picks if first <= i < first + 6]
            assert grid[f"500/{depth}"] == [sum(want_correct[i] for i in idx), 3]
    # depth 1: the pass key ends right before the 38-token question, within the 68 positions attention reaches;
    # depth 0: 300-odd tokens back, memory only
    assert [r["reach"] for r in recs] == ["memory"] * 6 + ["attention"] * 6
    assert [r["distance"] for r in recs[6:]] == [0] * 6
    assert summary["chance"] == pytest.approx(1 / 90000)


# ---- what attention can see ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sliding", [True, False])
def test_attention_reach_rule_matches_the_model(sliding):
    """With the memory frozen nothing but attention carries a token forward: a token the rule says is out of reach
    cannot change the last token's logits at all, one it says is in reach does."""
    model = _model(dict(SMALL, sliding_window_attn=sliding), seed=3)
    n = 61
    ids = [random.Random(0).randrange(256) for _ in range(n)]
    with memory_frozen(model):
        base = model(mx.array([ids]))[0, -1]
        seen = []
        for t in range(n - 1):
            changed = list(ids)
            changed[t] = (ids[t] + 101) % 256
            moved = float(mx.max(mx.abs(model(mx.array([changed]))[0, -1] - base)))
            seen.append(moved > 0)
    rule = [attention_sees(model, n - 1, t) for t in range(n - 1)]
    assert seen == rule
    assert any(rule) and not all(rule)  # the test spans the boundary


# ---- the frozen-memory ablation --------------------------------------------------------------------------------------


def _weights(model, state):
    return [(layer, s.last_update) for layer, s in zip(model.layers, memory_states(state.cache)) if layer.has_memory]


def test_frozen_memory_stops_writes_and_restores_them(model, tokenizers):
    tok = tokenizers["bytes"]
    ids = make_sample("passkey", tok, 400, 0.2, random.Random(0)).ids
    frozen, learning, again = (GenerationState.new(model) for _ in range(3))
    greedy_answer(model, tok, ids, 4, frozen=True, state=frozen)
    assert not any(layer.mem.frozen for layer in model.layers if layer.has_memory)  # switched back on
    greedy_answer(model, tok, ids, 4, state=learning)
    greedy_answer(model, tok, ids, 4, state=again)
    for (layer, w_frozen), (_, w_learning), (_, w_again) in zip(_weights(model, frozen), _weights(model, learning),
                                                                _weights(model, again)):
        initial = layer.mem.initial_state(1).last_update
        assert all(mx.array_equal(a, b) for a, b in zip(w_frozen, initial))  # nothing written
        assert not all(mx.array_equal(a, b) for a, b in zip(w_learning, initial))  # learning writes
        assert all(mx.array_equal(a, b) for a, b in zip(w_again, w_learning))  # and still does after the block
    assert memory_states(frozen.cache)[0].seq_index == memory_states(learning.cache)[0].seq_index


def test_evaluate_ablation_reads_frozen(model, tokenizers, monkeypatch):
    tok = tokenizers["bytes"]
    seen = []

    def spy(model_, tokenizer, ids, max_tokens, frozen=False, state=None, prefill_step_size=2048):
        state = GenerationState.new(model_)
        out = greedy_answer(model_, tokenizer, ids, max_tokens, frozen, state, prefill_step_size)
        initial = [layer.mem.initial_state(1).last_update for layer in model_.layers if layer.has_memory]
        unchanged = all(mx.array_equal(a, b) for (_, w), init in zip(_weights(model_, state), initial)
                        for a, b in zip(w, init))
        seen.append((frozen, unchanged))
        return out

    monkeypatch.setattr(ev, "greedy_answer", spy)
    evaluate(model, tok, ["passkey"], [300], [0.5], 2, ablation="frozen-memory")
    assert seen == [(False, False), (True, True)] * 2


# ---- the command line ------------------------------------------------------------------------------------------------


def run(*argv):
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        return e.code


def test_cli_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--model", model_dir, "--tasks", "passkey,niah,vt,babilong", "--lengths", "480,560", "--depths",
               "0,1", "--samples", "1", "--seed", "5", "--ablation", "frozen-memory", "--out", out) == 0
    printed = capsys.readouterr().out
    for task in ("passkey", "niah", "vt", "babilong"):
        assert f"{task}: exact matches" in printed
        png = (out / f"heatmap_{task}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] > 200
    results = json.loads((out / "results.json").read_text())
    recs = results["samples"]
    assert len(recs) == 4 * 2 * 2 * 1 * 2
    keys = {"task", "seed", "length", "depth", "needle_tokens", "distance", "reach", "expected", "output", "correct",
            "digit_accuracy", "ablation", "chance"}
    assert all(keys <= set(r) for r in recs)
    assert results["config"]["seed"] == 5 and results["config"]["ablation"] == "frozen-memory"
    # each record's prompt rebuilds from its seed, with its expected answer
    tok = ByteTokenizer()
    for r in recs[::2]:
        kw = {"qa": int(r["variant"][2])} if r["task"] == "babilong" else {}
        hay = ev.demo_haystack() if r["task"] == "babilong" else None
        s = make_sample(r["task"], tok, r["length"], r["depth"], random.Random(r["seed"]), hay, **kw)
        assert s.answer == r["expected"] and [list(x) for x in s.needles] == r["needle_tokens"]
    md = (out / "results.md").read_text()
    assert all(f"## {t}" in md for t in ("passkey", "niah", "vt", "babilong"))
    assert "only the memory can carry them" in md
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def _bad_cases(tmp_path, model_dir):
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc\0def")
    empty = tmp_path / "blank.txt"
    empty.write_text("  \n\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    spm_dir = tmp_path / "spm_model"
    tok = _spm(tmp_path / "plain.model", TEXT * 6, False)
    save_model(spm_dir, _model(CONFIG), dict(CONFIG, model_type="titans_mac"), tok)
    m = ["--model", model_dir]
    return {
        "unknown task": (m + ["--tasks", "passkey,needle"], "unknown task 'needle'"),
        "no task": (m + ["--tasks", ","], "name at least one"),
        "bad length": (m + ["--lengths", "1024,abc"], "'abc' is not valid"),
        "zero length": (m + ["--lengths", "0"], "'0' is not valid"),
        "depth outside": (m + ["--depths", "0,1.5"], "'1.5' is not valid"),
        "samples below one": (m + ["--samples", "0"], "--samples must be >= 1"),
        "unknown ablation": (m + ["--ablation", "frozen"], "expected frozen-memory"),
        "missing model": (["--model", tmp_path / "nope"], "does not exist"),
        "missing haystack": (m + ["--haystack", tmp_path / "nope.txt"], "haystack file"),
        "binary haystack": (m + ["--haystack", binary], "is binary"),
        "empty haystack": (m + ["--haystack", empty], "has no text"),
        "too short": (m + ["--tasks", "passkey", "--lengths", "100"], "too short for passkey"),
        "tokenizer without digits": (["--model", spm_dir, "--tasks", "niah", "--lengths", "2000"], "cannot write"),
        "out is a file": (m + ["--out", afile], "is not a directory"),
    }


def test_bad_input_is_one_line_and_writes_nothing(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = _bad_cases(tmp_path, model_dir)
    before = sorted(p.name for p in tmp_path.iterdir())
    for name, (argv, message) in cases.items():
        capsys.readouterr()
        assert run(*argv, "--lengths" if "--lengths" not in argv else "--seed", "480" if "--lengths" not in
                   argv else "0") == 1, name
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, captured.err)
        assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no eval-* directory, nothing else


def test_argparse_errors_exit_2_in_one_line(capsys):
    assert run("--samples", "many") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "--samples" in err[0]
