"""PII and secret scrubbing: find typed items in text and replace them with plain-text placeholders.

Types (the keys of SCRUB_TYPES, named in `data.scrub`):

    email        addresses with a dotted domain
    phone        international (+CC ...) numbers of 8-15 digits; North American (NXX) NXX-XXXX
    ip           IPv4 (each octet <= 255) and IPv6 (validated by the ipaddress module)
    credit_card  13-19 digits, issuer prefix and Luhn checksum
    iban         country length (ISO 13616 registry) and mod-97 checksum
    secret       well-known key formats (the patterns of detect-secrets' plugins and the vendors'
                 documented prefixes) and high-entropy values of password/token/key assignments

A match becomes `<|type|>`: plain text, which lmkiln's tokenizer encodes as ordinary characters
(never as a control token; see Tokenizer.encode). Every pattern is a compiled regular expression
guarded by a literal that must occur in the text first (a substring test runs at memory speed,
so most detectors cost nothing on text that cannot hold their item). detect-secrets itself scans
a line at a time through ~25 plugins and measured 0.2 MB/s on the built-in corpus (this module:
29 MB/s for secrets): its patterns are used here, its engine is not.
"""

from __future__ import annotations

import ipaddress
import math
import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

from lmkiln.errors import LmkilnError


def placeholder(kind: str) -> str:
    return f"<|{kind}|>"


@dataclass(frozen=True)
class Detector:
    kind: str
    """The scrub type it belongs to (email, secret, ...)."""
    name: str
    """What it finds, e.g. 'aws_access_key' (the secret kinds are counted separately)."""
    pattern: re.Pattern
    hints: tuple[str, ...] = ()
    """Literals of which one must occur in the text for the pattern to be tried (empty = always)."""
    valid: Callable[[str], bool] | None = None
    """Check of the matched value (checksum, range); None accepts every match."""
    fit: Callable[[str], int] | None = None
    """Instead of `valid`: the length of the valid item at the start of the match (0 = none)."""
    group: str | int = 0
    """The part of the match that is replaced (e.g. only the value of `password=...`)."""
    finder: Callable[[str], Iterator[tuple[int, int]]] | None = None
    """Spans found by code instead of `pattern.finditer` (anchored searches)."""
    numeric: bool = False
    """Its items hold at least 4 ASCII digits within 16 characters: search only where text does."""


@dataclass(frozen=True)
class Finding:
    kind: str
    name: str
    start: int
    end: int
    value: str


# --------------------------------------------------------------------------------------------
# Validators


def luhn_valid(number: str) -> bool:
    """The Luhn checksum of a card number (digits only)."""
    total = 0
    for index, char in enumerate(reversed(number)):
        digit = ord(char) - 48
        if index % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


# Card issuer prefixes (IIN ranges) and lengths: Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro
_CARD_ISSUER = re.compile(
    r"4\d{12}(?:\d{3}){0,2}|5[1-5]\d{14}|2(?:2[2-9]\d|[3-6]\d\d|7[01]\d|720)\d{12}|3[47]\d{13}"
    r"|6(?:011|5\d\d|4[4-9]\d)\d{12,15}|35(?:2[89]|[3-8]\d)\d{12,15}|3(?:0[0-5]|[689]\d)\d{11,16}"
    r"|62\d{14,17}|(?:5[06-8]|6\d)\d{10,17}"
)


def card_valid(value: str) -> bool:
    digits = re.sub(r"[ -]", "", value)
    separators = set(re.sub(r"\d", "", value))
    return len(separators) <= 1 and _CARD_ISSUER.fullmatch(digits) is not None and luhn_valid(digits)


# Lengths of IBANs by country, from the ISO 13616 registry (SWIFT's IBAN registry)
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def iban_valid(value: str) -> bool:
    """ISO 13616: the country's length and (rearranged, letters as 10..35) value mod 97 == 1."""
    compact = value.replace(" ", "")
    if IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def iban_fit(value: str) -> int:
    """Length of the valid IBAN at the start of `value`, 0 if none: the pattern may have run on
    into a following word ("DE89... A copy"), so the country's length says where it ends."""
    length = IBAN_LENGTHS.get(value[:2], 0)
    seen = 0
    for end, char in enumerate(value, start=1):
        seen += char != " "
        if seen == length:
            return end if iban_valid(value[:end]) else 0
    return 0


