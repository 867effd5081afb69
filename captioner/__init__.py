"""captioner: a Show-and-Tell image captioner (pretrained CNN encoder + LSTM, GRU or RNN decoder,
optionally attending over the image grid).

``from captioner import Captioner`` is :class:`captioner.inference.Captioner`, imported on first
use so that ``import captioner`` stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Captioner", "__version__"]

if TYPE_CHECKING:
    from captioner.inference import Captioner


def __getattr__(name: str) -> Any:
    if name == "Captioner":
        from captioner.inference import Captioner

        return Captioner
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
