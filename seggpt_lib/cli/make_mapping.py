"""`seggpt make-mapping`: command-line arguments -> library call."""
from __future__ import annotations

import argparse
import json
import sys

from seggpt_lib.eval.mapping import KINDS, build_mapping, save_mapping


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queries", required=True, metavar="DIR",
                        help="query dataset root (images/, labels/, classes.csv)")
    parser.add_argument("--prompts", metavar="DIR",
                        help="prompt dataset root (default: the query root)")
    parser.add_argument("--kind", required=True, choices=KINDS, help="which mapping to build")
    parser.add_argument("--k", type=int, default=1, help="prompts per query (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--same-class", action="store_true",
                        help="retrieval only: restrict candidates to the query's class")
    parser.add_argument("--out", metavar="FILE.json",
                        help="output JSON (default: print to stdout)")


def run(args: argparse.Namespace) -> int:
    prompts = args.prompts or args.queries
    try:
        mapping = build_mapping(args.queries, prompts, args.kind, k=args.k, seed=args.seed,
                                same_class=args.same_class)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out and args.out != "-":
        save_mapping(mapping, args.out)
        print(f"wrote {len(mapping)} {args.kind} pairs (k={args.k}, seed={args.seed}) to {args.out}",
              file=sys.stderr)
    else:
        sys.stdout.write(json.dumps(mapping, indent=2, sort_keys=True) + "\n")
    return 0
