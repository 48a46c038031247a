"""Run every ``benchmarks/bench_*.py`` and collect its figures into bench-results.json.

Each benchmark module has ``run() -> list[dict]``; a row is
``{"name", "value", "unit"}`` plus, where the figure has one, ``"baseline"`` (measured
in the same run) and ``"ratio"`` (value / baseline).  ``make bench`` calls this.
Usage: ``python benchmarks/run_all.py [name-filter ...]``.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "bench-results.json"


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load benchmark {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def main(filters: list[str]) -> int:
    rows: list[dict[str, Any]] = []
    for path in sorted(HERE.glob("bench_*.py")):
        if filters and not any(f in path.stem for f in filters):
            continue
        print(f"== {path.stem}", flush=True)
        start = time.perf_counter()
        for row in _load(path).run():
            rows.append({"benchmark": path.stem, **row})
        print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)
    width = max((len(r["name"]) for r in rows), default=10)
    print(f"\n{'figure':<{width}}  {'value':>12}  {'unit':<14} {'baseline':>12}  {'ratio':>8}")
    for r in rows:
        print(f"{r['name']:<{width}}  {_fmt(r['value']):>12}  {r.get('unit', ''):<14} "
              f"{_fmt(r.get('baseline')):>12}  {_fmt(r.get('ratio')):>8}")
    RESULTS.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "figures": rows,
    }, indent=2))
    print(f"\nwritten: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
