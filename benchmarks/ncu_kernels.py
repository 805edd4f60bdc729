"""Per-kernel Nsight Compute metrics of two or more runs, side by side (no GPU needed).

Reads the text ncu prints (a block per kernel launch: the kernel's signature line, then tables of
metric name, unit and value: the "Command line profiler metrics" of `--metrics ...`, or the
tables of `--section ...`, whose names are words, such as "DRAM Throughput"), for example of
`benchmarks/gpu_one_call.py` under two builds of the library, and prints a markdown table with a
row per launch in launch order: each run's value of each metric (durations in µs, byte counts in
MB) and its speed against the first run (the first run's duration over its own: above 1.00x it
is faster). A section table's "Duration" stands for gpu__time_duration.sum; a name found in two
sections of one launch (ncu's "Memory Throughput": % and Tbyte/s) keeps the later value. ncu
prints 3 significant digits in its automatic units (1.02 ms); its `--print-units base` prints
base units (not tried here).

    python benchmarks/ncu_kernels.py committed=a.txt build=b.txt \\
        [--metrics "dram__throughput.avg.pct_of_peak_sustained_elapsed,DRAM Throughput,..."]
"""

import argparse
import re
import sys

DURATION = "gpu__time_duration.sum"
SECTION_DURATION = "Duration"
_HEADER = re.compile(r"^  (\S.*) \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\), Context \d+, Stream \d+")
_RULE = re.compile(r"^ +-+ -+ -+$")  # above, below and under the header of a metrics table
_NUMBER = re.compile(r"^([-+]?[\d,]*\.?\d+|n/a)$")
_TO_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
          "s": 1e6, "second": 1e6}
_TO_MB = {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3, "Tbyte": 1e6}


def kernel_name(signature: str) -> str:
    """'void ns::Kernel<a, b>(args)' -> 'Kernel<a, b>'; template arguments over 40 characters
    (CUTLASS's) are left out, and a CUTLASS GEMM's tile, stages and cluster (gemm_config) shown
    in their place."""
    head = signature.split("(", 1)[0].strip()
    if head.startswith("void "):
        head = head[5:]
    base, _, args = head.partition("<")
    base = base.rsplit("::", 1)[-1]
    args = "<" + args if args else ""
    if len(args) <= 40:
        return base + args
    config = gemm_config(head)
    return f"{base} ({config})" if config else base


_C = r"(?:cute::)?C<(\d+)>"
_SHAPE = rf"(?:cute::)?tuple<{_C}, {_C}, {_C}>"
# Hopper: CollectiveMma<MainloopSm90...<stages, cluster shape, schedule>, tile shape, ...>
_SM90 = re.compile(rf"MainloopSm90\w*<(\d+), {_SHAPE}, [\w:]+>, {_SHAPE}")
# Ampere: MmaMultistage<GemmShape<tile>, iterators and cache ops of A and B, element, layout,
#   MmaPolicy<...>, stages, ...>
_SM80 = re.compile(r"MmaMultistage<GemmShape<(\d+), (\d+), (\d+)>")


def _closing(text: str, i: int) -> int:
    """Index of the '>' that closes the '<' at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"<": 1, ">": -1}.get(text[j], 0)
        if depth == 0:
            return j
    return -1


def gemm_config(name: str):
    """A CUTLASS GEMM kernel's tile (M x N x K), stages and cluster, read from its template
    arguments ('128x16x64, 12 stages'; '256x128x64, 4 stages, 2x1x1 cluster'; Ampere's kernels
    'SM80 64x128x64, 4 stages'); None for others."""
    m = _SM90.search(name)
    if m:
        stages, cluster, tile = m.group(1), m.groups()[1:4], m.groups()[4:7]
        text = f"{'x'.join(tile)}, {stages} stages"
        return text if cluster == ("1", "1", "1") else f"{text}, {'x'.join(cluster)} cluster"
    m = _SM80.search(name)
    if m:
        text = "x".join(m.groups())
        policy = name.find("MmaPolicy<", m.end())
        end = _closing(name, name.find("<", policy)) if policy >= 0 else -1
        stages = re.match(r", (\d+),", name[end + 1:]) if end >= 0 else None
        return f"SM80 {text}, {stages.group(1)} stages" if stages else f"SM80 {text}"
    return None


def _value(unit: str, text: str):
    """A metric's value: times in µs, bytes in MB (also per block or per second: ncu scales each
    value's unit on its own), other units as printed; None for n/a."""
    if text == "n/a":
        return None
    v = float(text.replace(",", ""))
    amount = unit.split("/")[0]  # Kbyte of Kbyte/block
    if unit in _TO_US:
        return v * _TO_US[unit]
    return v * _TO_MB[amount] if amount in _TO_MB else v


def parse(text: str) -> list:
    """The launches in `text`, in order: dicts with 'kernel' and each metric's value. A table's
    rows are cut where the rule's unit column starts, so names may hold spaces."""
    launches = []
    unit_col = None  # where the unit column starts in the table whose rows are being read
    after_header = False
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            launches.append({"kernel": kernel_name(m.group(1))})
            unit_col, after_header = None, False
            continue
        if _RULE.match(line):
            if after_header:  # the rule under the header: the rows follow
                starts = [i for i in range(1, len(line)) if line[i] == "-" and line[i - 1] == " "]
                unit_col = starts[1]
            else:  # the rule above the header, or the table's end
                unit_col = None
            after_header = False
            continue
        if unit_col is None:
            after_header = line.split() == ["Metric", "Name", "Metric", "Unit", "Metric", "Value"]
            continue
        name, rest = line[:unit_col].strip(), line[unit_col:].split()
        # the value is the last word: ncu may write a flag before it, as in "(!) n/a"
        if launches and name and rest and _NUMBER.match(rest[-1]):
            launches[-1][name] = _value(" ".join(rest[:-1]), rest[-1])
    for launch in launches:
        if DURATION not in launch and SECTION_DURATION in launch:
            launch[DURATION] = launch[SECTION_DURATION]
    return launches


def _cell(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def table(runs: list, metrics: list) -> str:
    """Markdown table of runs [(label, launches)]; `metrics` after the duration."""
    first = runs[0][0]
    cols = ["#", "kernel"]
    for label, _ in runs:
        cols.append(f"{label} µs")
        cols += [f"{label} {m}" for m in metrics]
    cols += [f"{label} vs {first}" for label, _ in runs[1:]]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for i in range(max(len(launches) for _, launches in runs)):
        row = [str(i + 1)]
        names = {launches[i]["kernel"] for _, launches in runs if i < len(launches)}
        row.append(" / ".join(sorted(names)))
        times = []
        for _, launches in runs:
            got = launches[i] if i < len(launches) else {}
            times.append(got.get(DURATION))
            row.append(_cell(got.get(DURATION)))
            row += [_cell(got.get(m)) for m in metrics]
        for t in times[1:]:
            row.append(f"{times[0] / t:.2f}x" if t and times[0] else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=FILE", help="ncu text output of one run")
    ap.add_argument("--metrics", default="", help="comma-separated metrics to show after the duration")
    args = ap.parse_args(argv)
    runs = []
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            ap.error(f"{spec!r}: expected LABEL=FILE")
        with open(path) as f:
            launches = parse(f.read())
        if not launches:
            ap.error(f"{path}: no kernel launches with metrics (is it the text ncu printed?)")
        runs.append((label, launches))
    metrics = [m for m in args.metrics.split(",") if m and m != DURATION]
    print(table(runs, metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
