"""Pick the wheels a GPU machine needs for benchmarks/gpu_suite.sh from the lock (uv.lock, exported).

A GPU machine may hold torch and torchvision and nothing else of ours, and it reaches no package
index. This reads uv.lock as `uv export` writes it in requirements format (hashes and "# via"
lines), and writes a hash-pinned requirements file (the lock's own lines and hashes, markers
evaluated for the GPU machine's Python) that `pip download` turns into a wheel folder:

    uv export --frozen --extra dev --no-default-groups --no-emit-project -o .wheels/lock.txt
    python benchmarks/gpu_wheels.py --lock .wheels/lock.txt > .wheels/requirements.txt   # the suite's closure
    python benchmarks/gpu_wheels.py --lock .wheels/lock.txt --profile lock                # the whole lock, for sizing

`benchmarks/make_gpu_wheels.sh` runs both steps. Never listed: torch, torchvision, triton, nvidia-*
and cuda-* (the GPU machine's own builds stay). Profiles:

* ``suite`` (default): what the centralized core and the CUDA tests import (omegaconf, pyyaml, rich,
  matplotlib, numpy, pytest) and their dependencies in the lock, minus ``--skip`` (default: numba and
  llvmlite, optional and 50 MB; the GPU selector is the batched torch backend).
* ``lock``: every package of the lock for that Python (flwr, ray, ...): only to measure its size.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from packaging.markers import Marker


EXCLUDED = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
SUITE_ROOTS = ("omegaconf", "pyyaml", "rich", "matplotlib", "numpy", "pytest")
DEFAULT_SKIP = ("numba", "llvmlite")


def parse_lock(text: str) -> list[dict]:
    """Blocks of the uv lock: name, the requirement line(s) with hashes, its marker, who needs it."""
    blocks, current = [], None
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            head = line.rstrip(" \\")
            spec, _, marker = head.partition(";")
            current = {"name": spec.split("==")[0].strip().lower(), "spec": spec.strip(),
                       "marker": marker.strip() or None, "hashes": [], "via": []}
            blocks.append(current)
        elif current is not None and line.strip().startswith("--hash="):
            current["hashes"].append(line.strip().rstrip(" \\"))
        elif current is not None and line.strip().startswith("#"):
            words = line.strip("# ").split()
            if words and words[0] == "via":
                words = words[1:]
            current["via"] += [w.lower() for w in words if not w.startswith(("-r", "pyproject"))]
    return blocks


def applies(block: dict, python: str) -> bool:
    if block["marker"] is None:
        return True
    env = {"python_full_version": python, "python_version": ".".join(python.split(".")[:2]),
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}
    return Marker(block["marker"]).evaluate(env)


def select(blocks: list[dict], profile: str, skip: set[str]) -> list[dict]:
    if profile == "lock":
        chosen = {b["name"] for b in blocks}
    else:  # the closure of the roots: a package is needed when one that needs it is
        chosen = set(SUITE_ROOTS)
        grew = True
        while grew:
            grew = False
            for b in blocks:
                if b["name"] not in chosen and b["name"] not in skip and any(v in chosen for v in b["via"]):
                    chosen.add(b["name"])
                    grew = True
    return [b for b in blocks if b["name"] in chosen and b["name"] not in skip and not EXCLUDED.match(b["name"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["suite", "lock"], default="suite")
    parser.add_argument("--python", default="3.12.3", help="the GPU machine's Python (markers are evaluated for it)")
    parser.add_argument("--skip", default=",".join(DEFAULT_SKIP), help="comma-separated names left out")
    parser.add_argument("--lock", required=True,
                        help="uv.lock exported: uv export --frozen --extra dev --no-default-groups --no-emit-project")
    args = parser.parse_args()
    skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}
    blocks = [b for b in parse_lock(Path(args.lock).read_text()) if applies(b, args.python)]
    chosen = select(blocks, args.profile, skip)
    print(f"# {args.profile} profile of uv.lock for Python {args.python}; "
          f"written by benchmarks/gpu_wheels.py ({len(chosen)} packages)")
    for b in chosen:
        print(" \\\n    ".join([b["spec"]] + b["hashes"]))
    print(f"gpu_wheels: {len(chosen)} packages: {' '.join(b['spec'] for b in chosen)}", file=sys.stderr)


if __name__ == "__main__":
    main()
