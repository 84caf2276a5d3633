"""How budgetguard writes dollars: to the cent from a dollar up, three significant digits below.

One rule for every place a cost is shown (errors, reports, ``budgetguard status``, alerts),
so a cheap call is never written ``$0.0000``. (The demo alone prints six places, to show a
day's total move by each call.)
"""

from __future__ import annotations

import math

__all__ = ["format_usd"]


def format_usd(value: float) -> str:
    """``$1,234.56``; below a dollar, three significant digits (``$0.0123``, ``$0.0000375``).

    Example:
        >>> format_usd(0.0000375), format_usd(0.05), format_usd(1234.5)
        ('$0.0000375', '$0.05', '$1,234.50')
    """
    if value == 0 or abs(value) >= 1 or not math.isfinite(value):
        return f"-${-value:,.2f}" if value < 0 else f"${value:,.2f}"
    places = 2 - math.floor(math.log10(abs(value)))  # the third significant digit
    whole, _, fraction = f"{value:.{max(places, 2)}f}".partition(".")
    fraction = fraction.rstrip("0").ljust(2, "0")
    return f"-${whole.lstrip('-')}.{fraction}" if value < 0 else f"${whole}.{fraction}"
