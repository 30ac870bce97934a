"""Calibration text: plain text (one sample per line) or JSONL (``text``, ``title`` + ``text``, or ``query``)."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from ..errors import EffirError


class CalibrationError(EffirError):
    """Calibration data is missing, empty or unreadable."""


def read_calibration_texts(path: Path, samples: int, seed: int = 0) -> tuple[list[str], str]:
    """``samples`` texts drawn (seeded, without replacement) from ``path``, and a fingerprint of the
    file plus the selection. Uses every text when the file has fewer."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file '{path}' not found; pass --calibration FILE (text or JSONL)")
    texts = _parse(path)
    if not texts:
        raise CalibrationError(f"calibration file '{path}' has no text; give one passage per line (or JSONL with 'text')")
    chosen = sorted(random.Random(seed).sample(range(len(texts)), min(samples, len(texts))))
    digest = hashlib.sha256(path.read_bytes())
    digest.update(json.dumps(chosen).encode())
    return [texts[i] for i in chosen], digest.hexdigest()[:16]


def _parse(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    texts = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise CalibrationError(f"{path}:{number}: not valid JSON; use one JSON object per line") from None
        text = " ".join(str(row[k]) for k in ("title", "text") if row.get(k)) or str(row.get("query", ""))
        if text.strip():
            texts.append(text.strip())
    return texts
