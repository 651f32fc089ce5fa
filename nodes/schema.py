"""Names shared by the HyperAlign nodes."""

from comfy_api.v0_0_2 import io

CATEGORY = "HyperAlign"
FOLDER = "hyperalign"  # models/hyperalign
PredictorType = io.Custom("HYPERALIGN_PREDICTOR")


def node_id_of(node_class) -> str:
    """The executing node's id (hidden UNIQUE_ID), or "" when a node is called outside a prompt."""
    hidden = getattr(node_class, "hidden", None)
    unique_id = getattr(hidden, "unique_id", None) if hidden is not None else None
    return "" if unique_id is None else str(unique_id)
