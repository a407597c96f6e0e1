"""``python -m adam_triton demo``: train one model twice, with torch's AdamW and ours.

One module per job:

* ``data``: a synthetic language the demo generates itself (nothing is downloaded);
* ``model``: the small GPT-style transformer it trains;
* ``sizes``: how big that model is, chosen by device;
* ``training``: the training loop and the correctly synchronised step timer;
* ``comparison``: the two runs from one initialisation, and what they are compared on;
* ``sweep``: the learning-rate (and other hyperparameter) sweep;
* ``report`` and ``plot``: the printed table and the PNG;
* ``environment``: device choice and library versions;
* ``cli``: the command line, with a clear message for every bad option.
"""

from .comparison import Comparison, compare
from .errors import DemoError
from .settings import Hyperparameters, Settings
from .sweep import SweepPoint, SweepResult, grid, sweep

__all__ = ["Comparison", "DemoError", "Hyperparameters", "Settings", "SweepPoint", "SweepResult", "compare", "grid", "sweep"]
