"""Numeric answers of math problems: the reference of a GSM8K record and the final answer in a model's
free-form output, compared exactly after normalisation.

Extraction looks for, in order: ``#### N`` (GSM8K's own format), ``\\boxed{N}``, a final-answer phrase
(``The answer is N``, ``Final answer: N``, ``Answer: $N``; the last one wins), and otherwise the last
number in the text. Numbers are normalised the same way on both sides: ``$``, ``€``, ``£``, units and
``%`` are dropped, thousands separators removed (``1,234,567``), ``42.0`` and ``42.00`` become
``42``, ``.5`` becomes ``0.5``, simple fractions ``3/4`` are evaluated. Comparison is exact on the
decimal value, so ``42`` == ``42.0`` and ``0.5`` == ``1/2`` but ``41.99`` != ``42``.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# a number: optional sign (not a hyphen inside a word or range) and currency, digits with optional
# comma thousands groups, decimals; or a bare .5. Digits glued to a letter (H2O, Q1, w25) are not a number.
_SIGN = r"(?:(?<![\w)])[-−])?"
_NUM = (rf"(?:{_SIGN}[$€£¥]?\s?(?<![A-Za-z_\d])(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?(?!\d)"
        rf"|{_SIGN}(?<![\w.])\.\d+(?!\d))")
_NUM_RE = re.compile(_NUM)
_FRACTION_RE = re.compile(rf"({_NUM})\s*/\s*({_NUM})")
_HASHES_RE = re.compile(rf"####\s*\**\s*({_NUM}(?:\s*/\s*{_NUM})?)")
_BOXED_RE = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_PHRASE_RE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|=|:|would\s+be|will\s+be)?\s*[:=]?\s*"
    r"(?:\*\*|\\\(|\$\$|\\\[)?\s*(?:approximately\s+|about\s+)?"
    rf"({_NUM}(?:\s*/\s*{_NUM})?)",
    re.IGNORECASE,
)


def normalize_number(text: str) -> str | None:
    """Canonical decimal string of the number in ``text`` (``"$1,234.50"`` -> ``"1234.5"``), or None."""
    if text is None:
        return None
    s = str(text).strip().replace("−", "-")
    frac = _FRACTION_RE.fullmatch(s.strip().rstrip(".").strip())
    if frac:
        num, den = _to_decimal(frac.group(1)), _to_decimal(frac.group(2))
        if num is None or den is None or den == 0:
            return None
        return _canonical(num / den)
    m = _NUM_RE.search(s)
    if not m:
        return None
    d = _to_decimal(m.group(0))
    return None if d is None else _canonical(d)


def _to_decimal(s: str) -> Decimal | None:
    s = re.sub(r"[\s,$€£¥]", "", s.replace("−", "-"))
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def _canonical(d: Decimal) -> str:
    d = d.quantize(Decimal("1e-9")) if d.as_tuple().exponent < -9 else d  # 1/3 and friends: 9 decimals
    s = format(d.normalize(), "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def reference_answer(answer: str | int | float) -> str | None:
    """The reference of a GSM8K record: the text after ``####`` (or the whole field, e.g. ``"42"``)."""
    s = str(answer)
    if "####" in s:
        s = s.rsplit("####", 1)[1]
    return normalize_number(s)


def extract_answer(output: str) -> str | None:
    """The final numeric answer in a model's output, normalised; None when the output holds no number."""
    if not output:
        return None
    text = output.replace("−", "-")
    for finder in (_HASHES_RE, _BOXED_RE, _PHRASE_RE):
        hits = finder.findall(text)
        for hit in reversed(hits):  # the last statement of an answer is the final one
            v = normalize_number(hit)
            if v is not None:
                return v
    nums = _NUM_RE.findall(text)
    for n in reversed(nums):
        v = normalize_number(n)
        if v is not None:
            return v
    return None


def is_correct(output: str, reference: str | int | float) -> bool:
    ref = reference_answer(reference)
    got = extract_answer(output)
    return ref is not None and got is not None and Decimal(got) == Decimal(ref)


__all__ = ["extract_answer", "is_correct", "normalize_number", "reference_answer"]
