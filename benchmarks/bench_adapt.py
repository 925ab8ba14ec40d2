"""A converted and adapted pretrained model: conversion parity, decode speed against Hugging Face.

The code lives in ``modlm/bench/adapt.py``;
also ``modlm bench adapt``. Options: ``--help``."""

import sys

from modlm.bench.adapt import main
from modlm.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main, prog="bench_adapt.py"))  # a mistake: one line, exit 2
