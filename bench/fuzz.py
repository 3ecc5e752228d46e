"""Mutation-fuzz every sealed artifact kind: ``python bench/fuzz.py --cases 100000 --seed 1``.

Prints the counts that ``docs/security.md`` (section Fuzzing) reports: cases by mutation class and by
artifact kind, refusals, exceptions by type, mutants accepted with identical content, bugs (any
exception that is not a ``ModelsealError``, any accepted change, any case past its time bound), the
slowest case and the process's peak RSS. Each load runs under a time bound (SIGALRM) and an
address-space bound (RLIMIT_AS: current size + ``--memory-bound``): a hang or a big allocation is a
bug. Exit status 1 if there was a bug. ``--json`` writes the report as JSON (``tests/test_fuzz.py``
runs this script that way). Each case ``i`` of seed ``s`` reruns alone: ``--seed s --first i --cases 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("MODELSEAL_THREADS", "1")  # one core: small files, and the CI budget is 2 cores

from fuzzlib import MUTATIONS, Report, build_corpus, run


def _table(report: Report) -> str:
    lines = [f"{'mutation class':<16}{'cases':>10}{'refused':>10}{'bugs':>6}"]
    for op in MUTATIONS:
        if report.by_class[op]:
            lines.append(f"{op:<16}{report.by_class[op]:>10}{report.refused[op]:>10}{report.bugs_by_class[op]:>6}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--first", type=int, default=0, help="index of the first case (to rerun one case)")
    ap.add_argument("--kinds", default="", help="subset, e.g. public,hidden,signed,mlkem,onnx,torchscript,dir")
    ap.add_argument("--time-bound", type=float, default=10.0, help="seconds a case may take before it is a hang")
    ap.add_argument("--memory-bound", type=int, default=512, help="MiB a load may add to the address space")
    ap.add_argument("--json", type=Path, help="also write the report here")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    kinds = tuple(k for k in args.kinds.split(",") if k) or None
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="modelseal-fuzz-", dir=args.work) as tmp:
        work = Path(tmp)
        targets = build_corpus(work / "corpus", kinds)
        (work / "cases").mkdir()

        def progress(r: Report) -> None:
            print(f"  {r.cases} cases, {len(r.bugs)} bugs", file=sys.stderr, flush=True)

        report = run(
            targets,
            args.cases,
            args.seed,
            work / "cases",
            time_bound_s=args.time_bound,
            memory_mib=args.memory_bound,
            progress=progress,
            first=args.first,
        )
    print(
        f"seed {args.seed}, cases {args.first}..{args.first + report.cases - 1}, kinds: "
        f"{', '.join(f'{k} {n}' for k, n in sorted(report.by_kind.items()))}"
    )
    print(_table(report))
    print(
        f"total: {report.cases} cases, {sum(report.refused.values())} refused with a ModelsealError, "
        f"{report.accepted_identical} accepted with identical content, {report.accepted_relabelled} re-MACed "
        f"and accepted with identical bytes (relabelled by the key holder), {len(report.bugs)} bugs"
    )
    print("exceptions by type: " + ", ".join(f"{k} {v}" for k, v in report.exceptions.most_common()))
    print(
        f"slowest case {report.slowest_s:.3f} s, {report.seconds:.0f} s in all, peak RSS {report.peak_rss_mib:.0f} MiB"
    )
    for bug in report.bugs[:50]:
        print("BUG", json.dumps(bug))
    for err in report.harness_errors[:20]:
        print("HARNESS ERROR (mutant not built, case not counted)", err)
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=1))
    return 1 if report.bugs or report.harness_errors else 0


if __name__ == "__main__":
    sys.exit(main())
