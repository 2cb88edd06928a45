"""The verification gate: cheap checks that veto an ANN candidate that is close but wrong.

Embedding similarity alone cannot tell "enable 2FA" from "disable 2FA" (cosine ~0.89 under
MiniLM, higher than many true paraphrases), nor "flights to Paris" from "flights to Lyon", and an
attacker can push an unrelated query arbitrarily close to a victim's. So after the threshold, each
check compares the incoming text with the candidate's stored text and may veto with a reason.
Checks are plain callables; a cross-encoder or the served LLM as judge plugs in the same way.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

_WORD = re.compile(r"[a-z0-9][a-z0-9'+#]*(?:[.\-][a-z0-9+#]+)*", re.I)
_RAW_TOKEN = re.compile(r"\S+")
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")

NEGATIONS = frozenset(
    "not no never none nothing nobody nowhere neither nor without cannot cant can't won't wont "
    "don't dont doesn't doesnt isn't isnt aren't arent wasn't weren't shouldn't wouldn't couldn't "
    "didn't hasn't haven't hadn't mustn't needn't shan't".split()
)
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
    ("import", "export"), ("arrival", "departure"), ("arrive", "depart"), ("lend", "borrow"),
    ("input", "output"), ("read", "write"), ("public", "private"), ("sync", "async"),
    ("synchronous", "asynchronous"), ("valid", "invalid"), ("visible", "invisible"),
    ("approve", "deny"), ("hire", "fire"), ("gain", "lose"), ("profit", "loss"),
    ("deposit", "withdraw"), ("credit", "debit"), ("internal", "external"),
    ("client", "server"), ("front", "back"), ("uppercase", "lowercase"), ("upper", "lower"),
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
    "volt": "V", "byte": "B", "bit": "bit", "daily": "d", "weekly": "wk", "monthly": "mo",
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


def _calendar(text: str) -> set[str]:
    found = set()
    for w in words(text):
        w = _CALENDAR_SYNONYMS.get(w, w)
        if w in _CALENDAR:
            found.add(w)
    return found
STOPWORDS = frozenset(
    "a an the and or but if then so of to in on at by for from with about into over under up "
    "down out as is are was were be been being am do does did doing have has had having i me my "
    "mine we us our you your yours he him his she her it its they them their this that these "
    "those there here what which who whom whose when where why how can could would should will "
    "shall may might must need please tell give know want like just also any some all each "
    "every other such than too very get got make let s t one ones way ways thing things it's "
    "i'm i'd i'll you're what's how's there's let's hi hello hey thanks thank help explain "
    "best good really actually possible able".split()
)


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


def words(text: str) -> list[str]:
    return [w.lower().strip("'") for w in _WORD.findall(text.replace("\u2019", "'"))]


class Check(Protocol):
    """Returns None when the candidate may stand in for the query, else a short reason."""

    name: str

    def __call__(self, query: str, candidate: str) -> str | None: ...


def content_stems(text: str) -> set[str]:
    return {_stem(w) for w in words(text)
            if w not in STOPWORDS and w not in NEGATIONS and not w.endswith("n't")}


def overlap(a: str, b: str) -> float:
    """Jaccard overlap of content stems: how much two texts say in the same words."""
    sa, sb = content_stems(a), content_stems(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


class NegationCheck:
    """A negation flip between near-identical texts, or a swapped antonym.

    Negation parity is only compared when the texts share most content words: a reworded
    paraphrase often moves a negation ("can't remember" vs "forgot"), a trap rarely rewords.
    """

    name = "negation"

    def __init__(self, min_overlap: float = 0.5) -> None:
        self.min_overlap = min_overlap

    def __call__(self, query: str, candidate: str) -> str | None:
        qw, cw = words(query), words(candidate)
        qn = sum(w in NEGATIONS or w.endswith("n't") for w in qw)
        cn = sum(w in NEGATIONS or w.endswith("n't") for w in cw)
        if qn % 2 != cn % 2 and overlap(query, candidate) >= self.min_overlap:
            return "negation differs"
        qs, cs = {_stem(w) for w in qw}, {_stem(w) for w in cw}
        for w in qs - cs:
            flipped = _ANTONYMS.get(w, set()) & (cs - qs)
            if flipped:
                return f"antonym: {w!r} vs {sorted(flipped)[0]!r}"
        return None


def _numbers(text: str) -> Counter:
    values: Counter = Counter()
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
    return values


def _units(text: str) -> set[str]:
    """Units attached to a quantity ("3 days", "5km", "two-hour"); a bare "how many days"
    names the unit of the answer, which a paraphrase may leave implicit."""
    found = set()
    lowered = text.lower()
    for sym in ("%", "$", "€", "£"):
        if sym in lowered:
            found.add(_UNITS[sym])
    previous_is_number = False
    for w in words(text):
        parts = w.split("-")
        glued = re.sub(r"^\d+(?:\.\d+)?", "", parts[-1])  # "5km", "10gb"
        quantified = previous_is_number or glued != parts[-1] or (
            len(parts) > 1 and (parts[0] in _NUMBER_WORDS or parts[0].isdigit()))
        unit = glued[:-1] if glued.endswith("s") and glued[:-1] in _UNITS else glued
        if quantified and unit in _UNITS:
            found.add(_UNITS[unit])
        if quantified or unit in ("mph", "kmh", "kph"):
            found.update(_UNIT_SETS.get(unit, ()))
        previous_is_number = w.replace(".", "").isdigit() or (
            w in _NUMBER_WORDS and w not in ("a", "an"))
    return found


class NumberDateCheck:
    """Quantities, units, versions, years, months, weekdays and relative days must agree."""

    name = "numbers"

    def __call__(self, query: str, candidate: str) -> str | None:
        if _numbers(query) != _numbers(candidate):
            return "numbers differ"
        if _units(query) != _units(candidate):
            return "units differ"
        if _calendar(query) != _calendar(candidate):
            return "dates differ"
        return None


_URLISH = re.compile(r"\S+@\S+|https?://\S+|www\.\S+|\b[\w-]+\.(?:com|org|net|io|dev|xyz|ru|cn)\b", re.I)


def _strong_entities(text: str) -> set[str]:
    """Names a reader would call entities: mid-sentence capitals, acronyms, alnum, URLs."""
    found = {m.lower().rstrip(".,") for m in _URLISH.findall(text)}
    sentence_start = True
    for raw in _RAW_TOKEN.findall(text):
        token = raw.strip("\"'()[]{}<>,;:!?")
        clean = token.rstrip(".")
        if clean and clean.lower() != "i":
            is_mixed = any(c.isdigit() for c in clean) and any(c.isalpha() for c in clean)
            is_acronym = len(clean) >= 2 and clean.isupper() and clean.isalpha()
            is_inner_cap = any(c.isupper() for c in clean[1:]) and any(c.islower() for c in clean)
            is_symbolic = bool(re.search(r"[a-z][+#]|[a-z]\.[a-z]", clean, re.I))
            is_name = clean[:1].isupper() and not sentence_start
            if is_mixed or is_acronym or is_inner_cap or is_symbolic or is_name:
                found.add(clean.lower())
        sentence_start = raw.endswith((".", "?", "!", ":")) or (sentence_start and not token)
    return found


class EntityCheck:
    """A named thing swapped for another (Python vs Java, Paris vs Lyon) vetoes the candidate.

    Acronyms match their expansion ("2FA" / "two-factor authentication", "JS" / "JavaScript").
    An entity present on one side only (a paraphrase adding "PDF" or "Australia") is left to the
    content check, except addresses and URLs, the usual payload of an injection.
    """

    name = "entities"

    def __call__(self, query: str, candidate: str) -> str | None:
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
    rewords both sides, so it has unmatched words on each."""

    name = "scope"

    def __call__(self, query: str, candidate: str) -> str | None:
        q, c = content_stems(query), content_stems(candidate)
        extra_q, extra_c = q - c, c - q
        if bool(extra_q) != bool(extra_c):
            side, extra = ("query", extra_q) if extra_q else ("candidate", extra_c)
            return f"{side} adds {sorted(extra)[:3]}"
        return None


