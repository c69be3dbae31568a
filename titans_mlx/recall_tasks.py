"""Recall prompts of exact token lengths, with facts planted at chosen depths: the sample generators of
``titans_mlx.evaluate`` (and of training mixtures that want the same tasks).

    from titans_mlx.recall_tasks import make_sample
    sample = make_sample("passkey", tokenizer, 2048, 0.5, random.Random(0))
    sample.ids            # exactly 2048 token ids of the model's tokenizer, ending in the answer prefix
    sample.answer         # "48213"; sample.needles: the token spans [start, end) of the facts the answer needs

A sample is a pure function of (task, tokenizer, length, depth, rng, haystack): same arguments and the same rng
state, same prompt. No model is involved and nothing is read from disk.

How a prompt is built. The preamble, each planted fact (the needle, the chain links, the story's sentences), each
haystack sentence and the question are encoded separately and their ids concatenated: haystack pieces and facts
carry their own leading space, so each tokenizes the same wherever it lands (for byte-level and sentencepiece
tokenizers that is also how the whole text would tokenize), and the token count is exact: the haystack is filled
to the tokens left after the fixed parts, its last sentence cut at a token. The first fact the answer needs starts
at the haystack sentence boundary nearest ``depth`` of the haystack (0: right after the preamble, 1: right before
the question); later facts of the same answer follow at random boundaries after it, in story order.

Template wording (kept in TEMPLATES below, with where each comes from):
- passkey: Mohtashami & Jaggi, "Landmark Attention" (2023), their passkey-retrieval prompt;
- niah: RULER (Hsieh et al. 2024), niah_single_1: the "repeat" noise haystack, a word key, a 7-digit value;
- vt: RULER's variable tracking, one chain of four hops (RULER's default) in the same noise;
- babilong: our own short instruction around bAbI-style (Weston et al. 2015) qa1-qa3 stories, in the manner of
  BABILong (Kuratov et al. 2024), which spreads such stories through book text.
Where ours differs: the parts are joined by single spaces, the question starting on a new line (Mohtashami & Jaggi
and RULER put newlines around the haystack, the needle or each noise block), so that every piece tokenizes the same
in any position; RULER's vt statements get a full stop, as they sit inside prose here instead of on lines of their
own, and RULER's in-context example for vt is left out (our models are base models, nothing is instruction-tuned);
RULER's answer prefixes begin with a space, ours do not (the question piece starts with its newline).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

TASKS = ("passkey", "niah", "vt", "babilong")

# ---- the wording, in one place ---------------------------------------------------------------------------------------

# RULER's "repeat" noise is the same five sentences as Mohtashami & Jaggi's filler
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

TEMPLATES = {
    # Mohtashami & Jaggi (arXiv 2305.16300), passkey retrieval
    "passkey": {
        "preamble": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                    "I will quiz you about the important information there.",
        "needle": "The pass key is {value}. Remember it. {value} is the pass key.",
        "question": "What is the pass key? The pass key is",
    },
    # RULER (arXiv 2404.06654), synthetic niah template with type_needle_v = "numbers" (RULER words every niah variant
    # in the plural, single needles too)
    "niah": {
        "preamble": "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                    "I will quiz you about the numbers afterwards.",
        "needle": "One of the special magic numbers for {key} is: {value}.",
        "question": "What are all the special magic numbers for {key} mentioned in the provided text? "
                    "The special magic numbers for {key} mentioned in the provided text are",
    },
    # RULER, variable_tracking (its first release spelled "assgined"; the later one, and we, "assigned")
    "vt": {
        "preamble": "Memorize and track the chain(s) of variable assignment hidden in the following text.",
        "first": "VAR {var} = {value}.",
        "hop": "VAR {var} = VAR {previous}.",
        "question": "Question: Find all variables that are assigned the value {value} in the text above. "
                    "Answer: According to the chain(s) of variable assignment in the text above, {count} variables "
                    "are assigned the value {value}, they are:",
    },
    # ours: bAbI's sentence forms and questions, an answer prefix that a base model completes with the place
    "babilong": {
        "preamble": "Some facts about people, places and objects are hidden in the following text. Read them and "
                    "answer the question about them.",
        "qa1": "Question: Where is {person}? Answer: {person} is in the",
        "qa2": "Question: Where is the {object}? Answer: The {object} is in the",
        "qa3": "Question: Where was the {object} before the {place}? Answer: Before the {place}, the {object} was "
               "in the",
    },
}

VT_HOPS = 4  # RULER's default: one chain of 5 variables
VT_NAME_LEN = 5
# keys for niah: RULER draws "adjective-noun" pairs from the wonderwords lists; a short fixed list of our own
ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lively", "misty", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "vivid", "wild")
NOUNS = ("anchor", "badger", "candle", "desk", "engine", "falcon", "garden", "harbor", "island", "jacket", "kettle",
         "lantern", "meadow", "needle", "orchard", "pepper", "quilt", "river", "saddle", "tower", "valley", "wagon")
# the babilong simulator's world (bAbI's names, places and objects)
PEOPLE = ("Mary", "John", "Daniel", "Sandra")
PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
MOVES = ("went to", "journeyed to", "travelled to", "moved to", "went back to")
GRABS = ("picked up", "grabbed", "got", "took")


class TaskError(ValueError):
    """A task that cannot be built as asked (a length too short, a tokenizer that cannot write it): one line."""


@dataclass
class Sample:
    """One prompt and what a right answer is.

    ids: the prompt, exactly ``length`` tokens, ending in the answer prefix; answer: the expected answer as text
    (vt: the variable names, space-separated); kind: "number" (scored on its digits), "word" or "names";
    needles: token spans [start, end) of the facts the answer needs, in story order (the first sits at the depth);
    facts: spans of every planted sentence, distractors included; context_start/question_start: where the haystack
    and the question begin; needle_depth: the depth the first needed fact really got (its haystack tokens before
    it over the haystack's tokens); chance: a uniform guess's exact-match rate; digit_chance: its per-digit rate
    (numbers only); max_new_tokens: enough generated tokens for the answer and a few words before it.
    """

    task: str
    variant: str
    length: int
    depth: float
    ids: List[int]
    answer: str
    kind: str
    needles: List[Tuple[int, int]]
    facts: List[Tuple[int, int]]
    context_start: int
    question_start: int
    needle_depth: float
    chance: float
    digit_chance: Optional[float]
    max_new_tokens: int
    texts: List[str] = field(default_factory=list)  # every planted fact's sentence, in story order

    @property
    def answers(self) -> List[str]:
        return self.answer.split() if self.kind == "names" else [self.answer]


# ---- haystacks -------------------------------------------------------------------------------------------------------


def sentences_of(text: str) -> List[str]:
    """A haystack text as sentences (the boundaries a needle may sit at): each line's text split after . ! ? ; or :
    followed by a space, whitespace runs made single spaces."""
    out = []
    for line in text.splitlines():
        line = " ".join(line.split())
        out += [s for s in re.split(r"(?<=[.!?;:])\s+", line) if s]
    return out


NOISE_SENTENCES = tuple(sentences_of(NOISE))


# ---- building a prompt -----------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _assemble(task, variant, tokenizer, length, depth, rng, preamble, question, facts, needed, first, haystack,
              answer, kind, chance, digit_chance):
    """The prompt: preamble, haystack with `facts` planted (fact `first` at `depth`), question. `needed`: indices
    of the facts the answer needs."""
    if not 0 <= depth <= 1:
        raise TaskError(f"depth must be in [0, 1], got {depth}")
    head = _encode(tokenizer, preamble)
    if getattr(tokenizer, "add_bos_token", False) and getattr(tokenizer, "bos_token_id", None) is not None:
        head = [tokenizer.bos_token_id] + head  # as the model's tokenizer would start a document
    tail = _encode(tokenizer, "\n" + question)
    fact_ids = [_encode(tokenizer, " " + f) for f in facts]
    fixed = len(head) + len(tail) + sum(map(len, fact_ids))
    budget = length - fixed  # haystack tokens
    if budget < 0:
        raise TaskError(f"length {length} is too short for {task}: its prompt needs at least {fixed} tokens "
                        "(the instructions, the planted facts and the question)")
    # the haystack: sentences from a random start, cycled, until `budget` tokens; the last one cut at a token
    start = rng.randrange(len(haystack))
    pieces, total, i = [], 0, start
    while total < budget:
        ids = _encode(tokenizer, " " + haystack[i % len(haystack)])
        if not ids:
            raise TaskError("the haystack encodes to no tokens")
        pieces.append(ids[: budget - total])
        total += len(pieces[-1])
        i += 1
    bounds = [0]
    for p in pieces:
        bounds.append(bounds[-1] + len(p))
    # the first needed fact at the boundary nearest depth * budget; earlier facts anywhere before it, later ones
    # anywhere after it (random boundaries, story order kept)
    at = min(range(len(bounds)), key=lambda k: (abs(bounds[k] - depth * budget), k))
    slot = [0] * len(facts)
    slot[first] = at
    before = sorted(rng.randint(0, at) for _ in range(first))
    after = sorted(rng.randint(at, len(bounds) - 1) for _ in range(len(facts) - first - 1))
    slot[:first], slot[first + 1:] = before, after

    ids, spans, k = list(head), [None] * len(facts), 0
    context_start = len(ids)
    for b in range(len(bounds)):
        while k < len(facts) and slot[k] == b:
            spans[k] = (len(ids), len(ids) + len(fact_ids[k]))
            ids += fact_ids[k]
            k += 1
        if b < len(pieces):
            ids += pieces[b]
    question_start = len(ids)
    ids += tail
    assert len(ids) == length, (len(ids), length)
    answer_tokens = len(_encode(tokenizer, " " + answer))
    return Sample(
        task=task, variant=variant, length=length, depth=float(depth), ids=ids, answer=answer, kind=kind,
        needles=[spans[j] for j in needed], facts=spans, context_start=context_start, question_start=question_start,
        needle_depth=bounds[at] / budget if budget else float(depth), chance=chance, digit_chance=digit_chance,
        max_new_tokens=answer_tokens + 8, texts=list(facts),
    )


def _digit_chance(lo: int, hi: int) -> float:
    # a uniform guess in [lo, hi] (same digit count): the leading digit is right 1 in 9, the others 1 in 10
    n = len(str(lo))
    return (1 / 9 + (n - 1) / 10) / n


def _passkey(tokenizer, length, depth, rng, haystack):
    t = TEMPLATES["passkey"]
    value = str(rng.randint(10_000, 99_999))
    # passkey's filler is always Mohtashami & Jaggi's; a --haystack is for the tasks that take one
    return _assemble("passkey", "passkey", tokenizer, length, depth, rng, t["preamble"], t["question"],
                     [t["needle"].format(value=value)], [0], 0, NOISE_SENTENCES, value, "number", 1 / 90_000,
                     _digit_chance(10_000, 99_999))


def _niah(tokenizer, length, depth, rng, haystack):
    t = TEMPLATES["niah"]
    key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    value = str(rng.randint(1_000_000, 9_999_999))
    return _assemble("niah", "niah_single_1" if haystack is None else "niah_single_haystack", tokenizer, length,
                     depth, rng, t["preamble"], t["question"].format(key=key),
                     [t["needle"].format(key=key, value=value)], [0], 0, haystack or NOISE_SENTENCES, value,
                     "number", 1 / 9_000_000, _digit_chance(1_000_000, 9_999_999))


def _vt(tokenizer, length, depth, rng, haystack):
    t = TEMPLATES["vt"]
    names: List[str] = []
    while len(names) < VT_HOPS + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(VT_NAME_LEN))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    chain = [t["first"].format(var=names[0], value=value)]
    chain += [t["hop"].format(var=names[j + 1], previous=names[j]) for j in range(VT_HOPS)]
    question = t["question"].format(value=value, count=len(names))
    # every link is needed; a guess of five random names is never right (26^-25)
    return _assemble("vt", "vt", tokenizer, length, depth, rng, t["preamble"], question, chain,
                     list(range(len(chain))), 0, NOISE_SENTENCES, " ".join(names), "names", 0.0, None)


# ---- babilong: a seeded simulator of people moving and carrying things -----------------------------------------------


def _move(rng, person, place):
    return f"{person} {rng.choice(MOVES)} the {place}."


def _grab(rng, person, obj):
    return f"{person} {rng.choice(GRABS)} the {obj}."


def _interleave(rng, fixed: list, extra: list) -> list:
    """`fixed` in its order with `extra` (order irrelevant) inserted at random places."""
    out = list(fixed)
    for x in extra:
        out.insert(rng.randint(0, len(out)), x)
    return out


def story(qa: int, rng: random.Random):
    """A bAbI-style story: (facts in order, indices of the supporting facts, the question's fields, the answer).

    Every story has five facts, the supporting ones and distractors: moves of other people (which never touch the
    answer), and in qa1 an earlier move of the person asked about (only the latest counts). qa1 "where is X": one
    supporting fact; qa2 "where is the object": who took it and where they went (either order); qa3 "where was the
    object before the place": where its carrier was, that it was taken, where it went next. The carrier of the
    object never moves after the last supporting fact, so the answer is determined.
    """
    person, *others = rng.sample(PEOPLE, len(PEOPLE))
    other_move = lambda: ("d", _move(rng, rng.choice(others), rng.choice(PLACES)))
    if qa == 1:
        place, earlier = rng.sample(PLACES, 2)
        before = _interleave(rng, [("d", _move(rng, person, earlier))], [other_move()])
        facts = before + [("s", _move(rng, person, place))] + [other_move(), other_move()]
        fields, answer = {"person": person}, place
    elif qa == 2:
        obj, place = rng.choice(OBJECTS), rng.choice(PLACES)
        support = [("s", _grab(rng, person, obj)), ("s", _move(rng, person, place))]
        if rng.random() < 0.5:
            support.reverse()  # went to the place, then picked it up there
        facts = [other_move()] + [support[0]] + _interleave(rng, [support[1]], [other_move(), other_move()])
        fields, answer = {"object": obj}, place
    elif qa == 3:
        obj = rng.choice(OBJECTS)
        place, now = rng.sample(PLACES, 2)
        support = [("s", _move(rng, person, place)), ("s", _grab(rng, person, obj)), ("s", _move(rng, person, now))]
        facts = [other_move()] + [support[0]] + _interleave(rng, support[1:], [other_move()])
        fields, answer = {"object": obj, "place": now}, place
    else:
        raise TaskError(f"babilong qa must be 1, 2 or 3, got {qa!r}")
    needed = [i for i, (kind, _) in enumerate(facts) if kind == "s"]
    return [text for _, text in facts], needed, fields, answer


def _babilong(tokenizer, length, depth, rng, haystack, qa=None):
    t = TEMPLATES["babilong"]
    qa = qa if qa is not None else rng.randint(1, 3)
    facts, needed, fields, answer = story(qa, rng)
    question = t[f"qa{qa}"].format(**fields)
    # qa3's answer is never the place in the question
    chance = 1 / (len(PLACES) - 1) if qa == 3 else 1 / len(PLACES)
    if haystack is None:
        raise TaskError("babilong needs a haystack text (the demo corpus or --haystack)")
    return _assemble("babilong", f"qa{qa}", tokenizer, length, depth, rng, t["preamble"], question, facts, needed,
                     needed[0], haystack, answer, "word", chance, None)


_MAKERS = {"passkey": _passkey, "niah": _niah, "vt": _vt, "babilong": _babilong}


def make_sample(task: str, tokenizer, length: int, depth: float, rng: random.Random,
                haystack: Optional[Sequence[str]] = None, qa: Optional[int] = None) -> Sample:
    """One prompt of `task` in exactly `length` tokens of `tokenizer`, its first needed fact at `depth` (0..1).

    haystack: the sentences to hide the facts in (``sentences_of(text)``): babilong needs one, niah uses it
    instead of the noise; passkey and vt always use their noise. qa: babilong's story type (1-3), else drawn.
    Raises TaskError for an unknown task, a depth outside [0, 1], a length too short for the template, or a
    tokenizer that cannot write the answer or the facts (see check_tokenizer).
    """
    if task not in _MAKERS:
        raise TaskError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")
    if haystack is not None and not haystack:
        raise TaskError("the haystack has no text")
    haystack = tuple(haystack) if haystack is not None else None
    if task == "babilong":
        sample = _babilong(tokenizer, length, depth, rng, haystack, qa)
    else:
        sample = _MAKERS[task](tokenizer, length, depth, rng, haystack)
    check_tokenizer(sample, tokenizer)
    return sample


def check_tokenizer(sample: Sample, tokenizer) -> None:
    """TaskError unless the tokenizer writes the sample's answer and facts back exactly (a sentencepiece model
    without digits, say, reads a pass key back as ' ⁇ ': no model on it could answer)."""
    for text in [*sample.answers, *sample.texts]:
        back = tokenizer.decode(_encode(tokenizer, text))
        if back != text:
            raise TaskError(f"the model's tokenizer cannot write {text!r} (it reads back as {back!r}), which "
                            f"{sample.task} needs")
