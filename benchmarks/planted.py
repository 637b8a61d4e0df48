"""A generated corpus with planted PII and secrets of every scrub type, to measure the scrubber.

Every item is made the way its real counterpart is (valid Luhn card numbers of real issuer
prefixes, IBANs with correct mod-97 check digits and registry lengths, keys with their vendors'
prefixes and alphabets, PEM blocks, signed-looking JWTs, ...), in varied formats (spacing,
separators, case of keywords) and wrapped in varied surrounding punctuation, inside filler
sentences. The positions of the planted values are returned, so recall is measured exactly.

    python -m benchmarks.planted --out dirty.jsonl --eval-out qa.jsonl   # the data-quality guide's demo files
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits
URLSAFE = ALNUM + "-_"
FILLER = (
    "the report was filed on time and reviewed by the committee",
    "please find the details below and let us know of any questions",
    "our records were updated after the last meeting of the board",
    "a copy of this message was kept for the archive as usual",
    "the new configuration is in place and the service restarted cleanly",
    "thanks again for your help with the migration last week",
)
WRAPPERS = (
    "{}",
    "({})",
    "<{}>",
    '"{}"',
    "'{}'",
    "[{}]",
    "{}.",
    "{},",
    "{};",
    "{}!",
    "*{}*",
    "{}\n",
)


def _pick(rng: random.Random, alphabet: str, length: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


# --------------------------------------------------------------------------------------------
# Items: each returns (text that is inserted, the value inside it the scrubber must remove)


def email(rng: random.Random) -> tuple[str, str]:
    first, last = _pick(rng, string.ascii_lowercase, rng.randint(3, 8)), _pick(rng, string.ascii_lowercase, 6)
    local = rng.choice(
        [
            f"{first}.{last}",
            f"{first}_{last}",
            f"{first}{rng.randint(1, 99)}",
            f"{first}+news",
            f"{first[0]}{last}",
        ]
    )
    domain = rng.choice(["example.com", "mail.example.co.uk", "uni-bonn.de", "corp.example.org", "x.io"])
    value = f"{local}@{domain}"
    if rng.random() < 0.2:
        value = value.upper()
    return value, value


def phone(rng: random.Random) -> tuple[str, str]:
    area, exchange, line = rng.randint(201, 989), rng.randint(201, 989), rng.randint(0, 9999)
    value = rng.choice(
        [
            f"+1 {area} {exchange} {line:04d}",
            f"+1-{area}-{exchange}-{line:04d}",
            f"+1 ({area}) {exchange}-{line:04d}",
            f"+1{area}{exchange}{line:04d}",
            f"({area}) {exchange}-{line:04d}",
            f"{area}-{exchange}-{line:04d}",
            f"{area}.{exchange}.{line:04d}",
            f"+44 20 {rng.randint(7000, 8999)} {rng.randint(1000, 9999)}",
            f"+44 7{rng.randint(100, 999)} {rng.randint(100000, 999999)}",
            f"+49 30 {rng.randint(1000000, 99999999)}",
            f"+33 1 {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}",
            f"+91 {rng.randint(70000, 99999)} {rng.randint(10000, 99999)}",
            f"+81 3-{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}",
            f"+61 2 {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}",
        ]
    )
    return value, value


def ip(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.6:
        value = ".".join(str(rng.randint(0, 255)) for _ in range(4))
        text = rng.choice([value, f"{value}:{rng.randint(1, 65535)}", f"{value}/{rng.randint(8, 32)}"])
        return text, value
    address = ipaddress.IPv6Address(rng.getrandbits(128))
    if rng.random() < 0.5:  # compressed forms with a run of zero groups
        groups = address.exploded.split(":")
        zero, run = rng.randint(1, 5), rng.randint(2, 3)
        groups[zero : zero + run] = ["0"] * run
        address = ipaddress.IPv6Address(":".join(groups))
    value = address.compressed if rng.random() < 0.7 else address.exploded
    return value, value


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    total = 0
    for index, char in enumerate(reversed(body)):
        digit = int(char)
        if index % 2 == 0:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return body + str((10 - total % 10) % 10)


def credit_card(rng: random.Random) -> tuple[str, str]:
    prefix, length = rng.choice(
        [("4", 16), ("4", 13), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16), ("34", 15), ("37", 15),
         ("6011", 16), ("65", 16), ("3528", 16), ("3589", 16), ("36", 14), ("62", 16), ("4", 19)]
    )  # fmt: skip
    number = _luhn_complete(prefix, length, rng)
    style = rng.choice(["compact", "space", "dash"])
    if style == "compact":
        return number, number
    groups = [number[:4], number[4:10], number[10:]] if length == 15 else [
        number[i : i + 4] for i in range(0, length, 4)
    ]  # fmt: skip
    value = (" " if style == "space" else "-").join(groups)
    return value, value


IBAN_FORMATS = {  # country: (length, BBAN alphabet per position: d digit, a letter, c either)
    "DE": "d" * 18,
    "FR": "d" * 10 + "c" * 11 + "d" * 2,
    "GB": "aaaa" + "d" * 14,
    "NL": "aaaa" + "d" * 10,
    "ES": "d" * 20,
    "IT": "a" + "d" * 10 + "c" * 12,
    "BE": "d" * 12,
    "CH": "d" * 5 + "c" * 12,
    "PL": "d" * 24,
    "NO": "d" * 11,
    "MT": "aaaa" + "d" * 5 + "c" * 18,
    "SE": "d" * 20,
}


def iban(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(IBAN_FORMATS))
    alphabets = {"d": string.digits, "a": string.ascii_uppercase, "c": UPPER_DIGITS}
    bban = "".join(rng.choice(alphabets[kind]) for kind in IBAN_FORMATS[country])
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    check = 98 - int(numeric) % 97
    compact = f"{country}{check:02d}{bban}"
    value = " ".join(compact[i : i + 4] for i in range(0, len(compact), 4)) if rng.random() < 0.6 else compact
    return value, value


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _jwt(rng: random.Random) -> str:
    header = _b64url(json.dumps({"alg": rng.choice(["HS256", "RS256"]), "typ": "JWT"}).encode())
    claims = {
        "sub": str(rng.randint(1, 10**9)),
        "name": _pick(rng, string.ascii_letters, 8),
        "iat": 1700000000,
    }
    return f"{header}.{_b64url(json.dumps(claims).encode())}.{_pick(rng, URLSAFE, 43)}"


def _pem(rng: random.Random) -> str:
    label = rng.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"])
    body = base64.b64encode(rng.randbytes(rng.randint(200, 600))).decode()
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----"


def _password(rng: random.Random) -> str:
    return rng.choice(
        [
            _pick(rng, ALNUM, rng.randint(12, 32)),
            _pick(rng, ALNUM + "!@#$%^&*", rng.randint(10, 24)),
            base64.b64encode(rng.randbytes(rng.randint(12, 30))).decode(),
            rng.randbytes(16).hex(),
        ]
    )


SECRET_MAKERS: dict[str, Callable[[random.Random], str]] = {
    "aws_access_key": lambda r: r.choice(["AKIA", "ASIA"]) + _pick(r, UPPER_DIGITS, 16),
    "github_token": lambda r: r.choice(["ghp_", "gho_", "ghs_"]) + _pick(r, ALNUM, 36),
    "github_pat": lambda r: "github_pat_" + _pick(r, ALNUM, 22) + "_" + _pick(r, ALNUM, 59),
    "gitlab_token": lambda r: "glpat-" + _pick(r, URLSAFE, 20),
    "slack_token": lambda r: (
        f"xoxb-{r.randint(10**10, 10**12)}-{r.randint(10**10, 10**12)}-{_pick(r, ALNUM, 24)}"
    ),
    "slack_webhook": lambda r: (
        "https://hooks.slack.com/services/T"
        + _pick(r, UPPER_DIGITS, 8)
        + "/B"
        + _pick(r, UPPER_DIGITS, 8)
        + "/"
        + _pick(r, ALNUM, 24)
    ),
    "stripe_key": lambda r: r.choice(["sk_live_", "rk_live_", "sk_test_"]) + _pick(r, ALNUM, 24),
    "openai_key": lambda r: r.choice(
        ["sk-proj-" + _pick(r, URLSAFE, 48), "sk-" + _pick(r, ALNUM, 20) + "T3BlbkFJ" + _pick(r, ALNUM, 20)]
    ),
    "anthropic_key": lambda r: "sk-ant-api03-" + _pick(r, URLSAFE, 40),
    "google_api_key": lambda r: "AIza" + _pick(r, URLSAFE, 35),
    "google_oauth_token": lambda r: "ya29." + _pick(r, URLSAFE, 60),
    "npm_token": lambda r: "npm_" + _pick(r, ALNUM, 36),
    "pypi_token": lambda r: "pypi-AgEIcHlwaS5vcmc" + _pick(r, URLSAFE, 80),
    "sendgrid_key": lambda r: "SG." + _pick(r, URLSAFE, 22) + "." + _pick(r, URLSAFE, 43),
    "twilio_key": lambda r: r.choice(["AC", "SK"]) + _pick(r, "0123456789abcdef", 32),
    "jwt": _jwt,
    "private_key": _pem,
}
ASSIGNMENT_KEYS = (
    "password", "PASSWORD", "db_password", "api_key", "API_KEY", "apiKey", "secret", "client_secret",
    "auth_token", "ACCESS_TOKEN", "aws_secret_access_key", "passwd", "private_key", "token",
)  # fmt: skip


def secret(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.3:
        key, value = rng.choice(ASSIGNMENT_KEYS), _password(rng)
        if rng.random() < 0.15:
            user = _pick(rng, string.ascii_lowercase, 6)
            value = quote(value, safe="")  # a URL holds its password percent-encoded
            return f"postgres://{user}:{value}@db.internal:5432/app", value
        return rng.choice(
            [
                f"{key}={value}",
                f'{key} = "{value}"',
                f"{key}: {value}",
                f'"{key}": "{value}"',
                f"{key}='{value}'",
            ]
        ), value
    value = SECRET_MAKERS[rng.choice(sorted(SECRET_MAKERS))](rng)
    return value, value


MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "email": email,
    "phone": phone,
    "ip": ip,
    "credit_card": credit_card,
    "iban": iban,
    "secret": secret,
}


@dataclass(frozen=True)
class Planted:
    document: int
    kind: str
    start: int
    end: int
    """The planted value's character span in its document."""


