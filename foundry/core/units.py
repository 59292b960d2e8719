"""Numbers for people: counts and byte sizes in short units."""

from __future__ import annotations


def human_count(n: float) -> str:
    """12_345_678 -> '12.3M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{1 if n / scale < 100 else 0}f}{unit}"
    return str(int(n)) if float(n).is_integer() else f"{n:.3g}"


def human_bytes(n: float) -> str:
    """Bytes in binary units: 1.5 GiB."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def human_duration(seconds: float) -> str:
    """12 -> '12s', 754 -> '12m34s', 7384 -> '2h03m'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