def _squash(text: str) -> str:
    return re.sub(r"[-.'\s]", "", text.lower())


def _mentioned(entity: str, other: str) -> bool:
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
    # demonyms and inflections: Italy / Italian, Canada / Canadian, Britain / British
    return any(_shared_prefix(key, p) >= max(4, int(0.6 * min(len(key), len(p))))
               for p in parts if len(p) >= 4)


def _shared_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ContentAlignmentCheck:
    """Each content word piece on either side needs a close counterpart on the other side.

    Uses the embedder's contextual token vectors (BERTScore-style greedy matching). A synonym
    finds its partner; a payload an attacker appended, or an extra clause that narrows the
    question, does not. The score is the worst-aligned content token, in both directions.
    """

    name = "content"

    def __init__(self, token_embedder: Callable[[list[str]], list], min_score: float = 0.3,
                 cache_size: int = 4096) -> None:
        self._embed = token_embedder
        self.min_score = min_score
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_size = cache_size

    def _tokens(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for text, te in zip(missing, self._embed(missing), strict=True):
                content = np.array([_is_content(tok) for tok in te.tokens], dtype=bool)
                self._cache[text] = (te.vectors, content)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        out = []
        for t in texts:
            self._cache.move_to_end(t)
            out.append(self._cache[t])
        return out

    def score(self, query: str, candidate: str) -> float:
        (qv, qc), (cv, cc) = self._tokens([query, candidate])
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
    """Runs its checks in order over the query and, turn by turn, over the context chain."""

    def __init__(self, checks: Sequence[Check]) -> None:
        self.checks = list(checks)

    def verify(
        self, query: str, candidate: str,
        context: Sequence[str] = (), candidate_context: Sequence[str] = (),
    ) -> Verdict:
        pairs = [(query, candidate), *zip(context, candidate_context, strict=False)]
        for check in self.checks:
            for q, c in pairs:
                reason = check(q, c)
                if reason is not None:
                    return Verdict(False, check.name, reason)
        return Verdict(True)


def default_checks(token_embedder: Callable[[list[str]], list] | None,
                   names: Sequence[str], content_min_score: float) -> list[Check]:
    """The built-in checks by name (negation, numbers, entities, scope, content)."""
    available: dict[str, Callable[[], Check]] = {
        "negation": NegationCheck,
        "numbers": NumberDateCheck,
        "entities": EntityCheck,
        "scope": ScopeCheck,
    }
    checks: list[Check] = []
    for name in names:
        if name == "content":
            if token_embedder is not None:
                checks.append(ContentAlignmentCheck(token_embedder, content_min_score))
        elif name in available:
            checks.append(available[name]())
        else:
            raise ValueError(f"unknown verification check {name!r}; known: {[*available, 'content']}")
    return checks