def ipv6_valid(value: str) -> bool:
    """A real IPv6 address, not a slice like `a[1::2]` or a time like 12:30:45."""
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return False
    groups = [g for g in value.split(":") if g]
    return len(groups) >= 3 or (len(groups) >= 1 and max(map(len, groups)) >= 3 and "::" in value)


def phone_valid(value: str) -> bool:
    digits = sum(c.isdigit() for c in value)
    return 8 <= digits <= 15 if value.startswith("+") else digits == 10


def shannon_entropy(value: str) -> float:
    """Bits per character of the value's character distribution."""
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


_IDENTIFIER = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?:\(\))?")


def _class_changes(value: str) -> int:
    """How often neighbouring characters switch between lower case, upper case and digits: about
    0.6 per character in a random string, 0.4 in random hex, under 0.2 in identifiers made of words."""
    classes = [0 if c.islower() else 1 if c.isupper() else 2 if c.isdigit() else -1 for c in value]
    return sum(a != b and a >= 0 and b >= 0 for a, b in zip(classes, classes[1:]))


def generated_value(value: str, quoted: bool) -> bool:
    """A value of a password/key/token assignment that looks generated, not a word, an identifier
    or a placeholder. A quoted value is a literal, so only an unquoted one may be code."""
    if len(value) < 8 or value.startswith("<|"):
        return False
    if not quoted and _IDENTIFIER.fullmatch(value) and _class_changes(value) < 0.2 * (len(value) - 1):
        return False  # a variable, attribute or call (`password = getpass.getpass()`, `apiKeyFromEnv`)
    classes = sum(
        (any(c.islower() for c in value), any(c.isupper() for c in value), any(c.isdigit() for c in value))
    ) + any(not c.isalnum() for c in value)
    return classes >= 2 and shannon_entropy(value) >= min(3.0, 0.8 * math.log2(len(value)))


# --------------------------------------------------------------------------------------------
# Detectors
#
# Speed: CPython's regex engine scans fast for a pattern that starts with a literal or a small
# character class and slowly for one that starts with a lookbehind or `\d` (Unicode digits), so
# patterns start with their first character and check the character before it in a lookbehind
# right after it, and spell digits [0-9]. Email and assignments are found from an anchor ("@", a
# keyword) instead of trying every position.


def _secret(name: str, pattern: str, hints: tuple[str, ...], **kwargs) -> Detector:
    return Detector("secret", name, re.compile(pattern), hints, **kwargs)


_E = r"(?![A-Za-z0-9_])"  # no token character after

_EMAIL_DOMAIN = re.compile(
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9_-])"
)
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}\Z")


def _emails(text: str) -> Iterator[tuple[int, int]]:
    """Spans of addresses: a domain after "@", then the longest local part that ends at the "@"."""
    for domain in _EMAIL_DOMAIN.finditer(text):
        at = domain.start()
        local = _EMAIL_LOCAL.search(text, max(0, at - 64), at)
        if local and not (local.start() == at - 64 and at > 64 and text[at - 65] in _LOCAL_CHARS):
            yield local.start(), domain.end()


_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_KEYWORD = re.compile(r"pass|pwd|secret|key|token|credential")
_ASSIGNMENT = re.compile(
    r"\w*[\"']?\s*(?::=|=>|=|:)\s*(?P<quote>[\"'`]?)(?P<value>[A-Za-z0-9+/=_.~!@#$%^&*-]{8,})(?P=quote)"
)


def _assignments(text: str) -> Iterator[tuple[int, int]]:
    """Spans of the values of `password=...`, `"api_key": "..."`, `AUTH_TOKEN := ...` and the like.

    Keywords are found in the lower-cased text (offsets are the same when lowering keeps the
    length, which it does for all but a few non-ASCII letters: then the text is lowered per match).
    """
    lowered = text.lower()
    if len(lowered) != len(text):
        lowered = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
    for keyword in _KEYWORD.finditer(lowered):
        assignment = _ASSIGNMENT.match(text, keyword.end())
        if assignment and generated_value(assignment["value"], quoted=bool(assignment["quote"])):
            yield assignment.span("value")


_IPV6_SEED = re.compile(r":[0-9A-Fa-f]{0,4}:")  # two colons close together: cheap to find
_IPV6 = re.compile(r"[0-9A-Fa-f:]{2,39}(?![A-Za-z0-9_:]|\.[A-Za-z0-9])")
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")


