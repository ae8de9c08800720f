"""Move a checkpoint file to the GPU machine in pieces: the device tool carries at most 64 MiB per call and a
warm machine keeps /root between calls that follow each other closely.

    python benchmarks/stage_checkpoint.py split FILE .stage --chunk-mb 48     # here: .stage/part000, ... + manifest
    python benchmarks/stage_checkpoint.py append .stage/part003 /root/ckpt.bin # there, once per call, in order
    python benchmarks/stage_checkpoint.py verify /root/ckpt.bin .stage/manifest.json   # there: size + sha256

`append` refuses a piece out of order (it checks the destination's size against the manifest), so a call
repeated after a lost reply does not corrupt the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def split(source: Path, out: Path, chunk_mb: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    size, step, parts = source.stat().st_size, chunk_mb << 20, []
    with open(source, "rb") as f:
        for i in range(-(-size // step)):
            part = out / f"part{i:03d}"
            part.write_bytes(f.read(step))
            parts.append({"name": part.name, "offset": i * step, "bytes": part.stat().st_size})
    manifest = {"source": source.name, "bytes": size, "sha256": _sha256(source), "parts": parts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"{len(parts)} parts of <= {chunk_mb} MiB in {out}; sha256 {manifest['sha256']}")


def append(part: Path, dest: Path) -> None:
    manifest = json.loads((part.parent / "manifest.json").read_text())
    entry = next(p for p in manifest["parts"] if p["name"] == part.name)
    have = dest.stat().st_size if dest.exists() else 0
    if have == entry["offset"] + entry["bytes"]:
        print(f"{dest}: already holds {part.name}")
        return
    if have != entry["offset"]:
        sys.exit(f"{dest} has {have} bytes; {part.name} starts at {entry['offset']}: stage the parts in order")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "rb") as src, open(dest, "ab") as out:
        shutil.copyfileobj(src, out)
    print(f"{dest}: {dest.stat().st_size} of {manifest['bytes']} bytes")


def verify(dest: Path, manifest_path: Path) -> None:
    manifest = json.loads(manifest_path.read_text())
    if dest.stat().st_size != manifest["bytes"] or _sha256(dest) != manifest["sha256"]:
        sys.exit(f"{dest}: size or sha256 differs from {manifest_path}")
    print(f"{dest}: complete, sha256 {manifest['sha256']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("source", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--chunk-mb", type=int, default=48)
    a = sub.add_parser("append")
    a.add_argument("part", type=Path)
    a.add_argument("dest", type=Path)
    v = sub.add_parser("verify")
    v.add_argument("dest", type=Path)
    v.add_argument("manifest", type=Path)
    args = p.parse_args()
    if args.cmd == "split":
        split(args.source, args.out, args.chunk_mb)
    elif args.cmd == "append":
        append(args.part, args.dest)
    else:
        verify(args.dest, args.manifest)


if __name__ == "__main__":
    main()
