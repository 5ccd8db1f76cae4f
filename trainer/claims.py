"""Specific claims in a reply, and whether the conversation it answers supports them.

A support reply is *confidently wrong* when it states a specific — an amount, a date, an order
or tracking number, an e-mail, a carrier — that the customer's message and the record the
assistant was given (a system or tool message) do not contain. This module finds the
specifics a reply states and the ones that appear nowhere in the conversation. It is generic
(no knowledge of any scenario) and deliberately literal: a claim is supported only when the
same value appears in the conversation, compared by value, not by spelling:

- money and numbers by their value: ``$16.45`` = ``16.45`` = ``16.45 USD``; ``1,000`` = ``1000``;
  ``$16`` = ``16.00``; a list marker (``1.`` at the start of a line) is not a claim. An amount
  (``$`` or a currency code) is supported only by an amount, or a number written with decimals
  or thousands separators, of the same value, never by a plain integer the conversation uses
  otherwise: "charged $55242" is unsupported
  when 55242 is the order number (a SmolLM2 candidate said exactly that, issue #29);
- dates by month and day: ``2026-11-14`` = ``November 14`` = ``14 Nov`` = ``Nov 14th``; the
  year, month and day of a date in the conversation also support those bare numbers;
- weekdays by name (a weekday is supported only when the conversation names it: it is not
  derived from a date);
- times (``18:00``), e-mail addresses and URLs literally (case-insensitive);
- IDs — tokens that mix letters and digits, such as ``1Z83F29A`` or ``HB-4411`` — ignoring case
  and hyphens;
- configured entity names (carriers, products, plan names) as whole words, ignoring case.

Not covered, by design: numbers written as words ("two days"), relative dates ("tomorrow"),
and claims without a specific (e.g. "your refund was issued"). Those need a model-based judge;
this check is the cheap, exact part that runs on every candidate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

MONTHS = {
    name: number
    for number, names in enumerate(
        [
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ],
        start=1,
    )
    for name in names
}
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

_MONTH = "|".join(sorted(MONTHS, key=len, reverse=True))
_ORD = r"(?:st|nd|rd|th)?"
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"')\]]+", re.I)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_ISO_DATE = re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b")
_MONTH_DAY = re.compile(rf"\b({_MONTH})\.?\s+(\d{{1,2}}){_ORD}\b(?:,?\s+(\d{{4}})\b)?", re.I)
_DAY_MONTH = re.compile(
    rf"\b(\d{{1,2}}){_ORD}\s+(?:of\s+)?({_MONTH})\b\.?(?:,?\s+(\d{{4}})\b)?", re.I
)
_SLASH_DATE = re.compile(r"\b(\d{1,2})/(\d{1,2})(?:/(\d{2,4}))?\b")
_TIME = re.compile(r"\b(\d{1,2}):(\d{2})\b")
_WEEKDAY = re.compile(r"\b(" + "|".join(WEEKDAYS) + r")\b", re.I)
_ID = re.compile(r"\b(?=[A-Za-z0-9-]*\d)(?=[A-Za-z0-9-]*[A-Za-z])[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*\b")
_NOT_ID = re.compile(r"^\d+(?:st|nd|rd|th|h|hrs?|am|pm|s|k|x|mins?|days?|d)$", re.I)
_NUMBER = re.compile(
    r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\w)|(?<![\w.])\d+(?:\.\d+)?(?![\w])"
)
_LIST_MARKER = re.compile(r"(?m)^\s*\d{1,2}[.)]\s")
_AMOUNT = r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
_MONEY = re.compile(
    rf"(?:[$€£]\s?{_AMOUNT}(?:\s?(?:USD|EUR|GBP)\b)?|(?<![\w.]){_AMOUNT}\s?(?:USD|EUR|GBP)\b)"
)


@dataclass(frozen=True)
class Claim:
    """One specific a text states: its kind, the text as written, and the key it is compared by."""

    kind: str  # money | number | date | year | weekday | time | email | url | id | entity
    text: str
    key: str


def _number_key(text: str) -> str | None:
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    return f"number:{value.normalize():f}"


def _dated(text: str, month: int, day: int, year: str | None) -> list[Claim]:
    """A date claim (by month and day), and its year as a number claim when written."""
    out = (
        [Claim("date", text, f"date:{month}-{day}")] if 1 <= month <= 12 and 1 <= day <= 31 else []
    )
    if year:
        out.append(Claim("year", year, f"number:{int(year)}"))
    return out


class _Text:
    """A text whose spans are consumed as claims are found, so one span is one claim."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.free = list(text)

    def take(self, pattern: re.Pattern[str]) -> Iterable[re.Match[str]]:
        for match in pattern.finditer("".join(self.free)):
            self.free[match.start() : match.end()] = " " * (match.end() - match.start())
            yield match


def _url(m: re.Match[str]) -> list[Claim]:
    return [Claim("url", m[0], "url:" + m[0].rstrip(".,;:!?").lower())]


def _email(m: re.Match[str]) -> list[Claim]:
    return [Claim("email", m[0], "email:" + m[0].lower())]


def _iso_date(m: re.Match[str]) -> list[Claim]:
    return _dated(m[0], int(m[2]), int(m[3]), m[1])