def _ipv6(text: str) -> Iterator[tuple[int, int]]:
    """Candidate IPv6 spans around pairs of nearby colons (validated by the ipaddress module)."""
    done = 0
    for seed in _IPV6_SEED.finditer(text):
        start = seed.start()
        if start < done:
            continue
        while start > max(done, seed.start() - 39) and text[start - 1] in _HEX_COLON:
            start -= 1
        if start and (text[start - 1].isalnum() or text[start - 1] in "_."):
            continue
        match = _IPV6.match(text, start)
        if match:
            done = match.end()
            yield match.span()


SECRET_DETECTORS = (
    # PEM blocks first: they hold base64 that other patterns would nibble at
    _secret(
        "private_key",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
        r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|(?=\x00)|\Z)",
        ("PRIVATE KEY",),
    ),
    _secret(
        "putty_private_key",
        r"PuTTY-User-Key-File-[0-9]+:[\s\S]*?(?:Private-MAC: \w+|(?=\x00)|\Z)",
        ("PuTTY-User",),
    ),
    _secret(
        "jwt",
        r"eyJ(?<![A-Za-z0-9_-]eyJ)[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}" + _E,
        ("eyJ",),
    ),  # fmt: skip
    _secret(
        "aws_access_key",
        r"A(?<![A-Z0-9]A)(?:3T[A-Z0-9]|KIA|SIA|BIA|CCA)[A-Z0-9]{16}(?![A-Z0-9])",
        ("AKIA", "ASIA", "ABIA", "ACCA", "A3T"),
    ),  # fmt: skip
    _secret(
        "github_token",
        r"g(?<![A-Za-z0-9_]g)(?:h[pousr]_[A-Za-z0-9]{36,255}|ithub_pat_[A-Za-z0-9_]{22,255})" + _E,
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    ),
    _secret(
        "gitlab_token",
        r"gl(?<![A-Za-z0-9_]gl)(?:pat|dt|ft|soat|rt|ptt|cbt|imt|oas|agent)-[A-Za-z0-9_-]{20,}" + _E,
        ("gl",),
    ),
    _secret("slack_token", r"xox(?<![A-Za-z0-9_]xox)[abposr]-[A-Za-z0-9-]{10,}" + _E, ("xox",)),
    _secret("slack_webhook", r"https://hooks\.slack\.com/services/[A-Za-z0-9_/]+", ("hooks.slack.com",)),
    _secret(
        "stripe_key",
        r"[sr]k_(?<![A-Za-z0-9_][sr]k_)(?:live|test)_[A-Za-z0-9]{16,}" + _E,
        ("_live_", "_test_"),
    ),  # fmt: skip
    _secret(
        "anthropic_key",
        r"sk-ant-(?<![A-Za-z0-9_]sk-ant-)(?:api|admin)[0-9]{2}-[A-Za-z0-9_-]{20,}" + _E,
        ("sk-ant-",),
    ),
    _secret(
        "openai_key",
        r"sk-(?<![A-Za-z0-9_]sk-)(?:(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,}|[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20})"
        + _E,
        ("sk-",),
    ),
    _secret("google_api_key", r"AIza(?<![A-Za-z0-9_-]AIza)[0-9A-Za-z_-]{35}" + _E, ("AIza",)),
    _secret("google_oauth_token", r"ya29\.(?<![A-Za-z0-9_]ya29\.)[0-9A-Za-z_-]{20,}" + _E, ("ya29.",)),
    _secret("npm_token", r"npm_(?<![A-Za-z0-9_]npm_)[A-Za-z0-9]{36}" + _E, ("npm_",)),
    _secret("pypi_token", r"pypi-AgE[A-Za-z0-9_-]{50,}" + _E, ("pypi-",)),
    _secret("sendgrid_key", r"SG\.(?<![A-Za-z0-9_]SG\.)[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}" + _E, ("SG.",)),
    _secret("twilio_key", r"[AS](?<![A-Za-z0-9_][AS])(?:(?<=A)C|(?<=S)K)[0-9a-f]{32}" + _E, ("AC", "SK")),
    _secret(
        "url_password",
        r"://[^\s:/@<>\x00]+:(?P<value>[^\s:/@<>\x00]{3,})@",
        ("://",),
        valid=lambda v: not v.startswith("<|") and v.lower() not in ("password", "pass", "pwd", "secret"),
        group="value",
    ),
    Detector(
        "secret",
        "assigned_secret",
        _ASSIGNMENT,
        ("=", ":"),
        finder=_assignments,
    ),
)

_NOT_BEFORE_NUMBER = (
    r"(?<![A-Za-z0-9_.,+-][0-9])"  # after a number's first digit: nothing number-like before it
)

