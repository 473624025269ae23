"""The engine: the sequential layer loop that owns capture, statistics, replay and the layers'
store, so that a method owns only the math (docs/METHODS.md §0).

- capture.py    what every layer is called with, per calibration batch
- observers.py  what a statistics pass accumulates, and its one sum over the processes
- replay.py     a module recomputed from the recorded inputs of its last linear
- context.py    :class:`LayerContext`: one layer, and what a method may ask of the engine
- loop.py       :func:`walk_layers`, :func:`run_sequential`, :class:`PlanContext`
- backward.py   the loss gradient at the linears' outputs, one layer at a time (the fisher allocation streamed)
"""

from rankdown.engine.capture import LayerInputs, to_device
from rankdown.engine.context import LayerContext, module_spec
from rankdown.engine.loop import PlanContext, run_sequential, walk_layers

__all__ = ["LayerContext", "LayerInputs", "PlanContext", "module_spec", "run_sequential", "to_device", "walk_layers"]
