"""DICOM dates moved by whole days, and the ways people write a date.

``shift_da`` / ``shift_dt`` move a DA or DT value by a number of days and keep what the value
says about itself: its precision (a DT of ``"2020"`` stays a year, ``"202003"`` a month), its
time part, fraction and UTC offset (a shift by whole days never touches them), and DA ranges
(``"20200101-20200301"``). A value that is not a date becomes ``""`` (removed): nothing is ever
passed through unshifted. ``typed_forms`` lists how a date may reappear in free text.
"""

from __future__ import annotations

import re
from datetime import date, timedelta

__all__ = ["shift_da", "shift_dt", "shift_value", "typed_forms"]

_DA = re.compile(r"^(\d{4})(\d{2})?(\d{2})?$")
_OLD_DA = re.compile(r"^(\d{4})\.(\d{2})\.(\d{2})$")  # ACR-NEMA 2.0 "YYYY.MM.DD"
_DT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?"
                 r"([+-]\d{4})?$")


def _move(year: str, month: str | None, day: str | None, days: int) -> str:
    """The date moved by ``days``, written with the precision it came with. A partial date
    moves from the middle of its period (July 1st, the 15th), then is truncated back."""
    try:
        start = date(int(year), int(month or 7), int(day or (15 if month else 1)))
        moved = start + timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    if not 1 <= moved.year <= 9999:
        return ""
    text = f"{moved.year:04d}"
    if month:
        text += f"{moved.month:02d}"
    if day:
        text += f"{moved.day:02d}"
    return text


def shift_da(value: str, days: int) -> str:
    """A DA value (``YYYYMMDD``, a ``A-B`` range, or the old ``YYYY.MM.DD``) moved by
    ``days``; ``""`` when it is not a date. ``shift_da("20200131", 1) == "20200201"``."""
    text = value.strip(" \x00")
    if not text:
        return ""
    if "-" in text:  # a range; either side may be open
        parts = text.split("-")
        if len(parts) != 2:
            return ""
        moved = [shift_da(part, days) if part else "" for part in parts]
        if any(part and not new for part, new in zip(parts, moved, strict=True)):
            return ""
        return "-".join(moved)
    old = _OLD_DA.match(text)
    match = _DA.match(text) if old is None else old
    if match is None or (old is None and len(text) != 8):
        return ""
    return _move(match[1], match[2], match[3], days)


def shift_dt(value: str, days: int) -> str:
    """A DT value moved by ``days``, its precision, time, fraction and UTC offset kept;
    ``""`` when it is not a date-time.
    ``shift_dt("20200131235959.5+0100", 1) == "20200201235959.5+0100"``."""
    text = value.strip(" \x00")
    if not text:
        return ""
    match = _DT.match(text)
    if match is None or (match[4] and not match[3]):
        return ""
    moved = _move(match[1], match[2], match[3], days)
    if not moved:
        return ""
    return moved + (match[4] or "") + (match[5] or "")


def shift_value(vr: str, value: str, days: int) -> str:
    """``shift_da`` or ``shift_dt`` by VR."""
    return shift_dt(value, days) if vr == "DT" else shift_da(value, days)


def typed_forms(value: str) -> list[str]:
    """The forms a DA (or a DT's date part) takes when people type it:
    ``YYYYMMDD``, ``YYYY-MM-DD``, ``YYYY/MM/DD``, ``YYYY.MM.DD``, ``DD.MM.YYYY``,
    ``DD/MM/YYYY``, ``DD-MM-YYYY``, ``MM/DD/YYYY``. Empty for anything but a full date."""
    text = value.strip(" \x00")[:8]
    if not re.fullmatch(r"\d{8}", text):
        return []
    y, m, d = text[:4], text[4:6], text[6:]
    return list(dict.fromkeys([f"{y}{m}{d}", f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{y}.{m}.{d}",
                               f"{d}.{m}.{y}", f"{d}/{m}/{y}", f"{d}-{m}-{y}",
                               f"{m}/{d}/{y}"]))
