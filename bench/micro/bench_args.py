"""Command-line options shared by the bank micro-benchmarks: the MLP's shapes and the ReMix bank's."""

from __future__ import annotations

import argparse


def add_bank_args(ap: argparse.ArgumentParser, hidden: int, intermediate: int, rank: int) -> None:
    """--hidden, --intermediate (the base MLP), --loras, --top-k, --rank (the bank: n, k, r)."""
    ap.add_argument("--hidden", type=int, default=hidden)
    ap.add_argument("--intermediate", type=int, default=intermediate)
    ap.add_argument("--loras", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=rank)
