"""Results: a short table on stdout, everything (per-item results too) as JSON."""

import json
import math
from pathlib import Path
from typing import Any


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    rows = [("task", result["task"]), *result["summary"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {_cell(v)}" for k, v in rows)


def write_json(result: dict[str, Any], path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # NaN (alpha_draft without drafts) is written as null: strict JSON readers reject NaN
        path.write_text(json.dumps(_no_nan(result), indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot write {path} ({e.strerror or e})") from e


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value
