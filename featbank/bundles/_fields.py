"""Type checks of a manifest's fields, with messages that name the file and the field, and the one
rule for a file name inside a bundle."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import BundleError

__all__ = ["FieldReader", "check_file_name", "shown"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message quotes a file's value, never all of a huge one."""
    if isinstance(value, (list, tuple, dict)) and len(value) > limit:  # no repr of a million entries to cut
        return f"<{type(value).__name__} of {len(value)} entries>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class FieldReader:
    """Type checks with messages naming the manifest file and the field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, name: str, want: str, value: Any) -> BundleError:
        return BundleError(
            f"{self.source!r}: field {name!r} must be {want}; got {shown(value)}. The bundle is corrupt or was not "
            "written by featbank; re-create it."
        )

    def _checked(self, obj: Mapping[str, Any], key: str, prefix: str, required: bool, ok: Any, want: str) -> Any:
        """``obj[key]`` if ``ok(value)``; None where it is absent and not ``required``; else the field's error."""
        value = obj.get(key)
        if value is None and not required:
            return None
        if not ok(value):
            raise self.fail(prefix + key, want, value)
        return value

    def section(self, obj: Mapping[str, Any], key: str, prefix: str = "", required: bool = True) -> dict | None:
        return self._checked(obj, key, prefix, required, lambda v: isinstance(v, dict), "an object")

    def text(self, obj: Mapping[str, Any], key: str, prefix: str = "", required: bool = True) -> str | None:
        return self._checked(obj, key, prefix, required, lambda v: isinstance(v, str) and bool(v), "a non-empty string")

    def sha(self, obj: Mapping[str, Any], key: str, prefix: str = "") -> str | None:
        return self._checked(obj, key, prefix, False, lambda v: isinstance(v, str) and bool(_SHA256.match(v)),
                             "a sha256 (64 lowercase hex digits)")

    def positive_int(self, obj: Mapping[str, Any], key: str, prefix: str = "", required: bool = False) -> int | None:
        return self._checked(obj, key, prefix, required,
                             lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")

    def number(self, obj: Mapping[str, Any], key: str, prefix: str, lo: float, hi: float) -> float:
        """A finite number in ``[lo, hi]`` (a JSON integer beyond any float is refused, not an OverflowError)."""
        value = obj.get(key)
        try:
            x = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        except OverflowError:
            x = math.nan
        if not math.isfinite(x) or not lo <= x <= hi:
            raise self.fail(prefix + key, f"a finite number in [{lo:g}, {hi:g}]", value)
        return x

    def file_name(self, obj: Mapping[str, Any], key: str, prefix: str) -> str:
        value = self.text(obj, key, prefix)
        try:
            return check_file_name(value)  # type: ignore[arg-type]
        except BundleError as e:
            raise BundleError(f"{self.source!r}: field {prefix + key!r}: {e}") from None


def check_file_name(name: str) -> str:
    """``name`` if it is a bare file name (no folder part, not absolute, not ``.``/``..``).

    Raises:
        BundleError: anything that could point outside the bundle folder.
    """
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or Path(name).is_absolute() or Path(name).name != name):
        raise BundleError(
            f"file name {name!r} is not a bare file name inside the bundle (no folders, no '..', no absolute "
            "paths); refusing to open it."
        )
    return name
