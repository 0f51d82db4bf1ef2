"""Seeded, offline task generators in the spirit of RULER.

Every generator is a pure function of (seed, target length, difficulty
options): it needs no model and no network. Lengths are counted with a
`count_tokens` callable, so the runner passes the model's tokenizer and the
tests pass a word counter. A generator returns `Sample`s: the context, the
question, and the answers a correct reply must contain, plus metadata that
says where the evidence sits (so tests can check it by re-parsing the text).

Filler is RULER's "noise" haystack (a few plain sentences repeated): it keeps
the evidence unambiguous and lets a 135M model do the full-cache task, which is
what a compression comparison needs.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field

TokenCounter = Callable[[str], int]

NOISE = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

# Plain, single-token-ish English words: keys, word lists, fact values.
WORDS = (
    "apple amber anchor arrow autumn badge bamboo banner basket beacon berry blanket bottle bridge bronze "
    "bubble butter cabin cactus camera candle canyon carpet castle cedar cherry circle cliff clock cloud "
    "cobalt comet copper coral cotton crystal dagger desert diamond dolphin dragon drum eagle ember engine "
    "falcon feather fern fiddle flame forest fossil fountain garden garlic glacier globe granite harbor "
    "helmet honey horizon island ivory jacket jasmine jungle kettle kitten ladder lantern lemon lily "
    "magnet maple marble meadow mirror monkey mountain needle nickel oasis ocean olive onion orchid "
    "otter paddle palace panda parrot pepper piano pillow pirate planet pocket pebble puzzle quartz "
    "rabbit raven ribbon river rocket saddle salmon sandal scarf shadow shell silver spider spoon "
    "squirrel stable statue storm sugar summit swan temple thunder tiger timber tomato tower trumpet "
    "tulip tunnel turtle umbrella valley velvet violin volcano wagon walnut whale willow window winter "
    "wizard wolf yogurt zebra"
).split()

ADJECTIVES = (
    "brave calm clever eager fancy gentle happy jolly kind lively lucky mighty noble proud quiet "
    "rapid shiny silly sleepy smart sunny swift tidy witty zesty bold bright cosy dusty fuzzy"
).split()

FIRST_NAMES = (
    "Alice Bruno Clara Daniel Elena Felix Greta Hugo Irene Jonas Karla Leon Maria Nadia Oscar Paula "
    "Quentin Rosa Stefan Tara Ulrich Vera Walter Xenia Yusuf Zoe"
).split()
LAST_NAMES = (
    "Adler Becker Costa Dubois Engel Fischer Garcia Hoffmann Ivanov Jansen Keller Lindqvist Moreau "
    "Novak Olsen Petrov Quinn Rossi Schmidt Torres Ulrich Varga Weber Young Zimmer"
).split()
CITIES = (
    "Lisbon Oslo Vienna Prague Dublin Madrid Warsaw Athens Helsinki Zurich Lyon Porto Krakow Geneva "
    "Bergen Seville Munich Tallinn Riga Vilnius Naples Turin Bruges Ghent"
).split()
JOBS = (
    "baker pilot nurse farmer teacher painter plumber dentist lawyer chemist tailor carpenter "
    "librarian butcher gardener jeweler florist sculptor"
).split()


@dataclass(frozen=True)
class Sample:
    """One question over one context; `answers` are the strings a correct reply contains."""

    task: str
    index: int
    context: str
    question: str
    answers: tuple[str, ...]
    metadata: dict = field(default_factory=dict, compare=False, hash=False)

    def user_message(self) -> str:
        return f"{self.context}\n\n{self.question}"


def word_count(text: str) -> int:
    """A model-free token counter for tests and dry runs."""
    return len(text.split())


class _LengthMeter:
    """Token counts of filler pieces, cached: pieces repeat, the tokenizer is not free."""

    def __init__(self, count_tokens: TokenCounter):
        self._count = count_tokens
        self._cache: dict[str, int] = {}

    def __call__(self, piece: str) -> int:
        n = self._cache.get(piece)
        if n is None:
            # A leading space: pieces are joined with spaces, and most BPE vocabularies
            # fold the space into the next word's token.
            n = self._cache[piece] = max(1, self._count(" " + piece))
        return n


def _noise(n_tokens: int, meter: _LengthMeter) -> list[str]:
    sentences: list[str] = []
    total = 0
    i = 0
    while total < n_tokens:
        s = NOISE[i % len(NOISE)]
        sentences.append(s)
        total += meter(s)
        i += 1
    return sentences


def _insert_at_depths(filler: list[str], inserts: list[tuple[float, str]]) -> tuple[str, list[float]]:
    """Join filler sentences with `inserts` placed at fractional depths.

    Depth, as in RULER, is the fraction of the haystack (the filler alone) that
    precedes an insert; returns the text and the realised depths."""
    positions = sorted(((round(d * len(filler)), k) for k, (d, _) in enumerate(inserts)))
    haystack = max(1, len(" ".join(filler)))
    pieces: list[str] = []
    realised: dict[int, float] = {}
    cursor = 0
    for at, k in positions:
        pieces.extend(filler[cursor:at])
        cursor = at
        realised[k] = (len(" ".join(filler[:at])) + (1 if at else 0)) / haystack
        pieces.append(inserts[k][1])
    pieces.extend(filler[cursor:])
    return " ".join(pieces), [min(1.0, realised[k]) for k in range(len(inserts))]


def _magic_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _distinct_keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([(a, w) for a in ADJECTIVES for w in WORDS], n)
    return [f"{a}-{w}" for a, w in pairs]


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _depths(rng: random.Random, n: int, depth: float | None) -> list[float]:
    if depth is not None:
        return [depth] * n if n == 1 else [min(1.0, depth + k / (n + 1)) % 1.0 for k in range(n)]
    return [rng.random() for _ in range(n)]


def niah(
    seed: int,
    index: int,
    target_tokens: int,
    count_tokens: TokenCounter = word_count,
    *,
    n_keys: int = 1,
    n_values: int = 1,
    n_queries: int = 1,
    depth: float | None = None,
) -> Sample:
    """Needle in a haystack. n_keys > n_queries adds distractor needles (other keys);
    n_values > 1 gives the queried key several numbers (all must be named);
    n_queries > 1 asks for several keys at once."""
    if not 1 <= n_queries <= n_keys:
        raise ValueError(f"need 1 <= n_queries <= n_keys, got n_queries={n_queries}, n_keys={n_keys}")
    rng = random.Random(f"niah/{seed}/{index}")
    meter = _LengthMeter(count_tokens)
    keys = _distinct_keys(rng, n_keys)
    needles: list[tuple[str, str]] = []
    for k, key in enumerate(keys):
        for _ in range(n_values if k < n_queries else 1):
            needles.append((key, _magic_number(rng)))
    queried = keys[:n_queries]
    question_tokens = 40
    needle_tokens = sum(meter(_needle(k, v)) for k, v in needles)
    filler = _noise(max(0, target_tokens - needle_tokens - question_tokens), meter)
    order = list(range(len(needles)))
    rng.shuffle(order)
    depths = _depths(rng, len(needles), depth)
    inserts = [(depths[j], _needle(*needles[order[j]])) for j in range(len(needles))]
    context, realised = _insert_at_depths(filler, inserts)
    answers = tuple(v for k, v in needles if k in queried)
    if n_queries == 1 and n_values == 1:
        question = f"What is the special magic number for {queried[0]} mentioned in the provided text?"
    elif n_queries == 1:
        question = f"What are all the special magic numbers for {queried[0]} mentioned in the provided text?"
    else:
        question = (
            "What are all the special magic numbers for "
            + ", ".join(queried[:-1])
            + f" and {queried[-1]} mentioned in the provided text?"
        )
    needle_depths = {inserts[j][1]: realised[j] for j in range(len(inserts))}
    return Sample(
        task="niah",
        index=index,
        context=context,
        question=question,
        answers=answers,
        metadata={"keys": keys, "queried": queried, "needle_depths": needle_depths},
    )


def _variable_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in taken:
            taken.add(name)
            return name


def variable_tracking(
    seed: int,
    index: int,
    target_tokens: int,
    count_tokens: TokenCounter = word_count,
    *,
    n_chains: int = 1,
    n_hops: int = 1,
    filler_text: str | None = None,
) -> Sample:
    """Chains `VAR A = 12345. VAR B = VAR A. ...` hidden in noise; the answer is every
    variable of the queried chain. Extra chains are distractors with other values."""
    rng = random.Random(f"vt/{seed}/{index}")
    meter = _LengthMeter(count_tokens)
    taken: set[str] = set()
    values = rng.sample(range(10_000, 99_999), n_chains)
    chains: list[list[str]] = []
    statements: list[str] = []
    for value in values:
        names = [_variable_name(rng, taken) for _ in range(n_hops + 1)]
        chains.append(names)
        statements.append(f"VAR {names[0]} = {value}.")
        statements.extend(f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names)))
    question_tokens = 40
    n_filler = max(0, target_tokens - sum(meter(s) for s in statements) - question_tokens)
    filler = _text_passage(filler_text, n_filler, meter, rng) if filler_text else _noise(n_filler, meter)
    # Each chain keeps its order (an assignment follows what it reads), chains interleave.
    depths = sorted(rng.random() for _ in statements)
    order = _interleave_keeping_chain_order(rng, [len(c) for c in chains])
    inserts = [(depths[j], statements[order[j]]) for j in range(len(statements))]
    context, _ = _insert_at_depths(filler, inserts)
    question = (
        f"Find all variables that are assigned the value {values[0]} in the text above, "
        "directly or through other variables."
    )
    return Sample(
        task="variable_tracking",
        index=index,
        context=context,
        question=question,
        answers=tuple(chains[0]),
        metadata={"value": values[0], "chains": chains},
    )


def _interleave_keeping_chain_order(rng: random.Random, lengths: list[int]) -> list[int]:
    """A random merge of the chains' statement indices that keeps each chain's own order."""
    starts = [sum(lengths[:c]) for c in range(len(lengths))]
    tags = [c for c, n in enumerate(lengths) for _ in range(n)]
    rng.shuffle(tags)
    taken = [0] * len(lengths)
    order = []
    for c in tags:
        order.append(starts[c] + taken[c])
        taken[c] += 1
    return order


def common_words(
    seed: int,
    index: int,
    target_tokens: int,
    count_tokens: TokenCounter = word_count,
    *,
    n_common: int = 3,
    common_freq: int = 12,
    rare_freq: int = 2,
) -> Sample:
    """A numbered word list where n_common words appear common_freq times and every
    other word rare_freq times; the answer is the common words."""
    rng = random.Random(f"cwe/{seed}/{index}")
    meter = _LengthMeter(count_tokens)
    common = rng.sample(WORDS, n_common)
    pool = [w for w in WORDS if w not in common]
    rng.shuffle(pool)
    question_tokens = 40
    entry_tokens = meter("10. apple")
    budget = max(0, target_tokens - question_tokens) // entry_tokens
    if n_common * common_freq + len(pool) * rare_freq < budget:
        # Out of distinct words: repeat every word more often, keeping the common:rare ratio.
        scale = -(-budget * rare_freq // (n_common * common_freq + len(pool) * rare_freq))
        common_freq, rare_freq = common_freq * scale, rare_freq * scale
    n_rare = max(0, min(len(pool), (budget - n_common * common_freq) // rare_freq))
    words = common * common_freq + pool[:n_rare] * rare_freq
    rng.shuffle(words)
    context = "Below is a numbered list of words.\n" + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    question = (
        "What is the most common word in the list above?"
        if n_common == 1
        else f"What are the {n_common} most common words in the list above? Name them."
    )
    return Sample(
        task="common_words",
        index=index,
        context=context,
        question=question,
        answers=tuple(common),
        metadata={"common_freq": common_freq, "rare_freq": rare_freq, "n_words": len(words)},
    )


def frequent_words(
    seed: int,
    index: int,
    target_tokens: int,
    count_tokens: TokenCounter = word_count,
    *,
    n_top: int = 3,
    alpha: float = 2.0,
    vocab_size: int = 200,
) -> Sample:
    """Coded words drawn with Zipf-like frequencies; the answer is the n_top most
    frequent ones (counts are made strictly decreasing at the top, so the answer is unique)."""
    rng = random.Random(f"fwe/{seed}/{index}")
    meter = _LengthMeter(count_tokens)
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < vocab_size:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    question_tokens = 40
    per_word = sum(meter(w) for w in vocab[:20]) / 20
    n_words = max(n_top * 4, int((target_tokens - question_tokens) / per_word))
    weights = [1.0 / (r + 1) ** alpha for r in range(vocab_size)]
    scale = n_words / sum(weights)
    counts = [int(wt * scale) for wt in weights]
    kept = max(n_top + 1, sum(1 for c in counts if c > 0))
    vocab, counts = vocab[:kept], [max(1, c) for c in counts[:kept]]
    for r in range(n_top, 0, -1):  # strictly more than the next rank at the top
        counts[r - 1] = max(counts[r - 1], counts[r] + 1)
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    rng.shuffle(words)
    context = "Read the following coded text and track the frequency of each coded word.\n" + " ".join(words)
    question = f"What are the {n_top} most frequently appearing coded words in the coded text above?"
    return Sample(
        task="frequent_words",
        index=index,
        context=context,
        question=question,
        answers=tuple(vocab[:n_top]),
        metadata={"alpha": alpha, "n_words": len(words)},
    )


def _profile(name: str, city: str, job: str, obj: str) -> str:
    return f"{name} lives in {city} and works as a {job}. {name}'s favourite object is the {obj}."


FACT_QUESTIONS = {
    "city": "In which city does {name} live?",
    "job": "What does {name} work as?",
    "object": "What is {name}'s favourite object?",
}


def qa_facts(
    seed: int,
    index: int,
    target_tokens: int,
    count_tokens: TokenCounter = word_count,
    *,
    n_people: int | None = 2,
    filler_text: str | None = None,
    depth: float | None = None,
) -> Sample:
    """Profiles of generated people (city, job, favourite object); one question about
    one fact of one person, the other profiles being distractors of the same shape.

    n_people profiles (distinct first names) sit at random depths in filler
    (passages of `filler_text`, RULER noise if None); n_people=None instead makes
    the whole context a directory of profiles as long as the target."""
    rng = random.Random(f"qa/{seed}/{index}")
    meter = _LengthMeter(count_tokens)
    question_tokens = 30
    if n_people is None:
        names = [f"{f} {l}" for f in FIRST_NAMES for l in LAST_NAMES]
        rng.shuffle(names)
    else:
        names = [f"{f} {rng.choice(LAST_NAMES)}" for f in rng.sample(FIRST_NAMES, n_people)]
    profiles: list[tuple[str, str, str, str]] = []
    total = 0
    while len(profiles) < len(names) and (n_people is not None or total < target_tokens - question_tokens):
        profile = (names[len(profiles)], rng.choice(CITIES), rng.choice(JOBS), rng.choice(WORDS))
        profiles.append(profile)
        total += meter(_profile(*profile))
    at = rng.randrange(len(profiles))
    attribute = rng.choice(list(FACT_QUESTIONS))
    person = profiles[at]
    answer = {"city": person[1], "job": person[2], "object": person[3]}[attribute]
    if n_people is None:
        context = "\n".join(_profile(*p) for p in profiles)
        realised = at / max(1, len(profiles) - 1)
    else:
        n_filler = max(0, target_tokens - total - question_tokens)
        filler = _text_passage(filler_text, n_filler, meter, rng) if filler_text else _noise(n_filler, meter)
        depths = [rng.random() for _ in profiles]
        if depth is not None:
            depths[at] = depth
        context, realised_all = _insert_at_depths(filler, [(d, _profile(*p)) for d, p in zip(depths, profiles)])
        realised = realised_all[at]
    return Sample(
        task="qa_facts",
        index=index,
        context=context,
        question=FACT_QUESTIONS[attribute].format(name=person[0]),
        answers=(answer,),
        metadata={"person": person[0], "attribute": attribute, "depth": realised},
    )


def _sentences(text: str) -> list[str]:
    return [s.strip() + "." for s in text.replace("\n", " ").split(".") if 3 < len(s.split()) <= 60]


def _text_passage(text: str, n_tokens: int, meter: _LengthMeter, rng: random.Random) -> list[str]:
    """Consecutive sentences of `text` from a seeded start, about n_tokens long (wrapping around)."""
    sentences = _sentences(text)
    cursor = rng.randrange(len(sentences))
    out: list[str] = []
    total = 0
    while total < n_tokens:
        s = sentences[cursor % len(sentences)]
        out.append(s)
        total += meter(s)
        cursor += 1
    return out


@dataclass(frozen=True)
class ChatScenario:
    """A conversation: a fact in the first user turn, long filler turns, then a recall question.

    The assistant's replies are the model's own (generated turn by turn), so a
    method that compresses between turns is tested the way a chat uses it."""

    task: str
    index: int
    turns: tuple[str, ...]
    question: str
    answers: tuple[str, ...]
    metadata: dict = field(default_factory=dict, compare=False, hash=False)

    def play(
        self,
        reply: Callable[[list[dict], int], str],
        system: str,
        *,
        turn_tokens: int = 32,
        question_tokens: int = 32,
        after_turn: Callable[[int], None] | None = None,
    ) -> str:
        """Hold the conversation: each turn, then the question, answered by
        `reply(messages, max_tokens)`; the answers join the history. `after_turn(i)` runs
        after the answer to turn i. Returns the answer to the question."""
        messages = [{"role": "system", "content": system}]
        for i, turn in enumerate(self.turns):
            messages.append({"role": "user", "content": turn})
            messages.append({"role": "assistant", "content": reply(messages, turn_tokens)})
            if after_turn is not None:
                after_turn(i)
        messages.append({"role": "user", "content": self.question})
        return reply(messages, question_tokens)


def chat_recall(
    seed: int,
    index: int,
    target_tokens: int,
    count_tokens: TokenCounter = word_count,
    *,
    filler_text: str | None = None,
    n_turns: int = 6,
    mention_key: bool = False,
) -> ChatScenario:
    """First turn: a magic number to remember; then n_turns user turns of about
    target_tokens / n_turns tokens each (passages of `filler_text`, RULER's noise if None),
    each asking for a plain "OK" -- or, with mention_key, whether the model still remembers
    the number for the key (a conversation that keeps coming back to the fact without
    restating it); last: the recall question.

    The form is the one SmolLM2-135M answers with a full cache (a needle's wording,
    short replies); asking for summaries instead made it answer the recall question
    with another summary (docs/RESULTS.md)."""
    rng = random.Random(f"chat/{seed}/{index}")
    meter = _LengthMeter(count_tokens)
    key = _distinct_keys(rng, 1)[0]
    number = _magic_number(rng)
    facts = f"Please remember this: the special magic number for {key} is: {number}. Reply with OK."
    per_turn = max(16, target_tokens // n_turns)
    turns = [facts]
    if filler_text:
        sentences = _sentences(filler_text)
        cursor = rng.randrange(max(1, len(sentences) - 1))
    for _ in range(n_turns):
        if filler_text:
            passage: list[str] = []
            total = 0
            while total < per_turn:
                passage.append(sentences[cursor % len(sentences)])
                total += meter(passage[-1])
                cursor += 1
        else:
            passage = _noise(per_turn, meter)
        ask = (f"Do you still remember the special magic number for {key}? Reply with yes or no."
               if mention_key else "Reply with OK.")
        turns.append("Read this text:\n" + " ".join(passage) + "\n" + ask)
    return ChatScenario(
        task="chat_recall",
        index=index,
        turns=tuple(turns),
        question=f"What is the special magic number for {key} that I asked you to remember?",
        answers=(number,),
        metadata={"key": key},
    )


# name -> (generator, fixed options). The variants are RULER's NIAH family.
TASKS: dict[str, tuple[Callable[..., Sample], dict]] = {
    "niah_single": (niah, {}),
    "niah_multikey": (niah, {"n_keys": 2}),
    "niah_multivalue": (niah, {"n_values": 2}),
    "niah_multiquery": (niah, {"n_keys": 2, "n_queries": 2}),
    "variable_tracking": (variable_tracking, {}),
    "common_words": (common_words, {}),
    "frequent_words": (frequent_words, {}),
    "qa_facts": (qa_facts, {}),
}


def generate(
    task: str, n_samples: int, target_tokens: int, seed: int = 0, count_tokens: TokenCounter = word_count, **options
) -> list[Sample]:
    """n_samples of a registered task; the same arguments always give the same samples."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    generator, fixed = TASKS[task]
    samples = [
        generator(seed, i, target_tokens, count_tokens, **{**fixed, **options}) for i in range(n_samples)
    ]
    return [Sample(task, s.index, s.context, s.question, s.answers, s.metadata) for s in samples]
