"""`seggpt make-mapping`: command-line arguments -> library call.

``--out`` follows :mod:`seggpt_lib.utils.outputs`: never inside (or equal to) ``--queries`` or
``--prompts``, never over an existing file without ``--overwrite``, written aside and renamed
into place (a failure leaves no file)."""
from __future__ import annotations

import argparse
import json
import sys

from seggpt_lib.eval.mapping import KINDS, build_mapping
from seggpt_lib.utils.outputs import OutputError, check_output, output_file


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
                        help="output JSON (default: print to stdout); not inside --queries / --prompts")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    prompts = args.prompts or args.queries
    to_file = bool(args.out) and args.out != "-"
    inputs = {"--queries": args.queries, "--prompts": args.prompts}
    try:
        if to_file:
            check_output(args.out, inputs, what="--out", overwrite=args.overwrite, folder=False)
        mapping = build_mapping(args.queries, prompts, args.kind, k=args.k, seed=args.seed,
                                same_class=args.same_class)
        if to_file:
            with output_file(args.out, inputs, what="--out", overwrite=args.overwrite) as tmp:
                tmp.write_text(json.dumps(mapping, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except (OutputError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if to_file:
        print(f"wrote {len(mapping)} {args.kind} pairs (k={args.k}, seed={args.seed}) to {args.out}",
              file=sys.stderr)
    else:
        sys.stdout.write(json.dumps(mapping, indent=2, sort_keys=True) + "\n")
    return 0
