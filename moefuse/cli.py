"""The ``moefuse`` command line."""

from __future__ import annotations

import sys

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moefuse")
def main():
    """Find Mixture-of-Experts blocks in ONNX models, fuse each into one MoEFFN node, run it fast."""


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
def validate(model):
    """Check every MoEFFN node of MODEL against the op spec."""
    import onnx

    from .builder import _moeffn_nodes, attrs_of, declared_shapes, validate_node
    from .spec import MoEFFNError

    try:
        proto = onnx.load(model, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several unrelated types
        raise click.ClickException(f"{model}: not a readable ONNX model ({exc})") from None
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - keep the declared shapes if inference cannot run
        pass
    known = declared_shapes(proto)
    nodes = list(_moeffn_nodes(proto.graph))
    if not nodes:
        click.echo("no MoEFFN nodes")
        return
    bad = 0
    for node in nodes:
        try:
            size = validate_node(proto, node, known)
        except MoEFFNError as exc:
            bad += 1
            click.echo(f"FAIL {exc}")
            continue
        attrs = attrs_of(node)
        click.echo(f"ok   {node.name or '<unnamed>'}: E={size.experts} k={attrs.k} D={size.hidden} "
                   f"I={size.inter} routing={attrs.routing} activation={attrs.activation}"
                   f"{'' if attrs.gated else ' (non-gated)'}")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