def planted_corpus(items_per_type: int, seed: int = 0) -> tuple[list[str], list[Planted]]:
    """Documents of filler sentences, each holding one to three planted items, and where they are."""
    rng = random.Random(seed)
    jobs = [kind for kind in MAKERS for _ in range(items_per_type)]
    rng.shuffle(jobs)
    documents: list[str] = []
    planted: list[Planted] = []
    while jobs:
        parts: list[str] = []
        length = 0
        for _ in range(min(rng.randint(1, 3), len(jobs))):
            kind = jobs.pop()
            text, value = MAKERS[kind](rng)
            wrapped = rng.choice(WRAPPERS).format(text)
            before = (
                f"{rng.choice(FILLER).capitalize()}: " if rng.random() < 0.5 else f"{rng.choice(FILLER)} "
            )
            parts.append(before)
            length += len(before)
            start = length + wrapped.index(text) + text.index(value)
            planted.append(Planted(len(documents), kind, start, start + len(value)))
            parts.append(wrapped + " ")
            length += len(wrapped) + 1
        parts.append(rng.choice(FILLER) + ".")
        documents.append("".join(parts))
    return documents, planted


def recall(found: list[list], planted: list[Planted]) -> dict[str, dict]:
    """Per type: planted items, those a finding of the same type covers, and findings outside any item."""
    by_type: dict[str, dict] = {k: {"planted": 0, "found": 0, "missed": []} for k in MAKERS}
    for item in planted:
        row = by_type[item.kind]
        row["planted"] += 1
        if any(
            f.kind == item.kind and f.start <= item.start and f.end >= item.end for f in found[item.document]
        ):
            row["found"] += 1
        else:
            row["missed"].append(item)
    return by_type


