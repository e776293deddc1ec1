"""The names of the prediction types (prediction.py's PREDICTIONS registers one object per name), importable
without torch so that a saved UNet's record can be read before any model loads."""
from __future__ import annotations

import sys

PREDICTION_NAMES = ("eps", "v", "x0")  # PREDICTIONS' keys, in its order (prediction.py checks the two agree)


def prediction_names() -> tuple[str, ...]:
    """The known prediction types: PREDICTIONS' keys once prediction.py is loaded (a type added there counts),
    else PREDICTION_NAMES."""
    prediction = sys.modules.get(f"{__package__}.prediction")
    return tuple(getattr(prediction, "PREDICTIONS", PREDICTION_NAMES))
