"""Stage 2's per-episode diagnostics as one table, :data:`DIAGNOSTICS`: the device-side sums, the host's reads,
the divergence check and the metrics.csv columns follow from it, so a new diagnostic is one entry."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.episode import EPISODE_CLASS, SAME_CLASS, EpisodeResult

Measured = tuple[torch.Tensor, int] | None  # an episode's value (0-dim, on the device) and its count, or nothing


@dataclass(frozen=True)
class Diagnostic:
    """A number episodes may contribute, summed over an epoch or an evaluation pass.

    ``name``: its sum's key (:func:`new_sums`); ``count``: the host-side count it is divided by;
    ``measure``: ``(result, relation) -> (value, count)`` or None (``relation``: a training episode's gallery
    class relation, else None); ``train``, ``select``: its metrics.csv columns ("": none), ``scale * sum /
    count``, ``empty`` when nothing was counted; ``spread_of``: for a sum of squares, the diagnostic whose
    mean it spreads around (column ``sqrt(sum / count - mean ** 2)``); ``loss``: non-finite stops the run."""

    name: str
    count: str
    measure: Callable[[EpisodeResult, torch.Tensor | None], Measured]
    train: str = ""
    select: str = ""
    scale: float = 1
    empty: float | str = ""
    spread_of: str = ""
    loss: bool = False


def _weights(result: EpisodeResult, power: int) -> Measured:
    weights = result.weights
    return None if weights is None else ((weights if power == 1 else weights.pow(power)).sum(), weights.numel())


def _relation(relation: torch.Tensor | None, kind: int) -> Measured:
    return None if relation is None else ((relation == kind).sum(), relation.numel())


def _one(value: torch.Tensor | None) -> Measured:
    return None if value is None else (value, 1)


DIAGNOSTICS = (  # the losses first: the divergence check reads the leading entries
    Diagnostic("proto_loss", "step", lambda r, _: (r.proto_loss.detach(), 1), train="proto_loss", empty=0.0,
               loss=True),
    Diagnostic("cls_loss", "cls_steps", lambda r, _: _one(None if r.cls_loss is None else r.cls_loss.detach()),
               train="cls_loss", loss=True),
    Diagnostic("acc", "step", lambda r, _: (r.accuracy, 1), train="train_acc", scale=100, empty=0.0),
    Diagnostic("plain_acc", "step", lambda r, _: (r.plain_accuracy, 1), train="train_plain_acc", scale=100,
               empty=0.0),
    Diagnostic("weight_sum", "weight_n", lambda r, _: _weights(r, 1), train="weight_mean",
               select="select_weight_mean", empty=0.0),
    Diagnostic("weight_sq", "weight_n", lambda r, _: _weights(r, 2), train="weight_std", select="select_weight_std",
               empty=0.0, spread_of="weight_sum"),
    Diagnostic("same_class", "relation_n", lambda _, rel: _relation(rel, SAME_CLASS),
               train="train_gallery_same_class"),
    Diagnostic("episode_class", "relation_n", lambda _, rel: _relation(rel, EPISODE_CLASS),
               train="train_gallery_episode_class"),
    Diagnostic("own_distance", "distance_n", lambda r, _: _one(r.own_distance), train="train_own_distance",
               select="select_own_distance"),
    Diagnostic("other_distance", "distance_n", lambda r, _: _one(r.other_distance), train="train_other_distance",
               select="select_other_distance"),
)


def new_sums() -> dict[str, float]:
    """Every diagnostic's sum and every count at zero."""
    return {**{d.name: 0.0 for d in DIAGNOSTICS}, **{d.count: 0 for d in DIAGNOSTICS}}


def columns(sums: dict[str, float], row: str) -> dict[str, float | str]:
    """The metrics.csv columns of ``row`` (``train`` or ``select``) from :func:`new_sums`-shaped ``sums``."""
    out = {}
    for d in DIAGNOSTICS:
        column, n = getattr(d, row), sums[d.count]
        if not column:
            continue
        if not n:
            out[column] = d.empty
        elif d.spread_of:
            mean = sums[d.spread_of] / n
            out[column] = math.sqrt(max(sums[d.name] / n - mean * mean, 0.0))
        else:
            out[column] = d.scale * sums[d.name] / n
    return out


class DeviceSums:
    """The diagnostics' sums of ``sums`` (:func:`new_sums`) kept on ``device`` between reads (stale in ``sums``
    meanwhile); the counts advance on the host at once. Added in float64 in episode order, so after
    :meth:`read` they are bit for bit what adding each ``.item()`` on the host would give."""

    def __init__(self, sums: dict[str, float], device: torch.device) -> None:
        self.sums, self.losses = sums, sum(d.loss for d in DIAGNOSTICS)
        # built on the host and copied without waiting (a tensor made on the GPU from Python numbers waits)
        self.totals = torch.tensor([float(sums[d.name]) for d in DIAGNOSTICS], dtype=torch.float64).to(
            device, non_blocking=True)
        self.zero = torch.zeros((), device=device)
        self.first_bad = torch.full((), -1.0, dtype=torch.float64, device=device)
        self.unread = 0

    def add(self, result: EpisodeResult, relation: torch.Tensor | None = None) -> None:
        """Add one episode (``relation``: training episodes only) and note whether its losses were finite."""
        values, counted = [], {}
        for d in DIAGNOSTICS:
            measured = d.measure(result, relation)
            values.append(self.zero if measured is None else measured[0])
            if measured is not None:
                counted[d.count] = measured[1]
        # One stack of every value (float32, and counts below 2**24 promoted to float32 exactly), one
        # conversion to float64: the numbers converting each value would give, in fewer operations.
        stacked = torch.stack(values).double()
        self.totals += stacked
        finite = torch.isfinite(stacked[:self.losses]).all()
        self.first_bad = torch.where(finite | (self.first_bad >= 0), self.first_bad, float(self.unread))
        self.unread += 1
        for key, count in counted.items():
            self.sums[key] += count

    def read(self) -> int | None:
        """Write the sums back (waits for the GPU); the first non-finite loss's position since the last read."""
        *totals, first_bad = torch.cat([self.totals, self.first_bad.view(1)]).tolist()
        self.sums.update(zip((d.name for d in DIAGNOSTICS), totals))
        self.first_bad.fill_(-1.0)
        self.unread = 0
        return None if first_bad < 0 else int(first_bad)
