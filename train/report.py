"""Rebuild a comparison report from a run's result files, or merge runs of one comparison with other seeds.

    python train/report.py runs/cmp                                   # what is done, naming what is missing
    python train/report.py --merge runs/cmp runs/cmp_more_seeds --output runs/cmp_all

The tables and plots are train/experiments/reporting.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backbone_router.train.experiments.reporting import load_run, merge_runs, write_report
from backbone_router.train.training.errors import RunError


def main(argv: list[str] | None = None) -> int:
    """``report.py RUN`` rebuilds a run's report; ``report.py --merge RUN RUN ... --output DIR`` joins seeds."""
    parser = argparse.ArgumentParser(description="Rebuild a comparison report, or merge runs with other seeds.")
    parser.add_argument("run", nargs="?", help="a finished train/compare.py output dir (rebuilt in place)")
    parser.add_argument("--merge", nargs="+", default=None, help="runs of the same comparison with disjoint seeds")
    parser.add_argument("--output", default=None, help="with --merge: where the merged report is written")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if (args.run is None) == (args.merge is None) or (args.merge is not None) != (args.output is not None):
        parser.print_usage(sys.stderr)
        print("report: give either RUN, or --merge RUN RUN ... --output DIR", file=sys.stderr)
        return 2
    try:
        if args.merge:
            rows, gate_rows, sweep_rows, ablation_rows, meta = merge_runs([Path(r) for r in args.merge])
            out = Path(args.output)
        else:
            rows, gate_rows, sweep_rows, ablation_rows, meta = load_run(Path(args.run))
            out = Path(args.run)
    except (FileNotFoundError, ValueError, RunError) as e:  # e.g. a truncated results/<variant>/seed_<n>.json
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_report(out, rows, gate_rows, sweep_rows, meta, ablation_rows)
    print(Path(paths["md"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
