"""Charts of messages per minute, drawn by the broker as SVG (no script, no library, nothing
from another origin: the page shows them as ``<img>`` under its strict CSP).

An SVG holds numbers and fixed words only: never an ident or a channel (those
are chosen by clients), so nothing in it can be markup a client wrote.
"""

from __future__ import annotations

from collections.abc import Sequence

SPARK = (120, 24)  # width, height of a sparkline (one hour)
WIDE = (720, 160)  # of a detail chart (24 hours)


def svg(counts: Sequence[int], *, wide: bool) -> str:
    """A line of ``counts`` (oldest first, one per minute), scaled to its largest value."""
    width, height = WIDE if wide else SPARK
    pad = 16 if wide else 1
    n = max(1, len(counts) - 1)
    top = max(counts, default=0) or 1
    inner_w, inner_h = width - 2 * pad, height - 2 * pad
    points = " ".join(
        f"{pad + inner_w * i / n:.1f},{pad + inner_h - inner_h * c / top:.1f}" for i, c in enumerate(counts)
    )
    total = sum(counts)
    minutes = len(counts)
    span = f"{minutes // 60} h" if minutes >= 120 else f"{minutes} min"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" data-total="{total}" data-max="{max(counts, default=0)}">',
        f"<title>{total} messages in the last {span} (per minute, at most {max(counts, default=0)})</title>",
        f'<rect width="{width}" height="{height}" fill="#f6f8fa"/>',
        f'<polyline fill="none" stroke="#0969da" stroke-width="{1.5 if wide else 1}" points="{points}"/>',
    ]
    if wide:
        parts.append(f'<text x="{pad}" y="12" font-size="11" font-family="sans-serif">max {top}/min</text>')
        parts.append(
            f'<text x="{width - pad}" y="{height - 3}" font-size="11" font-family="sans-serif" '
            f'text-anchor="end">now</text>'
        )
        parts.append(f'<text x="{pad}" y="{height - 3}" font-size="11" font-family="sans-serif">{span} ago</text>')
    parts.append("</svg>")
    return "".join(parts)