SCRUB_TYPES: dict[str, tuple[Detector, ...]] = {
    "secret": SECRET_DETECTORS,
    "email": (Detector("email", "email", _EMAIL_DOMAIN, ("@",), finder=_emails),),
    "iban": (
        Detector(
            "iban",
            "iban",
            re.compile(
                r"[A-Z][A-Z][0-9][0-9](?<![A-Za-z0-9][A-Z][A-Z][0-9][0-9])(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?"
                r"(?![A-Za-z0-9])"
            ),
            fit=iban_fit,
            numeric=True,
        ),
    ),
    "credit_card": (
        Detector(
            "credit_card",
            "credit_card",
            re.compile(r"[0-9]" + _NOT_BEFORE_NUMBER + r"(?:[ -]?[0-9]){12,18}(?![A-Za-z0-9_-]|[.,][0-9])"),
            valid=card_valid,
            numeric=True,
        ),
    ),
    "ip": (
        Detector(
            "ip",
            "ipv4",
            re.compile(r"[0-9](?<![A-Za-z0-9_.][0-9])[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?![A-Za-z0-9_]|\.[0-9])"),
            (".",),
            valid=lambda v: all(
                int(octet) <= 255 and (octet == "0" or octet[0] != "0") for octet in v.split(".")
            ),
            numeric=True,
        ),
        Detector("ip", "ipv6", _IPV6, (":",), valid=ipv6_valid, finder=_ipv6),
    ),
    "phone": (
        Detector(
            "phone",
            "phone_international",
            re.compile(
                r"\+(?<![A-Za-z0-9_+]\+)[1-9][0-9]{0,2}(?:[ .-]?\([0-9]{1,4}\))?(?:[ .-]?[0-9]{1,5}){1,6}"
                r"(?![A-Za-z0-9_-]|[.,][0-9])"
            ),
            ("+",),
            valid=phone_valid,
        ),
        Detector(
            "phone",
            "phone_north_america",
            re.compile(
                r"[(2-9](?<![A-Za-z0-9_+.-][(2-9])(?:(?<=\()[2-9][0-9][0-9]\)[ .-]?|(?<=[2-9])[0-9][0-9][ .-])"
                r"[2-9][0-9][0-9][ .-][0-9]{4}(?![A-Za-z0-9_-]|[.,][0-9])"
            ),
            valid=phone_valid,
            numeric=True,
        ),
    ),
}
"""Scrub types in the order they are applied: earlier types claim overlapping text first."""


def check_types(types: list[str] | tuple[str, ...], where: str = "data.scrub") -> list[str]:
    unknown = [t for t in types if t not in SCRUB_TYPES]
    if unknown:
        raise LmkilnError(
            f"{where}: unknown scrub type {unknown[0]!r}; valid types: {', '.join(SCRUB_TYPES)}"
        )
    return [t for t in SCRUB_TYPES if t in types]  # the registry's order, each once


SEPARATOR = "\x00"
"""Joins the documents of a batch: no pattern matches across it (documents never hold NUL)."""


class Scrubber:
    """Finds the items of the chosen types and replaces them with their placeholders."""

    def __init__(self, types: list[str] | tuple[str, ...]) -> None:
        self.types = check_types(types)
        self.detectors = [d for t in self.types for d in SCRUB_TYPES[t]]

    def find(self, text: str) -> list[Finding]:
        """Non-overlapping findings in text order; an earlier detector wins an overlap."""
        claimed = _Claims()
        numeric: list[tuple[int, int]] | None = None  # digit-dense regions, found once per text
        for detector in self.detectors:
            if detector.hints and not any(hint in text for hint in detector.hints):
                continue
            if detector.numeric and numeric is None:
                numeric = digit_regions(text)
            spans = _spans_in(detector, text, numeric) if detector.numeric else _spans(detector, text)
            for start, end in spans:
                value = text[start:end]
                if detector.fit is not None:
                    end = start + detector.fit(value)
                    value = text[start:end]
                if (
                    end > start
                    and (detector.valid is None or detector.valid(value))
                    and claimed.claim(start, end)
                ):
                    claimed.findings.append(Finding(detector.kind, detector.name, start, end, value))
        return sorted(claimed.findings, key=lambda f: f.start)

    def find_many(self, texts: list[str]) -> list[list[Finding]]:
        """`find` for each text, searched as one joined text: per-call overhead would otherwise
        cost more than the search itself on short documents (paragraphs, lines)."""
        joined = SEPARATOR.join(texts)
        offsets = list(accumulate((len(t) + 1 for t in texts), initial=0))  # start of each text
        found: list[list[Finding]] = [[] for _ in texts]
        for finding in self.find(joined):
            index = bisect_right(offsets, finding.start) - 1
            base = offsets[index]
            end = min(finding.end, base + len(texts[index]))  # an unterminated key block ends with its text
            value = joined[finding.start : end]
            found[index].append(Finding(finding.kind, finding.name, finding.start - base, end - base, value))
        return found

    def scrub_many(self, texts: list[str]) -> tuple[list[str], list[list[Finding]]]:
        """Each text with every finding replaced by its placeholder, and the findings."""
        found = self.find_many(texts)
        return [replace_findings(t, f) for t, f in zip(texts, found)], found

    def scrub(self, text: str) -> tuple[str, list[Finding]]:
        findings = self.find(text)
        return replace_findings(text, findings), findings


