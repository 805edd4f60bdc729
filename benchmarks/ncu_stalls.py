"""Where a kernel's warps wait, instruction by instruction, from Nsight Compute's sampling (no GPU
needed).

Reads the CSV that `ncu -i REPORT --page source --csv --print-source sass` prints for a report
taken with `--section SourceCounters` (ncu samples each warp's state at a fixed interval and
charges the sample to the warp's next instruction), plain or xz-compressed, and prints markdown:

- the share of all samples by stall reason (ncu's `stall_*` columns; "selected" is a warp
  issuing, the rest are reasons for not issuing). Some reasons have no column in the CSV (on an
  H200, most samples of the wgmma instructions): those samples are counted as "other";
- the code regions: runs of instructions that drew samples, split where `--gap` or more
  instructions in a row drew none, with the warp instructions each region executed. A kernel's
  loops and its warp roles' code (a producer's loop, a consumer's main loop, an epilogue) usually
  fall into separate regions; a region's executed count over its loop's trip count is the
  instructions a warp runs per trip (how a producer's slower build was found to run 61 more a
  k-block);
- the instructions that drew the most samples, with their leading reasons and how often they ran.

An instruction is named by its index in the listing, so that two builds' listings can be read
side by side (addresses move between runs). Example (docs/performance.md, 2026-12-04):

    ncu --nvtx --nvtx-include "last/" --kernel-name regex:WgNarrow --launch-skip 1 \\
        --launch-count 1 --section SourceCounters --import-source no -o q32p2 \\
        python benchmarks/gpu_one_call.py Qwen 32 bfloat16 2
    ncu -i q32p2.ncu-rep --page source --csv --print-source sass > q32p2_sass.csv
    python benchmarks/ncu_stalls.py q32p2_sass.csv --top 15
"""

import argparse
import csv
import io
import lzma
import sys
from dataclasses import dataclass, field

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
_REASON = "stall_"
_NOT_ISSUED = "(Not Issued)"
OTHER = "other"  # samples of reasons the CSV has no column for


@dataclass
class Instruction:
    index: int  # position in the listing
    source: str  # the SASS text
    samples: float
    executed: float
    reasons: dict = field(default_factory=dict)  # reason (without "stall_", or OTHER) -> samples


@dataclass
class Listing:
    kernel: str
    instructions: list

    @property
    def total(self) -> float:
        return sum(i.samples for i in self.instructions)


def _number(text: str) -> float:
    text = text.strip().replace(",", "")
    try:
        return float(text)
    except ValueError:  # "-", "", "n/a"
        return 0.0


def parse(text: str) -> Listing:
    """The listing of one kernel: ncu's first line names it, the second is the header."""
    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) < 2 or not rows[0] or rows[0][0] != "Kernel Name":
        raise ValueError("not the CSV of `ncu --page source --csv` (its first line names the kernel)")
    kernel = rows[0][1] if len(rows[0]) > 1 else ""
    header = rows[1]
    where = {name: i for i, name in enumerate(header)}
    for needed in ("Source", SAMPLES, EXECUTED):
        if needed not in where:
            raise ValueError(f"the CSV has no column {needed!r}: was the report taken with "
                             "--section SourceCounters?")
    reasons = [(name[len(_REASON):], i) for i, name in enumerate(header)
               if name.startswith(_REASON) and _NOT_ISSUED not in name]
    instructions = []
    for row in rows[2:]:
        if len(row) < len(header):
            continue  # a trailing blank line
        index = len(instructions)
        samples = _number(row[where[SAMPLES]])
        by_reason = {name: v for name, i in reasons if (v := _number(row[i]))}
        if (rest := samples - sum(by_reason.values())) > 0:
            by_reason[OTHER] = rest
        instructions.append(Instruction(index=index, source=row[where["Source"]].strip(),
                                        samples=samples, executed=_number(row[where[EXECUTED]]),
                                        reasons=by_reason))
    return Listing(kernel, instructions)


def read(path: str) -> Listing:
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return parse(f.read())


def reason_shares(listing: Listing) -> dict:
    """Stall reason -> share of all samples (%), largest first."""
    total = listing.total or 1.0
    sums = {}
    for ins in listing.instructions:
        for name, v in ins.reasons.items():
            sums[name] = sums.get(name, 0.0) + v
    return {k: 100.0 * v / total for k, v in sorted(sums.items(), key=lambda kv: -kv[1])}


def regions(listing: Listing, gap: int) -> list:
    """(first index, last index, share of samples %, warp instructions executed) of each run of
    sampled instructions; a run ends where `gap` or more instructions in a row drew no sample."""
    total = listing.total or 1.0
    spans, start, last = [], None, None
    for ins in listing.instructions:
        if not ins.samples:
            continue
        if start is not None and ins.index - last > gap:
            spans.append((start, last))
            start = None
        if start is None:
            start = ins.index
        last = ins.index
    if start is not None:
        spans.append((start, last))
    out = []
    for a, b in spans:
        run = listing.instructions[a:b + 1]  # an instruction's index is its position
        out.append((a, b, 100.0 * sum(i.samples for i in run) / total, sum(i.executed for i in run)))
    return out


def top(listing: Listing, n: int) -> list:
    return sorted(listing.instructions, key=lambda i: -i.samples)[:n]


def report(listing: Listing, top_n: int = 20, gap: int = 30, min_region: float = 0.5) -> str:
    total = listing.total
    lines = [f"# {listing.kernel}", "",
             f"{int(total)} samples over {len(listing.instructions)} instructions.", "",
             "| stall reason | share of samples |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f}% |" for k, v in reason_shares(listing).items() if v >= 0.05]
    lines += ["", f"Regions (runs of sampled instructions; {gap}+ unsampled ones end a run; "
              f"those under {min_region}% left out):", "",
              "| instructions | share | executed | first instruction |", "| --- | --- | --- | --- |"]
    for a, b, share, executed in regions(listing, gap):
        if share >= min_region:
            lines.append(f"| {a}-{b} | {share:.1f}% | {int(executed)} | `{listing.instructions[a].source}` |")
    lines += ["", "| instruction | share | executed | leading reasons | SASS |",
              "| --- | --- | --- | --- | --- |"]
    for ins in top(listing, top_n):
        lead = sorted(ins.reasons.items(), key=lambda kv: -kv[1])[:3]
        why = ", ".join(f"{k} {100.0 * v / (total or 1.0):.1f}%" for k, v in lead)
        lines.append(f"| {ins.index} | {100.0 * ins.samples / (total or 1.0):.1f}% | "
                     f"{int(ins.executed)} | {why} | `{ins.source}` |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="ncu's source page as CSV (.xz read as compressed)")
    ap.add_argument("--top", type=int, default=20, help="instructions to list (default 20)")
    ap.add_argument("--gap", type=int, default=30,
                    help="unsampled instructions in a row that end a region (default 30)")
    args = ap.parse_args(argv)
    if args.top < 0 or args.gap < 1:
        ap.error("--top must be >= 0 and --gap >= 1")
    try:
        listing = read(args.csv)
    except (OSError, ValueError) as e:
        print(f"ncu_stalls: {args.csv}: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(report(listing, args.top, args.gap))
    return 0


if __name__ == "__main__":
    sys.exit(main())
