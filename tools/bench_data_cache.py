#!/usr/bin/env python
"""Time loading a few-shot split by decoding the archive vs from the uint8 cache.

Usage (defaults to the real Tiny ImageNet subset in ../shared/data, train split):
    .venv/bin/python tools/bench_data_cache.py [DATASET] [--archive PATH] [--split train] [--repeats 3]
Same as ``fsl-bench data bench``.
"""
import sys
from pathlib import Path

from fsl_lsskd.data.cli import bench_cmd

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        args = ["tiny_imagenet"] + args
    if "--archive" not in args and "--data-root" not in args and args[0] == "tiny_imagenet":
        args += ["--archive", str(Path(__file__).resolve().parents[2] / "shared/data/tiny-imagenet-200-sub100.zip")]
    bench_cmd.main(args=args, prog_name="bench_data_cache.py")