def _month_day(m: re.Match[str]) -> list[Claim]:
    return _dated(m[0], MONTHS[m[1].lower()], int(m[2]), m[3])


def _day_month(m: re.Match[str]) -> list[Claim]:
    return _dated(m[0], MONTHS[m[2].lower()], int(m[1]), m[3])


def _slash_date(m: re.Match[str]) -> list[Claim]:
    first, second = int(m[1]), int(m[2])  # month first, as in the US, unless it cannot be
    month, day = (first, second) if first <= 12 else (second, first)
    return _dated(m[0], month, day, None)


def _time(m: re.Match[str]) -> list[Claim]:
    return [Claim("time", m[0], f"time:{int(m[1])}:{m[2]}")]


def _weekday(m: re.Match[str]) -> list[Claim]:
    return [Claim("weekday", m[0], "weekday:" + m[1].lower())]


def _id(m: re.Match[str]) -> list[Claim]:
    digits = re.match(r"\d+", m[0])
    if _NOT_ID.match(m[0]) and digits:  # "14th", "5pm", "24h": the number is the claim
        return [Claim("number", m[0], f"number:{int(digits[0])}")]
    return [Claim("id", m[0], "id:" + m[0].replace("-", "").upper())]


def _money(m: re.Match[str]) -> list[Claim]:
    text = m[1] or m[2]
    key = _number_key(text)
    return [Claim("money", text, "money:" + key.removeprefix("number:"))] if key else []


def _number(m: re.Match[str]) -> list[Claim]:
    key = _number_key(m[0])
    return [Claim("number", m[0], key)] if key else []


def _nothing(m: re.Match[str]) -> list[Claim]:
    return []  # "1. Open the app" numbers a step; it states nothing


def extract_claims(text: str, entities: Sequence[str] = ()) -> list[Claim]:
    """Every specific ``text`` states, in text order. Kinds are matched in the order below and a
    span counts once: the date ``2026-11-14`` is not also the numbers 2026, 11 and 14."""
    source = _Text(text)
    claims: list[tuple[int, Claim]] = []
    for pattern, make in (
        (_URL, _url),
        (_EMAIL, _email),
        (_ISO_DATE, _iso_date),
        (_MONTH_DAY, _month_day),
        (_DAY_MONTH, _day_month),
        (_SLASH_DATE, _slash_date),
        (_TIME, _time),
        (_WEEKDAY, _weekday),
    ):
        claims += [(m.start(), c) for m in source.take(pattern) for c in make(m)]
    for name in entities:
        for match in source.take(re.compile(rf"(?<!\w){re.escape(name)}(?!\w)", re.I)):
            claims.append((match.start(), Claim("entity", match[0], "entity:" + name.lower())))
    for pattern, make in (
        (_MONEY, _money),
        (_ID, _id),
        (_LIST_MARKER, _nothing),
        (_NUMBER, _number),
    ):
        claims += [(m.start(), c) for m in source.take(pattern) for c in make(m)]
    return [claim for _, claim in sorted(claims, key=lambda item: item[0])]


def _supported_keys(context: Iterable[str], entities: Sequence[str]) -> set[str]:
    keys: set[str] = set()
    for text in context:
        for claim in extract_claims(text, entities):
            keys.add(claim.key)
            if claim.kind == "money":  # an amount in the record also supports the bare number
                keys.add("number:" + claim.key.removeprefix("money:"))
            if claim.kind == "number" and ("." in claim.text or "," in claim.text):
                # "16.00" or "1,000" read as amounts; a bare integer may be an order number
                keys.add("money:" + claim.key.removeprefix("number:"))
            if claim.kind == "date":  # a date's month and day support those bare numbers
                month, day = claim.key.removeprefix("date:").split("-")
                keys |= {f"number:{month}", f"number:{day}"}
            if claim.kind == "id" and claim.key[3:].isdigit():
                keys.add(f"number:{int(claim.key[3:])}")
    return keys


def unsupported_claims(
    reply: str, context: Sequence[str], entities: Sequence[str] = (), ignore: Sequence[str] = ()
) -> list[Claim]:
    """The specifics ``reply`` states that appear nowhere in ``context`` (the conversation);
    ``ignore`` lists terms that look like specifics but state nothing (``2FA``, ``MP3``)."""
    supported = _supported_keys(context, entities)
    skip = {term.lower() for term in ignore}
    return [
        c
        for c in extract_claims(reply, entities)
        if c.key not in supported and c.text.lower() not in skip
    ]


def states_fact(reply: str, fact: str, entities: Sequence[str] = ()) -> bool:
    """Does ``reply`` state ``fact`` (a value from the record, e.g. ``58.20 USD`` or
    ``2026-11-14``)? Compared by value like claims; a fact without a specific in it (a status
    such as ``in transit``) must appear as written, ignoring case and spacing."""
    wanted = {c.key for c in extract_claims(fact, entities) if c.kind != "year"}
    if wanted:
        return wanted <= {c.key for c in extract_claims(reply, entities)}
    squash = " ".join(fact.lower().split())
    return bool(squash) and squash in " ".join(reply.lower().split())
