"""Small helpers shared by the benchmark scripts: device sync, wall-clock timing, bandwidth, tables."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def wall(fn, device) -> tuple[float, object]:
    """(seconds, result) of one call, with the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def copy_bandwidth(device: torch.device | str, nbytes: int = 2 << 30, iters: int = 10) -> float:
    """Bytes/s of a big device-to-device copy, counting bytes read plus bytes written (the roofline's rate)."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = min(nbytes, 256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds, _ = wall(lambda: [dst.copy_(src) for _ in range(iters)], device)
    del src, dst
    return 2 * nbytes * iters / seconds


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """columns: (key, format spec) pairs; missing values print as '-'."""
    def cell(row, key, spec):
        value = row.get(key)
        return "-" if value is None else format(value, spec) if spec else str(value)

    cells = [[cell(r, k, s) for k, s in columns] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) if cells else len(k) for i, (k, _) in enumerate(columns)]
    print("  ".join(k.rjust(w) for (k, _), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def write_json(path: str | Path | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")
