"""moefuse: find Mixture-of-Experts blocks in ONNX graphs, fuse them into one MoEFFN op, run it fast."""

__version__ = "0.1.0"

from .spec import DOMAIN, OP_TYPE, MoEFFNAttrs, MoEFFNError  # noqa: E402
from .builder import add_moeffn, attach_functions, make_moeffn_model  # noqa: E402
from .runtime import library_path, session_options  # noqa: E402

__all__ = [
    "DOMAIN", "OP_TYPE", "MoEFFNAttrs", "MoEFFNError",
    "add_moeffn", "attach_functions", "make_moeffn_model", "library_path", "session_options",
    "__version__",
]
