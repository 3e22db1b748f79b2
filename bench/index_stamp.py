"""Cost of checking a cached dataset index against its file, on one big JSONL file: the stat stamp
the index cache uses (size, mtime, ctime, inode: one ``stat``) against hashing the whole content.

    python bench/index_stamp.py              # a 1 GiB file in --work
    python bench/index_stamp.py --mib 8      # the CI version (bench/smoke.py)
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine, table  # noqa: E402

from gdt_tune.runtime.files import file_stamp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--work", default="/tmp/gdt_bench_stamp")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "big.jsonl"
    line = b'{"instruction": "' + b"x" * 4000 + b'", "answer": "y"}\n'
    with open(path, "wb") as f:
        for _ in range(args.mib * 2**20 // len(line) + 1):
            f.write(line)
    size = path.stat().st_size
    stamps = []
    for _ in range(1000):
        t = time.perf_counter()
        file_stamp(path)
        stamps.append(time.perf_counter() - t)
    t = time.perf_counter()
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(16 * 2**20):
            h.update(block)
    full = time.perf_counter() - t
    stamp = statistics.median(stamps)
    print(f"machine: {machine()}\ncommand: `{command_line()}`\nfile: {size / 2**20:.0f} MiB (page cache warm)\n")
    print(table(["check", "seconds per file", "bytes read"],
                [["stat stamp (the cache's check)", f"{stamp:.2e}", "0"],
                 ["BLAKE2b of the whole file", f"{full:.3f}", f"{size}"]]))
    print(f"\nfull hash / stamp: {full / stamp:.0f}x")
    path.unlink()


if __name__ == "__main__":
    main()