def replace_findings(text: str, findings: list[Finding]) -> str:
    if not findings:
        return text
    parts, cursor = [], 0
    for finding in findings:
        parts += [text[cursor : finding.start], placeholder(finding.kind)]
        cursor = finding.end
    parts.append(text[cursor:])
    return "".join(parts)


class _Claims:
    """Character ranges already taken by a finding, kept sorted for overlap tests by bisection."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.findings: list[Finding] = []

    def claim(self, start: int, end: int) -> bool:
        """Take [start, end) unless it overlaps a taken range."""
        index = bisect_right(self.starts, start)
        if index and self.ends[index - 1] > start:
            return False
        if index < len(self.starts) and self.starts[index] < end:
            return False
        self.starts.insert(index, start)
        self.ends.insert(index, end)
        return True


def _spans(detector: Detector, text: str) -> Iterator[tuple[int, int]]:
    if detector.finder is not None:
        return detector.finder(text)
    return (match.span(detector.group) for match in detector.pattern.finditer(text))


def _spans_in(detector: Detector, text: str, regions: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """`_spans` searched inside regions only; a match cut by a region's end is checked on the whole text."""
    for low, high in regions:
        for match in detector.pattern.finditer(text, low, high):
            if match.end() == high < len(text):
                match = detector.pattern.match(text, match.start())
                if match is None:
                    continue
            yield match.span(detector.group)


_DIGIT = re.compile(r"[0-9]")
DIGIT_WINDOW, DIGIT_MIN, REGION_MARGIN = 16, 4, 48


def digit_regions(text: str) -> list[tuple[int, int]]:
    """[low, high) character ranges around every window of 16 characters that holds >= 4 ASCII
    digits, widened by 48 characters and merged: where a card, IBAN, IPv4 or phone number can be.
    Found with numpy in one pass, so numeric patterns skip prose."""
    if not _DIGIT.search(text):
        return []
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")  # (n,) code points
    counts = np.concatenate(([0], np.cumsum((codes >= 48) & (codes <= 57))))  # (n + 1,) digits before
    window = min(DIGIT_WINDOW, len(text))
    dense = np.flatnonzero(counts[window:] - counts[:-window] >= min(DIGIT_MIN, window))  # window starts
    if dense.size == 0:
        return []
    lows = np.maximum(dense - REGION_MARGIN, 0)
    highs = np.minimum(dense + window + REGION_MARGIN, len(text))
    reach = np.maximum.accumulate(highs)
    first = np.concatenate(([True], lows[1:] > reach[:-1]))  # a region starts where no earlier one reaches
    starts = np.flatnonzero(first)
    ends = np.concatenate((starts[1:], [len(lows)])) - 1
    return list(zip(lows[starts].tolist(), reach[ends].tolist()))


def mask(value: str, kind: str) -> str:
    """A value shown in a report without revealing it: `j***@e***.com`, `+4***********71`, `AKIA***`."""
    if kind == "email" and "@" in value:
        local, _, domain = value.partition("@")
        host, dot, tld = domain.rpartition(".")
        return f"{local[:1]}***@{host[:1]}***{dot}{tld}"
    if kind == "secret":
        first = value.strip().splitlines()[0] if value.strip() else value
        return first[: 4 if len(first) > 12 else 1] + "***"
    kept = {i for i, c in enumerate(value) if c.isalnum()}
    keep = sorted(kept)[:1] + sorted(kept)[-2:]
    return "".join(c if (i in keep or not c.isalnum()) else "*" for i, c in enumerate(value))
