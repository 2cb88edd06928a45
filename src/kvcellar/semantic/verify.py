"""The verification gate: cheap checks that veto an ANN candidate that is close but wrong.

Embedding similarity alone cannot tell "enable 2FA" from "disable 2FA" (cosine ~0.89 under
MiniLM, higher than many true paraphrases), nor "flights to Paris" from "flights to Lyon", and an
attacker can push an unrelated query arbitrarily close to a victim's. So after the threshold, each
check compares the incoming text with the candidate's stored text and may veto with a reason.
Checks are plain callables; a cross-encoder or the served LLM as judge plugs in the same way.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import lru_cache
from typing import Protocol

import numpy as np

from kvcellar.errors import ConfigError
from kvcellar.semantic.lru import LRU

_WORD = re.compile(r"[a-z0-9][a-z0-9'+#]*(?:[.\-][a-z0-9+#]+)*", re.I)
_RAW_TOKEN = re.compile(r"\S+")
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")

NEGATIONS = frozenset(
    "not no never none nothing nobody nowhere neither nor without cannot cant can't won't wont "
    "don't dont doesn't doesnt isn't isnt aren't arent wasn't weren't shouldn't wouldn't couldn't "
    "didn't hasn't haven't hadn't mustn't needn't shan't avoid avoiding prevent except excluding "
    "lack lacking".split()
)


def _is_negation(word: str) -> bool:
    return word in NEGATIONS or word.endswith("n't") or word.startswith("non-")
# Words whose swap flips the answer. Matching is on a light stem, so "enabling" pairs "disabled".
_ANTONYM_PAIRS = [
    ("enable", "disable"), ("activate", "deactivate"), ("on", "off"), ("allow", "block"),
    ("allow", "deny"), ("add", "remove"), ("add", "delete"), ("include", "exclude"),
    ("increase", "decrease"), ("raise", "lower"), ("more", "less"), ("more", "fewer"),
    ("max", "min"), ("maximum", "minimum"), ("before", "after"), ("start", "stop"),
    ("open", "close"), ("install", "uninstall"), ("upload", "download"), ("import", "export"),
    ("encrypt", "decrypt"), ("buy", "sell"), ("accept", "reject"), ("safe", "unsafe"),
    ("safe", "dangerous"), ("legal", "illegal"), ("possible", "impossible"), ("with", "without"),
    ("true", "false"), ("lock", "unlock"), ("subscribe", "unsubscribe"),
    ("connect", "disconnect"), ("show", "hide"), ("upgrade", "downgrade"),
    ("ascend", "descend"), ("ascending", "descending"), ("first", "last"), ("best", "worst"),
    ("hot", "cold"), ("fast", "slow"), ("early", "late"), ("earliest", "latest"),
    ("inside", "outside"), ("above", "below"), ("north", "south"), ("east", "west"),
    ("win", "lose"), ("like", "dislike"), ("agree", "disagree"), ("join", "leave"),
    ("login", "logout"), ("in", "out"), ("mute", "unmute"), ("follow", "unfollow"),
    ("block", "unblock"), ("pause", "resume"), ("compress", "decompress"), ("zip", "unzip"),
    ("encode", "decode"), ("serialize", "deserialize"), ("push", "pull"), ("send", "receive"),
    ("left", "right"), ("high", "low"), ("higher", "lower"), ("larger", "smaller"),
    ("bigger", "smaller"), ("longer", "shorter"), ("old", "new"), ("oldest", "newest"),
    ("older", "newer"), ("cheap", "expensive"), ("positive", "negative"),
    ("odd", "even"), ("add", "subtract"), ("multiply", "divide"), ("plus", "minus"),
    ("arrival", "departure"), ("arrive", "depart"), ("lend", "borrow"),
    ("input", "output"), ("read", "write"), ("public", "private"), ("sync", "async"),
    ("synchronous", "asynchronous"), ("valid", "invalid"), ("visible", "invisible"),
    ("approve", "deny"), ("hire", "fire"), ("gain", "lose"), ("profit", "loss"),
    ("deposit", "withdraw"), ("credit", "debit"), ("internal", "external"),
    ("big", "small"), ("large", "small"), ("long", "short"), ("heavy", "light"),
    ("up", "down"), ("thick", "thin"), ("thicken", "thin"), ("tighten", "loosen"),
    ("wet", "dry"), ("heat", "cool"), ("warm", "cool"), ("freeze", "thaw"), ("fill", "empty"),
    ("inflate", "deflate"), ("lengthen", "shorten"), ("widen", "narrow"),
    ("strengthen", "weaken"), ("benefit", "risk"), ("advantage", "disadvantage"),
    ("pro", "con"), ("setup", "disable"), ("setup", "remove"), ("setup", "uninstall"),
    ("client", "server"), ("front", "back"), ("good", "bad"), ("better", "worse"),
    ("uppercase", "lowercase"), ("upper", "lower"),
]
# Numbers, units and calendar words must agree exactly: a changed one changes the answer.
_NUMBER_WORDS = {
    w: str(i) for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
} | {"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
     "eighty": "80", "ninety": "90", "hundred": "100", "thousand": "1000", "million": "1000000",
     "billion": "1000000000", "dozen": "12", "half": "0.5", "twice": "2", "double": "2",
     "triple": "3", "once": "1", "single": "1", "a": "1", "an": "1"}
# "1" is implied by "a", "per", "each", "every" and singular nouns: too weak to tell apart
_IGNORED_NUMBERS = {"1"}
_UNITS = {
    "second": "s", "sec": "s", "minute": "min", "min": "min", "hour": "h", "hr": "h", "day": "d",
    "week": "wk", "month": "mo", "year": "y", "decade": "dec", "century": "cent",
    "km": "km", "kilometer": "km", "kilometre": "km", "mile": "mi", "mi": "mi", "meter": "m",
    "metre": "m", "cm": "cm", "centimeter": "cm", "mm": "mm", "inch": "in", "foot": "ft",
    "feet": "ft", "ft": "ft", "yard": "yd", "kg": "kg", "kilogram": "kg", "gram": "g", "g": "g",
    "pound": "lb", "lb": "lb", "lbs": "lb", "ounce": "oz", "oz": "oz", "liter": "l", "litre": "l",
    "ml": "ml", "gallon": "gal", "cup": "cup", "celsius": "C", "fahrenheit": "F", "kelvin": "K",
    "gb": "GB", "mb": "MB", "tb": "TB", "kb": "KB", "percent": "%", "%": "%", "dollar": "$",
    "$": "$", "usd": "$", "euro": "EUR", "€": "EUR", "eur": "EUR", "£": "GBP", "gbp": "GBP",
    "yen": "JPY", "calorie": "kcal", "kcal": "kcal", "mph": "mph", "kmh": "kmh", "watt": "W",
    "volt": "V", "byte": "B", "bit": "bit", "millisecond": "ms", "ms": "ms",
    "microsecond": "us", "nanosecond": "ns", "teaspoon": "tsp", "tsp": "tsp",
    "tablespoon": "tbsp", "tbsp": "tbsp", "pint": "pt", "quart": "qt", "acre": "acre",
    "hectare": "ha", "degree": "deg", "m": "m", "l": "l", "milliliter": "ml",
    "millilitre": "ml", "millimeter": "mm", "millimetre": "mm", "daily": "d", "weekly": "wk", "monthly": "mo",
    "yearly": "y", "annual": "y", "annually": "y", "hourly": "h",
}
_UNIT_SETS = {"mph": ("mi", "h"), "kmh": ("km", "h"), "kph": ("km", "h")}
_CALENDAR = set(
    "january february march april june july august september october november december "
    "monday tuesday wednesday thursday friday saturday sunday today tonight tomorrow yesterday "
    "weekend weekday morning afternoon evening tonight noon midnight spring summer autumn "
    "winter christmas easter next previous coming ago".split()
)
_CALENDAR_SYNONYMS = {"12pm": "noon", "12am": "midnight", "jan": "january",
                      "feb": "february", "apr": "april", "jun": "june",
                      "jul": "july", "aug": "august", "sep": "september", "sept": "september",
                      "oct": "october", "nov": "november", "dec": "december", "tue": "tuesday",
                      "tues": "tuesday", "thu": "thursday", "thurs": "thursday", "fri": "friday"}


_MERIDIEM = re.compile(r"\d\s*([ap])\.?m\b", re.I)


_NOON = re.compile(r"\b12(?::00)?\s*(?:([ap])\.?m\.?|noon|midnight)(?![a-z])", re.I)


def _clock_text(text: str) -> str:
    """"12pm" is noon and "12 am" midnight: said either way, neither is a number to compare."""
    return _NOON.sub(lambda m: " midnight" if (m.group(1) or "").lower() == "a"
                     or "midnight" in m.group(0).lower() else " noon", text)


@lru_cache(maxsize=16384)
def _calendar(text: str) -> frozenset[str]:
    text = _clock_text(text)
    found = {f"{m.lower()}m" for m in _MERIDIEM.findall(text)}
    for w in words(text):
        w = _CALENDAR_SYNONYMS.get(w, w)
        if w in _CALENDAR:
            found.add(w)
    return frozenset(found)
STOPWORDS = frozenset(
    "a an the and or but if then so of to in on at by for from with about into over under up "
    "down out as is are was were be been being am do does did doing have has had having i me my "
    "mine we us our you your yours he him his she her it its they them their this that these "
    "those there here what which who whom whose when where why how can could would should will "
    "shall may might must need please tell give know want like just also any some all each "
    "every other such than too very get got make let s t one ones way ways thing things it's "
    "i'm i'd i'll you're what's how's there's let's hi hello hey thanks thank help explain "
    "best good really actually possible able whats hows thats theres".split()
)


@lru_cache(maxsize=16384)
def _stem(word: str) -> str:
    """Crude suffix stripping: enough to pair inflections of the words in the tables above."""
    w = word.lower()
    for suffix in ("ing", "ed", "es", "s", "d"):
        if len(w) > len(suffix) + 2 and w.endswith(suffix):
            w = w[: -len(suffix)]
            break
    return w.rstrip("e") if len(w) > 3 else w


_ANTONYMS: dict[str, set[str]] = {}
for _a, _b in _ANTONYM_PAIRS:
    _ANTONYMS.setdefault(_stem(_a), set()).add(_stem(_b))
    _ANTONYMS.setdefault(_stem(_b), set()).add(_stem(_a))


@lru_cache(maxsize=16384)
def words(text: str) -> tuple[str, ...]:
    return tuple(w.lower().strip("'") for w in _WORD.findall(text.replace("\u2019", "'")))


class Check(Protocol):
    """Returns None when the candidate may stand in for the query, else a short reason."""

    name: str

    def __call__(self, query: str, candidate: str) -> str | None: ...


@lru_cache(maxsize=16384)
def content_stems(text: str) -> frozenset[str]:
    return frozenset({_stem(w.removeprefix("non-")) for w in words(text)
            if w not in STOPWORDS and w not in NEGATIONS and not w.endswith("n't")})


def overlap(a: str, b: str) -> float:
    """Jaccard overlap of content stems: how much two texts say in the same words."""
    sa, sb = content_stems(a), content_stems(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


# set phrases that negate nothing ("No problem, items can be returned...")
_IDIOMS = re.compile(r"\b(?:no (?:problem|worries|doubt)|not at all|no matter|never mind|"
                     r"nothing like)\b", re.I)
_SET_UP = re.compile(r"\bset(?:s|ting)?\s+up\b", re.I)
_SWITCH = re.compile(r"\b(?:turn|switch|shut)(?:s|ed|ing)?\s+((?:[\w-]+\s+){0,3}?)(on|off)\b", re.I)
# "stop X from sending", "keep X from": the action is prevented, as with a negation
_PREVENT = re.compile(r"\b(?:stop|keep)(?:s|ped|ping|ing)?\s+(?:[\w'-]+\s+){0,3}?from\b", re.I)
# a reply that opens with its verdict: "Yes, as long as ..." / "No, once ..." ("No problem" has
# no comma and is no verdict)
_VERDICT = re.compile(r"^\W*(yes|yeah|yep|yup|no|nope)\s*[,.!;:\u2014-]", re.I)


def _verdict(text: str) -> str | None:
    m = _VERDICT.match(text)
    return None if m is None else ("no" if m.group(1).lower() in ("no", "nope") else "yes")


@lru_cache(maxsize=16384)
def _negation_count(text: str) -> int:
    """Negating words and "stop X from" phrases; set phrases like "no problem" negate nothing."""
    return (sum(_is_negation(w) for w in words(_IDIOMS.sub(" ", text)))
            + len(_PREVENT.findall(text)))


@lru_cache(maxsize=16384)
def _polar_stems(text: str) -> frozenset[str]:
    """Stems with "turn on" read as "enable" and "switch off" as "disable", so "disable 2FA"
    meets its opposite however the candidate phrased it."""
    text = _SWITCH.sub(lambda m: ("enable " if m.group(2).lower() == "on" else "disable ")
                       + m.group(1), text)
    text = _SET_UP.sub("setup", text)
    return frozenset(_stem(w) for w in words(text))


class NegationCheck:
    """A negation flip between near-identical texts, or a swapped antonym.

    Negation parity is only compared when the texts share most content words: a reworded
    paraphrase often moves a negation ("can't remember" vs "forgot"), a trap rarely rewords.
    """

    name = "negation"

    def __init__(self, min_overlap: float = 0.5) -> None:
        self.min_overlap = min_overlap

    def __call__(self, query: str, candidate: str) -> str | None:
        qv, cv = _verdict(query), _verdict(candidate)
        if qv and cv and qv != cv:
            return f"answer differs: {qv!r} vs {cv!r}"
        qn, cn = _negation_count(query), _negation_count(candidate)
        if qn % 2 != cn % 2 and overlap(query, candidate) >= self.min_overlap:
            return "negation differs"
        qs, cs = _polar_stems(query), _polar_stems(candidate)
        for w in qs - cs:
            flipped = _ANTONYMS.get(w, set()) & (cs - qs)
            if flipped:
                return f"antonym: {w!r} vs {sorted(flipped)[0]!r}"
        return None


@lru_cache(maxsize=16384)
def _numbers(text: str) -> tuple[tuple[str, int], ...]:
    values: Counter = Counter()
    text = _clock_text(text)
    for raw in _NUMBER.findall(text):
        # thousands separators: "3,000" is 3000, "3,5" stays as written
        value = raw.replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+", raw) else raw
        values[value] += 1
    for w in words(text):
        for part in w.split("-"):  # "two-factor", "one-hour"
            if part in _NUMBER_WORDS:
                values[_NUMBER_WORDS[part]] += 1
    for ignored in _IGNORED_NUMBERS:
        values.pop(ignored, None)
    return tuple(sorted(values.items()))


_QUANTIFIERS = {"a", "an", "per", "each", "every", "one"}
_DEGREES = [(re.compile(r"(?:°|\bdeg(?:rees?)?\b)\s*(c|celsius|centigrade|f|fahrenheit)\b", re.I),
             lambda m: " " + ("fahrenheit" if m.group(1).lower().startswith("f") else "celsius")),
            (re.compile(r"°"), lambda m: " degrees"),
            (re.compile(r"\bmiles? (?:per|an|a) hour\b", re.I), lambda m: "mph"),
            (re.compile(r"\b(?:kilometers?|kilometres?|km) (?:per|an|a) hour\b", re.I),
             lambda m: "kmh")]


@lru_cache(maxsize=16384)
def _unit_text(text: str) -> str:
    """Spellings of one unit made one: "100°F", "100 degrees Fahrenheit", "miles per hour"."""
    for pattern, repl in _DEGREES:
        text = pattern.sub(repl, text)
    return text
_RATES = {"daily", "weekly", "monthly", "yearly", "annual", "annually", "hourly"}  # "per day"


@lru_cache(maxsize=16384)
def _units(text: str) -> tuple[frozenset[str], frozenset[str]]:
    """(units attached to a quantity, every unit mentioned). "3 days", "5km", "two-hour",
    "per hour" and "a day" are quantified; a bare "how many days" names the unit of the
    answer, which a paraphrase may leave implicit ("how long")."""
    quantified, mentioned = set(), set()
    text = _unit_text(text)
    lowered = text.lower()
    for sym in ("%", "$", "€", "£"):
        if sym in lowered:
            quantified.add(_UNITS[sym])
    previous_is_number = False
    for w in words(text):
        parts = w.split("-")
        glued = re.sub(r"^\d+(?:\.\d+)?", "", parts[-1])  # "5km", "10gb"
        is_quantified = previous_is_number or glued != parts[-1] or (
            len(parts) > 1 and (parts[0] in _NUMBER_WORDS or parts[0].isdigit()))
        unit = glued
        for suffix in ("s", "es"):
            if glued.endswith(suffix) and glued[: -len(suffix)] in _UNITS:
                unit = glued[: -len(suffix)]
        found = set(_UNIT_SETS[unit]) if unit in _UNIT_SETS else (
            {_UNITS[unit]} if unit in _UNITS else set())
        mentioned |= found
        if is_quantified or unit in _UNIT_SETS or unit in _RATES:
            quantified |= found
        previous_is_number = (all(x.replace(".", "").isdigit() for x in parts)  # "5-10"
                              or w in _NUMBER_WORDS or w in _QUANTIFIERS)
    return frozenset(quantified), frozenset(mentioned)


_WHEN = re.compile(r"\b(?:what|which) (?:year|date|time|day|month|century)\b")


_HOW = re.compile(r"\bhow (much|many|long|far|old|often|frequently|big|tall)\b")
_HOW_LONG = re.compile(r"\bhow (?:long|many (?:seconds|minutes|hours|days|weeks|months|years)|much time)\b")
_CLAUSE_HOW = re.compile(r"(?:^|[.,;:!?]\s*)how\b")
_CLAUSE_WH = re.compile(r"(?:^|[.,;:!?]\s*)(who|when|where|why)\b")


@lru_cache(maxsize=16384)
def _question_types(text: str) -> frozenset[str]:
    """Question words that open a clause ("declined when I paid" asks nothing about time)."""
    lowered = text.lower().strip()
    found = set(_CLAUSE_WH.findall(lowered))
    if _WHEN.search(lowered):
        found.add("when")
    if _HOW_LONG.search(lowered):
        found.add("how long")
    else:
        found |= {f"how {'often' if m == 'frequently' else m}" for m in _HOW.findall(lowered)}
    if "how come" in lowered:  # asks why
        found.add("why")
    elif _CLAUSE_HOW.search(lowered) and not any(t.startswith("how ") for t in found):
        found.add("how")  # a way or a method: "how do I change X" is not "why can't I"
    return frozenset(found)


class QuestionTypeCheck:
    """"Who wrote Hamlet?" and "When was Hamlet written?" share every content word; the
    question word asks for a person, a time, a place or a reason. Compared when both have one."""

    name = "question"

    def __call__(self, query: str, candidate: str) -> str | None:
        q, c = _question_types(query), _question_types(candidate)
        # "how much" and "how many" both ask for a quantity
        q = {"how much" if t == "how many" else t for t in q}
        c = {"how much" if t == "how many" else t for t in c}
        # a plain "how" (a way: "how do I get X", "where do I get X") only clashes with "why"
        if "how" in q and "why" not in c:
            q.discard("how")
        if "how" in c and "why" not in q:
            c.discard("how")
        if q and c and q != c:
            return f"asks {'/'.join(sorted(q))} vs {'/'.join(sorted(c))}"
        return None


class NumberDateCheck:
    """Quantities, units, versions, years, months, weekdays and relative days must agree."""

    name = "numbers"

    def __call__(self, query: str, candidate: str) -> str | None:
        if _numbers(query) != _numbers(candidate):
            return "numbers differ"
        (q_quantified, q_all), (c_quantified, c_all) = _units(query), _units(candidate)
        if q_quantified != c_quantified or (q_all and c_all and q_all != c_all):
            return "units differ"
        if _calendar(query) != _calendar(candidate):
            return "dates differ"
        return None

    def conflict(self, query: str, candidate: str) -> str | None:
        """Only values on both sides that disagree: each side has one the other lacks."""
        q, c = dict(_numbers(query)), dict(_numbers(candidate))
        if set(q) - set(c) and set(c) - set(q):
            return "numbers differ"
        qd, cd = _calendar(query), _calendar(candidate)
        if qd - cd and cd - qd:
            return "dates differ"
        return None


_URLISH = re.compile(r"\S+@\S+|https?://\S+|www\.\S+|\b[\w-]+\.(?:com|org|net|io|dev|xyz|ru|cn)\b", re.I)


@lru_cache(maxsize=16384)
def _strong_entities(text: str) -> frozenset[str]:
    """Names a reader would call entities: mid-sentence capitals, acronyms, alnum, URLs."""
    found = {m.lower().rstrip(".,") for m in _URLISH.findall(text)}
    sentence_start = True
    for raw in _RAW_TOKEN.findall(text):
        token = raw.strip("\"'()[]{}<>,;:!?")
        clean = token.rstrip(".")
        if clean and re.split("['\u2019]", clean.lower())[0] != "i":  # "I", "I've", "I'm" (either apostrophe)
            is_mixed = any(c.isdigit() for c in clean) and any(c.isalpha() for c in clean)
            is_acronym = len(clean) >= 2 and clean.isupper() and clean.isalpha()
            is_inner_cap = any(c.isupper() for c in clean[1:]) and any(c.islower() for c in clean)
            is_symbolic = bool(re.search(r"[a-z][+#]|[a-z]\.[a-z]", clean, re.I))
            is_name = clean[:1].isupper() and not sentence_start
            if is_mixed or is_acronym or is_inner_cap or is_symbolic or is_name:
                found.add(clean.lower())
        sentence_start = raw.endswith((".", "?", "!", ":")) or (sentence_start and not token)
    return frozenset(found)


class EntityCheck:
    """A named thing swapped for another (Python vs Java, Paris vs Lyon) vetoes the candidate.

    Acronyms match their expansion ("2FA" / "two-factor authentication", "JS" / "JavaScript").
    An entity present on one side only (a paraphrase adding "PDF" or "Australia") is left to the
    content check, except addresses and URLs, the usual payload of an injection.
    """

    name = "entities"

    def __call__(self, query: str, candidate: str) -> str | None:
        if _quoted(query) != _quoted(candidate):  # 'cat' vs 'dog': the quoted thing is the topic
            return "quoted text differs"
        query, candidate = _unit_text(query), _unit_text(candidate)  # "100°F" is no name
        q_missing = [e for e in sorted(_strong_entities(query)) if not _mentioned(e, candidate)]
        c_missing = [e for e in sorted(_strong_entities(candidate)) if not _mentioned(e, query)]
        if q_missing and c_missing:
            return f"entity {q_missing[0]!r} vs {c_missing[0]!r}"
        for entity in q_missing + c_missing:
            if _URLISH.fullmatch(entity):
                return f"address {entity!r} on one side only"
        return None


class ScopeCheck:
    """One side adds content words and the other adds none: a narrowed or widened question
    ("sort a list" vs "sort a list in reverse order"), or an appended payload. A paraphrase
    rewords both sides, so it has unmatched words on each; with a token embedder, an added word
    whose contextual vector has a close counterpart on the other side ("Which artist painted"
    vs "Who painted") is a rewording, not a new constraint."""

    name = "scope"

    def __init__(self, tokens: TokenCache | None = None, min_alignment: float = 0.6,
                 max_rewording: int = 1) -> None:
        self.tokens = tokens
        self.min_alignment = min_alignment
        self.max_rewording = max_rewording

    def __call__(self, query: str, candidate: str) -> str | None:
        q, c = content_stems(query), content_stems(candidate)
        extra_q, extra_c = q - c, c - q
        if bool(extra_q) == bool(extra_c):
            return None
        if _kept_words_changed(query, candidate) > self.max_rewording:
            return None  # rephrased, not extended: the content check weighs the added words
        side, extra = ("query", extra_q) if extra_q else ("candidate", extra_c)
        if self.tokens is not None:
            own, other = (query, candidate) if extra_q else (candidate, query)
            scores = self.tokens.word_alignment(own, other, extra)
            if scores and min(scores) >= self.min_alignment:
                return None
        return f"{side} adds {sorted(extra)[:3]}"


# Everyday synonyms a one-word rewording uses; anything else swapped for one word is treated as
# a different question ("symbol for gold" / "symbol for silver", "cat" / "dog").
_SYNONYM_GROUPS = [
    {"big", "large", "huge"}, {"biggest", "largest"}, {"small", "little", "tiny"},
    {"smallest", "tiniest"}, {"delete", "remove", "erase"}, {"change", "modify", "alter", "edit"},
    {"fix", "repair", "solve", "resolve"}, {"buy", "purchase"}, {"start", "begin"},
    {"end", "finish", "stop"}, {"fast", "quick", "rapid"}, {"fastest", "quickest"},
    {"cheap", "inexpensive", "affordable"}, {"find", "locate"}, {"show", "display"},
    {"make", "create", "build"}, {"error", "exception"}, {"car", "automobile"},
    {"movie", "film"}, {"phone", "smartphone", "mobile"}, {"picture", "photo", "image"},
    {"shut", "close"}, {"correct", "right"}, {"wrong", "incorrect"}, {"use", "utilize"},
    {"need", "require"}, {"help", "assist"}, {"get", "obtain", "receive"},
    {"enough", "sufficient"}, {"ill", "sick"}, {"doctor", "physician"}, {"kid", "child"},
    {"kids", "children"}, {"rich", "wealthy"}, {"job", "work"}, {"shop", "store"},
    {"trip", "journey", "travel"}, {"home", "house"}, {"author", "writer"},
    {"price", "cost"}, {"reset", "recover"}, {"sign", "log"},
    {"enable", "activate", "turn", "switch"},  # "turn on": polarity is the negation check's job
]
_SYNONYMS = {}
for _group in _SYNONYM_GROUPS:
    for _w in _group:
        _SYNONYMS.setdefault(_stem(_w), set()).update(_stem(x) for x in _group)


class SubstitutionCheck:
    """Two texts that differ in one or two content words on each side, in the same place of an
    otherwise unchanged sentence: one thing swapped for another of the same kind ("chemical
    symbol for gold" / "... silver", "health benefits" / "risks", "ants" / "fruit flies").
    Embeddings rate such co-hyponyms as close as synonyms, so only inflections, unit spellings
    and a small table of everyday synonyms pass. A swap inside a rephrased sentence is left to
    the other checks: rephrasing is what a paraphrase does."""

    name = "substitution"

    def __init__(self, max_rewording: int = 1, max_swapped: int = 2, bare: int = 3) -> None:
        self.max_rewording = max_rewording
        self.max_swapped = max_swapped
        self.bare = bare  # texts of at most this many words are compared whole

    def __call__(self, query: str, candidate: str) -> str | None:
        q, c = _swap_stems(query), _swap_stems(candidate)
        extra_q, extra_c = q - c, c - q
        if (extra_q and extra_c and not (q & c) and len(words(query)) <= self.bare
                and len(words(candidate)) <= self.bare):
            # bare answers ("Canberra." / "Sydney."): nothing around the word to rephrase
            return f"{'/'.join(sorted(extra_q))!r} swapped for {'/'.join(sorted(extra_c))!r}"
        if not extra_q or not extra_c or not (q & c):
            return None
        if max(len(extra_q), len(extra_c)) > self.max_swapped:
            return None
        if _abbreviates(query, candidate, extra_q, extra_c):
            return None
        swapped = extra_q | extra_c
        if swapped & set(_NUMBER_WORDS) or any(ch.isdigit() for w in swapped for ch in w):
            return None  # a changed quantity is the numbers check's call
        for a in extra_q:
            for b in extra_c:
                if a.startswith(b) or b.startswith(a) or b in _SYNONYMS.get(a, ()):
                    return None
        if max(len(extra_q), len(extra_c)) > 1:
            if not _one_block_replaced(query, candidate, self.max_swapped):
                return None  # a short phrase for a short phrase, all else unchanged
        elif _rewording(query, candidate) > self.max_rewording:
            return None  # the sentence was rephrased around the word: a paraphrase's way
        return f"{'/'.join(sorted(extra_q))!r} swapped for {'/'.join(sorted(extra_c))!r}"


_CONTRACTIONS = {"'s": ("is",), "'re": ("are",), "'m": ("am",), "'ve": ("have",),
                 "'ll": ("will",), "'d": ("would",)}


@lru_cache(maxsize=16384)
def _expanded_words(text: str) -> tuple[str, ...]:
    """Words with "what's" as "what is", so a contraction is not counted as rewording."""
    out: list[str] = []
    for w in words(text):
        for ending, expansion in _CONTRACTIONS.items():
            if w.endswith(ending) and len(w) > len(ending):
                out.extend((w[: -len(ending)], *expansion))
                break
        else:
            out.append(w)
    return tuple(out)


@lru_cache(maxsize=16384)
def _word_diff(query: str, candidate: str) -> tuple[int, int, int, tuple]:
    """One word-level diff per pair: (words in common as one ordered sequence, shorter
    length, longer length, the non-equal opcodes)."""
    q, c = _expanded_words(query), _expanded_words(candidate)
    ops = SequenceMatcher(a=q, b=c, autojunk=False).get_opcodes()
    same = sum(i2 - i1 for tag, i1, i2, _, _ in ops if tag == "equal")
    return same, min(len(q), len(c)), max(len(q), len(c)), tuple(
        op for op in ops if op[0] != "equal")


def _rewording(query: str, candidate: str) -> int:
    """Words changed around a swap: the larger side's count of words outside the longest
    common word sequence, less the swapped word itself. "symbol for gold" / "symbol for
    silver" is 0; "Who wrote X?" / "who is the author of X" is 3."""
    same, _, longer, _ = _word_diff(query, candidate)
    return longer - same - 1


@lru_cache(maxsize=16384)
def _swap_stems(text: str) -> frozenset[str]:
    """Content stems with unit spellings made one ("oz" / "ounces", "lb" / "pounds")."""
    out = set()
    for w in words(text):
        if w in STOPWORDS or _is_negation(w):
            continue
        singular = w[:-1] if w.endswith("s") and w[:-1] in _UNITS else w
        out.add(f"unit:{_UNITS[singular]}" if singular in _UNITS and len(singular) > 1
                else _stem(w.removeprefix("non-")))
    return frozenset(out)


def _abbreviates(query: str, candidate: str, extra_q: set[str], extra_c: set[str]) -> bool:
    """One side's word abbreviates the other side's words: "sqrt" / "square root"."""
    for short_side, long_side, text in ((extra_q, extra_c, candidate), (extra_c, extra_q, query)):
        if len(short_side) != 1:
            continue
        short = next(iter(short_side))
        long_words = [w for w in words(text) if _stem(w) in long_side]
        joined = "".join(long_words)
        it = iter(joined)
        if (len(long_words) > 1 and joined[:1] == short[:1]
                and all(ch in it for ch in short)):  # a subsequence of the spelled-out words
            return True
    return False


def _one_block_replaced(query: str, candidate: str, max_words: int) -> bool:
    """The texts differ in one run of at most `max_words` words replaced by another such run,
    all else unchanged ("ants" / "fruit flies"; not "foods help with" / "can I eat to")."""
    ops = _word_diff(query, candidate)[3]
    return (len(ops) == 1 and ops[0][0] == "replace"
            and max(ops[0][2] - ops[0][1], ops[0][4] - ops[0][3]) <= max_words)


def _kept_words_changed(query: str, candidate: str) -> int:
    """Words of the shorter text missing from the common sequence: 0 when the longer text is
    the shorter one with words inserted ("read a file" / "read a binary file")."""
    same, shorter, _, _ = _word_diff(query, candidate)
    return shorter - same


_QUOTES = "\"\u201c\u201d\u2018\u2019'"
_QUOTED = re.compile(f"[{_QUOTES}]([^{_QUOTES}]{{1,80}})[{_QUOTES}]")


@lru_cache(maxsize=16384)
def _quoted(text: str) -> frozenset[str]:
    # apostrophes inside words ("don't") are not quotes: require a non-letter before the opener
    spans = set()
    for m in _QUOTED.finditer(text):
        before = text[m.start() - 1] if m.start() else " "
        if not before.isalnum():
            spans.add(normalize_quote(m.group(1)))
    return frozenset(spans)


def normalize_quote(span: str) -> str:
    return " ".join(words(span))


def _squash(text: str) -> str:
    return re.sub(r"[-.'\s]", "", text.lower())


# Common names of one place (a small table; the rest is left to the embedding).
_ALIASES = [
    {"us", "usa", "u.s.", "u.s.a.", "america", "american", "americans", "united states"},
    {"uk", "u.k.", "britain", "british", "united kingdom", "great britain"},
    {"nyc", "new york"}, {"la", "los angeles"}, {"sf", "san francisco"},
    {"eu", "europe", "european", "european union"}, {"uae", "emirates"},
]


def _alias_group(entity: str) -> set[str]:
    for group in _ALIASES:
        if entity in group:
            return group
    return {entity}


def _mentioned(entity: str, other: str) -> bool:
    other_words = f" {' '.join(words(other))} "
    for alias in _alias_group(entity):
        if f" {alias} " in other_words:
            return True
    if _squash(entity) in _squash(other):
        return True
    # camel-case and hyphen parts, so "JavaScript" offers initials "js", "two-factor" "2f"
    parts: list[str] = []
    for token in re.findall(r"[A-Za-z0-9]+", other):
        pieces = re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", token) or [token]
        parts.extend(p.lower() for p in pieces)
    initials = "".join(
        _NUMBER_WORDS.get(p, p)[0] if p not in STOPWORDS else "" for p in parts)
    key = _squash(entity)
    if len(key) >= 2 and key.isalnum() and key in initials:
        return True
    # demonyms and inflections: Italy / Italian, Canada / Canadian, Japan / Japanese
    return any(_demonym(key, p) or _demonym(p, key) for p in parts if len(p) >= 4)


_DEMONYM_SUFFIXES = ("", "n", "an", "ian", "ese", "ish", "i", "er", "s")


def _demonym(base: str, other: str) -> bool:
    stem = base.rstrip("aeiouy") if len(base) > 4 else base
    return (len(stem) >= 4 and other.startswith(stem) and other != base
            and other[len(stem):] in _DEMONYM_SUFFIXES)





class TokenCache:
    """Contextual token vectors of recent texts (a gate looks at the same texts repeatedly)."""

    def __init__(self, token_embedder: Callable[[list[str]], list], size: int = 4096) -> None:
        self._embed = token_embedder
        self._cache: LRU[str, tuple[list[str], np.ndarray, np.ndarray]] = LRU(size)

    def get(self, texts: Sequence[str]) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
        """Per text: (word pieces, unit vectors, content-piece mask)."""
        found = {t: self._cache.get(t) for t in dict.fromkeys(texts)}
        missing = [t for t, v in found.items() if v is None]
        for text, te in zip(missing, self._embed(missing) if missing else [], strict=True):
            content = np.array([_is_content(tok) for tok in te.tokens], dtype=bool)
            found[text] = (te.tokens, te.vectors, content)
            self._cache.put(text, found[text])
        return [found[t] for t in texts]

    def word_alignment(self, text: str, other: str, stems: set[str]) -> list[float]:
        """For each word of `text` whose stem is in `stems`: the best cosine of its (mean
        piece) vector with any token of `other`."""
        (tokens, vecs, _), (_, other_vecs, _) = self.get([text, other])
        words_: list[tuple[str, list[int]]] = []
        for i, tok in enumerate(tokens):
            if tok.startswith("##") and words_:
                words_[-1] = (words_[-1][0] + tok[2:], [*words_[-1][1], i])
            else:
                words_.append((tok, [i]))
        scores = []
        for word, idx in words_:
            if _stem(word) in stems:
                v = vecs[idx].mean(axis=0)
                v = v / max(float(np.linalg.norm(v)), 1e-12)
                scores.append(float((other_vecs @ v).max()) if len(other_vecs) else 0.0)
        return scores


class ContentAlignmentCheck:
    """Each content word piece on either side needs a close counterpart on the other side.

    Uses the embedder's contextual token vectors (BERTScore-style greedy matching). A synonym
    finds its partner; a payload an attacker appended, or an extra clause that narrows the
    question, does not. The score is the worst-aligned content token, in both directions.
    """

    name = "content"

    def __init__(self, tokens: TokenCache, min_score: float = 0.3) -> None:
        self.tokens = tokens
        self.min_score = min_score

    def score(self, query: str, candidate: str) -> float:
        (_, qv, qc), (_, cv, cc) = self.tokens.get([query, candidate])
        if not len(qv) or not len(cv):
            return 0.0
        sims = qv @ cv.T
        worst = 1.0
        if qc.any():
            worst = min(worst, float(sims.max(axis=1)[qc].min()))
        if cc.any():
            worst = min(worst, float(sims.max(axis=0)[cc].min()))
        return worst

    def __call__(self, query: str, candidate: str) -> str | None:
        score = self.score(query, candidate)
        if score < self.min_score:
            return f"content not aligned ({score:.2f} < {self.min_score})"
        return None


def _is_content(token: str) -> bool:
    bare = token[2:] if token.startswith("##") else token
    return bare.isalnum() and bare not in STOPWORDS and not token.startswith("##")


@dataclass
class Verdict:
    ok: bool
    check: str | None = None
    reason: str | None = None


class VerificationGate:
    """Runs its checks in order over the query, then its context checks over the earlier turns.

    Earlier turns are held by default to the checks of facts (negation, numbers, dates,
    entities, question words) and to substitution, not to the other wording checks (scope,
    content): an earlier turn may be long and freely reworded, while a changed city, amount or
    one swapped thing in it still changes the answer to the last question. The context checks
    can be set apart from the query's: a trained verifier may replace the query's wording
    checks while the earlier turns keep substitution. Turns come as "role: text".
    """

    CONTEXT_CHECKS = frozenset({"negation", "question", "numbers", "entities", "substitution"})

    def __init__(self, checks: Sequence[Check],
                 context_checks: Sequence[Check] | None = None) -> None:
        self.checks = list(checks)
        self.context_checks = (list(context_checks) if context_checks is not None else
                               [c for c in self.checks if c.name in self.CONTEXT_CHECKS])

    def verify(
        self, query: str, candidate: str,
        context: Sequence[str] = (), candidate_context: Sequence[str] = (),
    ) -> Verdict:
        for check in self.checks:
            reason = check(query, candidate)
            if reason is not None:
                return Verdict(False, check.name, reason)
        for q_turn, c_turn in zip(context, candidate_context, strict=False):
            role, _, q = q_turn.partition(": ") if ": " in q_turn else ("", "", q_turn)
            c = c_turn.partition(": ")[2] if ": " in c_turn else c_turn
            for check in self.context_checks:
                if role == "assistant" and isinstance(check, NumberDateCheck):
                    # a reworded reply drops or adds a figure freely; two that disagree
                    # (a different price, a different year) still change the answer
                    reason = check.conflict(q, c)
                else:
                    reason = check(q, c)
                if reason is not None:
                    return Verdict(False, check.name, f"earlier turn: {reason}")
        return Verdict(True)


def default_checks(token_embedder: Callable[[list[str]], list] | None,
                   names: Sequence[str], content_min_score: float,
                   scope_min_alignment: float = 0.6) -> list[Check]:
    """The built-in checks by name (negation, question, numbers, entities, substitution, scope,
    content).
    Without a token embedder, `content` is skipped and `scope` is purely lexical."""
    tokens = TokenCache(token_embedder) if token_embedder is not None else None
    factories: dict[str, Callable[[], Check | None]] = {
        "negation": NegationCheck,
        "question": QuestionTypeCheck,
        "numbers": NumberDateCheck,
        "entities": EntityCheck,
        "scope": lambda: ScopeCheck(tokens, scope_min_alignment),
        "substitution": SubstitutionCheck,
        "content": lambda: ContentAlignmentCheck(tokens, content_min_score) if tokens else None,
    }
    checks: list[Check] = []
    for name in names:
        if name not in factories:
            raise ConfigError(f"unknown verification check {name!r}; known: {list(factories)}")
        check = factories[name]()
        if check is not None:
            checks.append(check)
    return checks
