"""Where a process's wall time went, from a `py-spy record --idle --threads -f raw` file.

cProfile doubles the cost of imports and misses time spent waiting on the GPU; py-spy samples the
wall clock from outside, so a sampled `sweep run` shows start-up, the loop and the report as they
really are. The raw format is one line per distinct stack: `thread (tid): name;frame;...;frame N`.

Prints, for the main thread: inclusive seconds of every project function (sweeps/, runners/,
core/, objectives/), and for the samples under each project function's own body the library they
were in (torch, importlib, sqlalchemy, ...), so "0.6 s in PackedRunner.add, 0.4 s of it peft" reads
directly. Usage: python bench/spy_summary.py spy.txt --rate 50 [--top 60]
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

PROJECT = re.compile(r"\((sweeps|runners|core|objectives|bench)/([\w/]+)\.py:\d+\)")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:]*):\d+\)$")


def parse(path: str) -> list[tuple[str, list[str], int]]:
    """(thread name, frames outermost first, samples) for every line of the raw file."""
    stacks = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.rstrip("\n")
        if not line:
            continue
        body, _, count = line.rpartition(" ")
        head, _, rest = body.partition(";")
        thread = head.split(":", 1)[1].strip() if ":" in head else head
        stacks.append((thread, rest.split(";") if rest else [], int(count)))
    return stacks


def label(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    file = match["file"]
    project = PROJECT.search(frame)
    where = f"{project[1]}/{project[2]}" if project else file.split("/")[0]
    return f"{where}:{match['func']}"


def library(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    file = match["file"]
    if file.startswith("<frozen importlib"):
        return "import"
    return file.split("/")[0].removesuffix(".py")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw")
    p.add_argument("--rate", type=float, default=50.0, help="py-spy's --rate (samples a second)")
    p.add_argument("--top", type=int, default=60)
    p.add_argument("--thread", default="MainThread")
    args = p.parse_args()

    stacks = [(frames, n) for thread, frames, n in parse(args.raw) if thread.startswith(args.thread)]
    total = sum(n for _, n in stacks)
    inclusive: collections.Counter[str] = collections.Counter()
    below: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for frames, n in stacks:
        seen = set()
        innermost = None
        for index, frame in enumerate(frames):
            if PROJECT.search(frame):
                name = label(frame)
                if name not in seen:
                    inclusive[name] += n
                    seen.add(name)
                innermost = index
        if innermost is not None:
            rest = frames[innermost + 1 :]
            kind = (
                "import"
                if any(f.startswith("_find_and_load") for f in rest)
                else (library(rest[0]) if rest else "(own code)")
            )
            below[label(frames[innermost])][kind] += n
    seconds = 1.0 / args.rate
    print(f"{args.thread}: {total} samples = {total * seconds:.1f} s")
    for name, n in inclusive.most_common(args.top):
        parts = ", ".join(f"{k} {v * seconds:.1f}" for k, v in below[name].most_common(4))
        print(f"{n * seconds:8.2f} s  {name}" + (f"   [own: {parts}]" if parts else ""))


if __name__ == "__main__":
    main()