def demo_corpus(seed: int = 0) -> list[dict]:
    """Rows of a small dirty corpus for the data-quality guide (docs/data-quality.md): the built-in corpus' paragraphs, planted items,
    exact copies (other case and spacing) and near copies (a few words changed)."""
    from lmkiln.data.corpus import iter_documents

    rng = random.Random(seed)
    topics = [d.text for d in iter_documents("builtin:pydoc")]
    paragraphs = [p.strip() for topic in topics for p in topic.split("\n\n") if len(p.strip()) > 200][:400]
    dirty, _ = planted_corpus(6, seed)
    rows = [{"text": p} for p in paragraphs] + [{"text": d} for d in dirty]
    for source in rng.sample(paragraphs, 12):
        rows.append({"text": "  ".join(source.upper().split())})  # an exact copy after normalization
    for source in rng.sample(paragraphs, 12):
        words = source.split()
        for _ in range(max(1, len(words) // 100)):
            words[rng.randrange(len(words))] = rng.choice(["very", "quite", "rather"])
        rows.append({"text": " ".join(words)})  # a near copy
    rng.shuffle(rows)
    return rows


def demo_eval(seed: int = 0) -> list[dict]:
    """A small question/answer file for the contamination demo: 8 answers quote the built-in
    corpus (20-40 words of a topic), 32 are made of filler sentences."""
    from lmkiln.data.corpus import iter_documents

    rng = random.Random(seed)
    topics = {d.key.split(":", 1)[1]: d.text.split() for d in iter_documents("builtin:pydoc")}
    rows = []
    for name in rng.sample(sorted(topics), 8):
        words = topics[name]
        start = rng.randrange(max(len(words) - 40, 1))
        rows.append(
            {
                "question": f"What does the manual say about {name}?",
                "answer": " ".join(words[start : start + rng.randint(20, 40)]),
            }
        )
    for index in range(32):
        rows.append(
            {"question": f"Status of ticket {index}?", "answer": ", ".join(rng.sample(FILLER, 3)) + "."}
        )
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSONL file to write (one {'text': ...} per line)")
    parser.add_argument(
        "--eval-out", help="also write a question/answer JSONL file for the contamination demo"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path, rows in ((args.out, demo_corpus(args.seed)), (args.eval_out, demo_eval(args.seed))):
        if path:
            with open(path, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
