"""Prefetch requests: the queue of copies a predictor asked for and that are not issued yet.

Legend: a key is (MoE layer index, expert id); a deadline is the MoE layer that needs it.
Whether a queued request is worth its link time is decided in offload/decision.py; the copy itself
is done by a copy engine (offload/copy_engines.py). A request whose layer has run is cancelled.

"""
from __future__ import annotations

from dataclasses import dataclass

from moe_runtime.offload.cache import Key


@dataclass
class PrefetchRequest:
    key: Key
    deadline: int
    """The MoE layer (this forward pass) that will use the expert: nearest first."""
    confidence: float
    """Predictor's probability for the expert (1.0 when exact)."""
    distance: int
    """Layers between where the prediction was made and the deadline."""


class PrefetchQueue:
    """Queued (not yet issued) prefetches plus the set of experts predicted for coming layers.

    A later prediction for a layer (made closer to it, hence more certain) replaces the layer's
    earlier one: its queued requests that the new prediction drops are pre-empted. Requests leave
    in deadline order (nearest layer first), the most confident first within a layer.
    """

    def __init__(self, max_pending: int):
        self.max_pending = max_pending
        self.pending: dict[Key, PrefetchRequest] = {}
        self.predicted: dict[Key, int] = {}
        self.distance_of_layer: dict[int, int] = {}
        self.submitted = self.preempted = self.dropped = 0

    def submit(self, layer: int, experts: dict[int, float], distance: int) -> None:
        if self.distance_of_layer.get(layer, distance + 1) < distance:
            return  # a nearer (more certain) prediction for this layer already stands
        self.distance_of_layer[layer] = distance
        for key in [k for k in self.pending if k[0] == layer and k[1] not in experts]:
            del self.pending[key]
            self.preempted += 1
        for key in [k for k in self.predicted if k[0] == layer and k[1] not in experts]:
            del self.predicted[key]
        for e, conf in experts.items():
            key = (layer, e)
            self.predicted[key] = layer
            self.pending[key] = PrefetchRequest(key, layer, float(conf), distance)
            self.submitted += 1
        while len(self.pending) > self.max_pending:
            worst = max(self.pending.values(), key=lambda r: (r.deadline, -r.confidence))
            del self.pending[worst.key]
            self.dropped += 1

    def pop(self) -> PrefetchRequest | None:
        if not self.pending:
            return None
        best = min(self.pending.values(), key=lambda r: (r.deadline, -r.confidence))
        return self.pending.pop(best.key)

    def layer_done(self, layer: int) -> None:
        """Layer `layer` ran: its predictions no longer protect anything, its requests are moot."""
        for d in (self.pending, self.predicted):
            for key in [k for k in d if k[0] <= layer]:
                del d[key]
        for l in [l for l in self.distance_of_layer if l <= layer]:
            del self.distance_of_layer[l]

    def reset(self) -> None:
        self.pending.clear()
        self.predicted.clear()
        self.distance_of_layer.clear()


__all__ = ["PrefetchRequest", "PrefetchQueue"]
