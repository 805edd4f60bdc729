"""The ``moefuse`` command line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moefuse")
def main():
    """Find Mixture-of-Experts blocks in ONNX models, fuse each into one MoEFFN node, run it fast."""


def _load(path):
    from .converter.io import ModelFileError, load

    try:
        return load(path)
    except ModelFileError as exc:
        raise click.ClickException(str(exc)) from None


@contextlib.contextmanager
def _sigterm_as_exit():
    """SIGTERM (a job scheduler's stop) raises SystemExit, so that the temporary files of a
    conversion are removed on the way out as on any error."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        if previous is not None:  # (None: a handler installed outside Python, not restorable)
            signal.signal(signal.SIGTERM, previous)


def _progress(quiet):
    start = time.time()

    def report(msg):
        if not quiet:
            click.echo(f"[{time.time() - start:6.1f}s] {msg}", err=True)
    return report


def _table(blocks, done: str = "converted") -> str:
    rows = [("block", "status", "E", "D", "I", "traits", "removed", "weights reused/new", "error")]
    for b in blocks:
        rows.append((b.name, done if b.converted else "near miss",
                     str(b.experts or ""), str(b.hidden or ""), str(b.inter or ""),
                     ", ".join(b.traits) if b.converted else b.reason,
                     str(b.nodes_removed) if b.converted and done == "converted" else "",
                     f"{b.weights_reused}/{b.weights_relaid}" if b.converted else "",
                     f"{b.max_error:.1e}" if b.max_error is not None else ""))
    widths = [min(max(len(r[i]) for r in rows), 60 if i == 5 else 200) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = []
        for i, cell in enumerate(r):
            if i == 5 and len(cell) > widths[i]:
                cell = cell[: widths[i] - 3] + "..."
            cells.append(cell.ljust(widths[i]))
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    for b in blocks:
        if b.converted and b.experts_unreached:
            lines.append(f"unverified {b.name}: {len(b.experts_unreached)} of {b.experts} experts "
                         f"were reached by no probe, not even by tokens steered to them (with "
                         f"more experts than hidden dims, some may be unreachable by any input)")
    near = [b for b in blocks if not b.converted]
    for b in near:
        lines.append(f"near miss {b.name}: {b.reason}")
    return "\n".join(lines)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the converted model (may equal MODEL: written atomically).")
@click.option("--partial", is_flag=True,
              help="Convert the blocks that verified even if others did not.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write a JSON report of every block found.")
@click.option("--check", is_flag=True,
              help="Run original and converted model on random inputs; print the max error.")
@click.option("--target", type=click.Choice(["moefuse", "ort"]), default="moefuse",
              show_default=True,
              help="moefuse: MoEFFN nodes (run fast with the moefuse library, anywhere through "
                   "their embedded function). ort: onnxruntime's com.microsoft.MoE where a block "
                   "fits it (no library needed), MoEFFN elsewhere.")
@click.option("--weight-layout", type=click.Choice(["as-found", "out_in"]), default="as-found",
              show_default=True,
              help="out_in: store expert weights read in_out ([E, in, out], e.g. GPT-OSS) "
                   "transposed, so that the CUDA kernel reads onnxruntime's copy of them instead "
                   "of making a transposed copy of its own (half their GPU memory).")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
def convert(model, output, partial, report_path, check, target, weight_layout, quiet):
    """Collapse every MoE block of MODEL into one fused node, proven by execution."""
    from .builder import overload_note
    from .converter import convert_model
    from .converter.io import (ModelFileError, Spill, check_opset, copy_unchanged, external_tensors,
                               output_file, save)

    progress = _progress(quiet)
    try:
        output_file(output)  # refused before the work, not after
    except ModelFileError as exc:
        raise click.ClickException(str(exc)) from None
    if report_path:
        _check_report_path(report_path, [model, output])
    proto = _load(model)
    progress(f"loaded {model}: {len(proto.graph.node)} nodes")
    try:
        check_opset(proto, model)
    except ModelFileError as exc:
        raise click.ClickException(str(exc)) from None
    if report_path:  # nor the model's data files
        _check_report_path(report_path, _data_files(model, proto))
    base_dir = os.path.dirname(os.path.abspath(model))
    report = {"model": model, "output": output, "blocks": [], "written": False}
    written = None  # the output's model, its data locations as written
    spill = None
    stack = contextlib.ExitStack()
    stack.enter_context(_sigterm_as_exit())
    try:
        # A model with external data may be far larger than memory: the tensors the rewrite
        # makes go to disk as they are made (a model in one file stays one file below 1.5 GB).
        if any(True for _ in external_tensors(proto)):
            spill = Spill(output)
        result = convert_model(proto, base_dir=base_dir, partial=partial, progress=progress,
                               target=target, weight_layout=weight_layout, store=spill)
        blocks = result.blocks
        report["blocks"] = [b.to_json() for b in blocks]
        if not blocks:
            click.echo("no MoE blocks found; the output is a copy of the input" + _fused_note(proto))
            copy_unchanged(proto, model, output)
            report["written"], written = True, proto
            return
        click.echo(_table(blocks))
        if result.model is None:
            missed = len(result.near_misses)
            raise click.ClickException(
                f"{missed} of {len(blocks)} MoE block(s) did not verify; nothing written "
                f"(--partial converts the {len(result.converted)} that did)")
        removed = sum(b.nodes_removed for b in result.converted)
        report["blocks"] = [b.to_json() for b in blocks]
        # the original's session before the output is written: it may replace the input
        original = _session_or_exit(model) if check else None
        save(result.model, output, model, spill)
        report["written"], written = True, result.model
        ops = Counter(b.emitted for b in result.converted)
        click.echo(f"wrote {output}: " + ", ".join(f"{n} {op}" for op, n in sorted(ops.items()))
                   + f"; {len(proto.graph.node)} -> {len(result.model.graph.node)} nodes "
                   f"({removed} removed)")
        for b in result.converted:
            if b.target_note:
                click.echo(f"  {b.name}: kept as MoEFFN, does not fit com.microsoft.MoE: "
                           f"{b.target_note}")
        for b in result.converted:
            if b.layout_note:
                click.echo(f"  {b.name}: weights kept in_out: {b.layout_note}")
        kept_in_out = [b for b in result.converted
                       if b.emitted == "moefuse.MoEFFN" and b.attrs.weight_layout == "in_out"]
        if kept_in_out and weight_layout == "as-found":
            click.echo(f"note: {len(kept_in_out)} MoEFFN node(s) hold in_out weights, which the "
                       f"CUDA kernel copies transposed at session creation (twice their GPU "
                       f"memory); --weight-layout out_in stores them transposed instead")
        note = overload_note(result.model)
        if note:
            click.echo(f"note: {note}")
        if check:
            progress("checking original vs converted on random inputs")
            err = _check(original, output, proto)
            report["check_max_relative_error"] = err
            click.echo(f"check: max relative error {err:.2e} over all outputs")
    except ModelFileError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        stack.close()
        if spill is not None:
            spill.discard()  # (placed by save when the output was written)
        error = sys.exc_info()[1]
        if error is not None:  # what the user is told, or what ended the run
            report["error"] = (error.format_message() if isinstance(error, click.ClickException)
                               else f"{type(error).__name__}: {error}")[:500]
        if report_path:
            _write_report(report_path, report, _data_files(output, written) if written else [],
                          failing=sys.exc_info()[0] is not None)


def _data_files(path, proto):
    from .converter.io import data_locations

    folder = os.path.dirname(os.path.abspath(path))
    return [os.path.join(folder, loc) for loc in data_locations(proto)]


def _check_report_path(report_path, taken):
    """The report may not replace the model, the output or their data files (by any name), nor a
    folder, device or pipe; its folder must exist and be writable."""
    real = os.path.realpath(report_path)
    for path in taken:
        if os.path.realpath(path) == real or (os.path.exists(path) and os.path.exists(real)
                                              and os.path.samefile(path, real)):
            raise click.BadParameter(f"{report_path} is {path}, a file of the model or its output; "
                                     f"give the report its own path", param_hint="--report")
    if os.path.exists(real) and not os.path.isfile(real):
        raise click.BadParameter(f"{report_path}: exists and is not a regular file", param_hint="--report")
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        raise click.BadParameter(f"{report_path}: no such folder {folder}", param_hint="--report")
    if not os.access(folder, os.W_OK):
        raise click.BadParameter(f"{report_path}: the folder {folder} is not writable", param_hint="--report")


def _write_report(report_path, report, output_data, failing):
    """Writes the report once the output is settled (not over the output's data files, named as
    it was written); errors are said and fail the exit, without undoing the output."""
    try:
        _check_report_path(report_path, output_data)
        with open(report_path, "w") as f:
            json.dump(report, f, indent=2)
    except (OSError, click.BadParameter) as exc:
        why = exc.strerror if isinstance(exc, OSError) else exc.format_message()
        click.echo(f"Error: --report {report_path}: not written ({why})", err=True)
        if not failing:
            sys.exit(1)


def _session_or_exit(model_or_path, shown=None):
    """An onnxruntime CPU session, or a click error naming the model and onnxruntime's reason."""
    from .compare import session

    try:
        return session(model_or_path)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        name = shown or model_or_path
        raise click.ClickException(f"{name}: onnxruntime cannot run it: {str(exc).strip()[:500]}") from None


def _check(original, converted, proto) -> float:
    from .compare import compare_sessions

    try:
        return compare_sessions(original, _session_or_exit(converted), proto)
    except click.ClickException:
        raise
    except Exception as exc:  # noqa: BLE001
        raise click.ClickException(f"check: running the models failed: {str(exc).strip()[:500]}") from None


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(model, as_json):
    """List the MoE candidates of MODEL and the near misses; writes nothing."""
    from .converter import analyze

    proto = _load(model)
    _, blocks = analyze(proto, os.path.dirname(os.path.abspath(model)))
    if as_json:
        click.echo(json.dumps([b.to_json() for b in blocks], indent=2))
    elif not blocks:
        click.echo("no MoE blocks found" + _fused_note(proto))
    else:
        click.echo(_table(blocks, done="verified"))


@main.command()
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--summary", is_flag=True, help="Print B's structural summary (golden-file form).")
def diff(a, b, as_json, summary):
    """Structural diff of two models (op histogram, nodes added/removed, MoEFFN attributes)."""
    from .diff import diff as diff_models, format_diff, summary as summarize

    ma, mb = _load(a), _load(b)
    if summary:
        click.echo(summarize(mb), nl=False)
        return
    d = diff_models(ma, mb)
    click.echo(json.dumps(d, indent=2) if as_json else format_diff(d))


def _fused_note(proto) -> str:
    """For a model with nothing to convert: whether it is one that was converted already."""
    from .builder import iter_moeffn_nodes

    count = sum(1 for _ in iter_moeffn_nodes(proto.graph))
    return f"; it already has {count} MoEFFN node(s) (`moefuse validate` checks them)" if count else ""


def _token_counts(ctx, param, value):
    try:
        counts = [int(t) for t in value.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated whole numbers, e.g. 1,16,256") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"{value!r}: expected token counts of at least 1")
    return counts


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--tokens", default="1,16,256", show_default=True, callback=_token_counts,
              help="Comma-separated token counts (the sequence dim; others take --batch).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Batch size when the input has two symbolic dims.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", default=0, type=click.IntRange(0, 1024),
              help="intra-op threads (0: onnxruntime's default).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
def bench(model, tokens, batch, provider, threads, as_json, quiet):
    """Time MODEL, its MoEFFN version and its com.microsoft.MoE version side by side.

    A MODEL that already has MoEFFN nodes is timed with moefuse's library against their
    embedded function (what stock onnxruntime runs)."""
    import onnxruntime as ort

    from .bench import bench as run_bench, table, to_json

    if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise click.BadParameter("this onnxruntime has no CUDA execution provider (install "
                                 "onnxruntime-gpu)", param_hint="--provider")
    proto = _load(model)
    try:
        vs = run_bench(proto, os.path.dirname(os.path.abspath(model)), tokens, batch, provider,
                       threads, log=_progress(quiet))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise click.ClickException(f"{model}: running it failed: {str(exc).strip()[:500]}") from None
    click.echo(json.dumps(to_json(vs), indent=2) if as_json else table(vs, tokens))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
def validate(model):
    """Check every MoEFFN node of MODEL against the op spec."""
    import onnx

    from .builder import iter_moeffn_nodes, attrs_of, declared_shapes, overload_note, validate_node
    from .spec import MoEFFNError

    proto = _load(model)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - keep the declared shapes if inference cannot run
        pass
    try:
        known = declared_shapes(proto)
    except Exception as exc:  # noqa: BLE001 - a malformed value info or initializer
        raise click.ClickException(f"{model}: cannot read its declared shapes ({exc!r})") from None
    nodes = list(iter_moeffn_nodes(proto.graph))
    if not nodes:
        click.echo("no MoEFFN nodes")
        return
    bad = 0
    for node in nodes:
        try:
            size = validate_node(proto, node, known)
            attrs = attrs_of(node)
        except MoEFFNError as exc:
            bad += 1
            click.echo(f"FAIL {exc}")
            continue
        except (ValueError, TypeError, KeyError) as exc:  # an attribute of the wrong type
            bad += 1
            click.echo(f"FAIL {node.name or '<unnamed>'}: cannot read the node ({exc!r})")
            continue
        click.echo(f"ok   {node.name or '<unnamed>'}: E={size.experts} k={attrs.k} D={size.hidden} "
                   f"I={size.inter} routing={attrs.routing} activation={attrs.activation}"
                   f"{'' if attrs.gated else ' (non-gated)'}")
    note = overload_note(proto)
    if note:
        click.echo(f"note: {note}")
    if bad:
        sys.exit(1)


@main.command()
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: fail unless MoEFFN runs on the GPU too.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
def doctor(provider, as_json, quiet):
    """Check that this installation runs MoEFFN nodes on moefuse's kernels (CPU, and CUDA where
    onnxruntime has it), each against the reference. Exits 1 if a check fails."""
    from .doctor import as_json as to_json, failed, run_checks, table

    checks = run_checks(provider, log=_progress(quiet))
    click.echo(to_json(checks) if as_json else table(checks))
    if failed(checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
