"""Implicit Maximum Likelihood Estimation (Li & Malik, 2018) as a target source.

No discriminator: every *data point* is matched with its nearest *generated*
sample, and the generator is regressed from that sample's latent onto the data
point. Each data point therefore pulls some sample towards itself, which is
why IMLE covers every mode by construction.

Matching (every ``staleness`` epochs): draw ``samples_factor`` × N latents,
generate them in batches without gradients, and keep, for every data point,
the latent of its nearest sample. The pool is streamed through the search
chunk by chunk and never held whole; its latents come from a generator
seeded by (run seed, epoch), the same in every process of a distributed run. Between matchings a step regresses
G(z_i + jitter) onto x_i for the batch's data points i.

Adaptive IMLE (``adaptive: true``; M. Aghabozorgi, S. Peng, K. Li, "Adaptive
IMLE for Few-shot Pretraining-free Generative Modelling", ICML 2023; the
authors' code: github.com/mehranagh20/AdaIMLE) gives every data point i a
threshold τ_i. At a matching, only the data points whose matched sample has
come within their threshold, d_i = ‖x_i − G(z_i)‖² < τ_i, are matched again,
and their threshold shrinks to (1 − γ) d_i (γ = ``change_coef``); the others
keep their latent, and so their pull, until their sample has got that close.
Every data point thus has to make the same relative progress before it gets a
new sample, however far its nearest sample started (plain IMLE re-matches all
of them, and the hard ones never get close). ``force_after`` re-matches a data
point anyway after that many epochs (the authors' ``imle_force_resample``).
The first matching matches every data point, with τ_i = (1 − γ) × its distance.
Matching, pool and search are plain IMLE's; a re-match also generates one
sample per data point (its current match) to measure d_i.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from targetgen import Batch, Targets, TargetSource, TrainingContext, bounded
from targetgen.distributed import Processes, all_sum, gather_nearest, unwrap
from targetgen.models import sampling_copy
from targetgen.search import RunningNearest
from targetgen.spaces import SearchOptions, embed_dataset, search_space


@dataclass
class IMLEOptions(SearchOptions):
    samples_factor: int = bounded(10, ge=1)  # generated samples per data point at each matching
    staleness: int = bounded(5, ge=1)  # epochs between matchings
    jitter: float = bounded(0.01, ge=0)  # std of the noise added to matched latents at every step
    # Latents generated per forward pass while matching. At 512 on digits, glibc hands each batch's
    # freed tensors back to the kernel and faults them in again (~270k page faults, 0.5 s per re-match).
    generation_batch: int = bounded(256, ge=1)
    # Pool samples generated before each search. FAISS's matmul runs at full speed only from ~1,000
    # database rows (digits re-match: search 0.65 s in chunks of 256, 0.50 s in chunks of 1,024).
    search_batch: int = bounded(1024, ge=1)
    # Adaptive IMLE (above): re-match only the data points whose sample came within their threshold τ_i
    adaptive: bool = False
    change_coef: float = bounded(
        0.04, gt=0, lt=1
    )  # γ: a re-matched point's τ_i becomes (1 − γ) × its distance (authors: 0.04)
    force_after: int | None = bounded(
        None, ge=1
    )  # adaptive: re-match a point anyway this many epochs after its last match


class IMLE(TargetSource):
    """Targets are the data points themselves; inputs are their matched latents."""

    name = "imle"
    Options = IMLEOptions

    def __init__(self, options: IMLEOptions, context: TrainingContext):
        super().__init__(options, context)
        if not context.latent_shape:
            raise ValueError("IMLE draws its own pool of latents: TrainingContext.latent_shape must be set")
        self.space = search_space(options, context.image_shape, context.device)
        self.matched_z: Tensor | None = None  # one latent per data point
        self.matched_epoch = -1  # epoch of the last matching
        self.match_distance = float("nan")  # mean squared distance data → matched sample
        self._data_features: Tensor | None = None  # the data never change: embedded once
        self.thresholds: Tensor | None = None  # adaptive: τ_i per data point (squared distances in the search space)
        self.matched_at: Tensor | None = None  # adaptive: the epoch of every data point's last match
        self.rematched_share = 1.0  # adaptive: the share of data points matched again at the last matching

    def data_features(self) -> Tensor:
        if self._data_features is None:
            self._data_features = embed_dataset(self.context.dataset, self.space, self.context.device)
        return self._data_features

    def on_epoch_start(self, epoch: int) -> None:
        if self.matched_z is None or epoch - self.matched_epoch >= self.options.staleness:
            self.match(epoch)
            self.matched_epoch = epoch

    def pool_latents(self, epoch: int) -> Iterator[Tensor]:
        """The latents of the matching pool at ``epoch``, in search batches.

        Drawn from a generator of their own, seeded by (run seed, epoch), so
        that every process of a distributed run draws the same pool, and a
        resumed run the same pool as an uninterrupted one.
        """
        o, ctx = self.options, self.context
        total = o.samples_factor * len(ctx.dataset)
        draws = torch.Generator().manual_seed(ctx.seed * 1_000_003 + 7919 * (epoch + 1))
        for start in range(0, total, o.search_batch):
            yield torch.randn(min(o.search_batch, total - start), *ctx.latent_shape, generator=draws)

    def match(self, epoch: int = 0) -> None:
        """For every data point, the latent of its nearest sample in a fresh pool
        (adaptive, after the first matching: for the data points that are due, above)."""
        features = self.data_features()
        if not self.options.adaptive or self.thresholds is None:
            distance, matched_z = self.search_pool(epoch, features)
            self.matched_z, self.match_distance = matched_z.to(self.context.device), distance.mean().item()
            if self.options.adaptive:
                self.thresholds = (1 - self.options.change_coef) * distance
                self.matched_at = torch.full((len(features),), epoch)
            return
        distance = self.current_distance()
        due = distance < self.thresholds
        if self.options.force_after is not None:
            due |= epoch - self.matched_at >= self.options.force_after
        rows = due.nonzero().flatten()
        if len(rows):  # no one due: the pool is not even generated
            new_distance, new_z = self.search_pool(epoch, features[rows])
            self.matched_z[rows.to(self.matched_z.device)] = new_z.to(self.matched_z.device)
            self.thresholds[rows] = (1 - self.options.change_coef) * distance[rows]
            self.matched_at[rows] = epoch
            distance[rows] = new_distance
        self.match_distance = distance.mean().item()
        self.rematched_share = due.double().mean().item()

    def search_pool(self, epoch: int, queries: Tensor) -> tuple[Tensor, Tensor]:
        """The squared distance to, and the latent of, every query's nearest sample in the pool of ``epoch``.

        Distributed, each process generates every world_size-th search batch
        of the pool; the nearest candidates are then gathered, so every query
        still gets its nearest sample from the whole pool (and the same one as
        a single process would find).
        """
        o, ctx = self.options, self.context
        nearest = RunningNearest(queries, o.backend, o.budget_bytes())
        generator = sampling_copy(unwrap(ctx.generator))
        matched_z = None
        start = 0
        for j, z in enumerate(self.pool_latents(epoch)):
            if matched_z is None:
                matched_z = torch.zeros((len(queries), *z.shape[1:]), dtype=z.dtype)
            if j % ctx.world_size == ctx.rank:
                with torch.inference_mode(), ctx.generating():
                    passes = z.split(o.generation_batch)
                    features = torch.cat([self.space(generator(part.to(ctx.device)).float()) for part in passes])
                improved, position = nearest.update(features, offset=start)
                matched_z[improved] = z[position.cpu()]
            start += len(z)
        distance, _, matched_z = gather_nearest(
            nearest.distance, nearest.index, matched_z, Processes(ctx.rank, ctx.world_size)
        )
        return distance, matched_z

    def current_distance(self) -> Tensor:
        """The squared distance from every data point to its matched sample now (without jitter), in the
        search space; distributed, averaged over the processes, so that all of them agree on who is due."""
        o, ctx = self.options, self.context
        generator = sampling_copy(unwrap(ctx.generator))
        with torch.inference_mode(), ctx.generating():
            parts = self.matched_z.split(o.generation_batch)
            features = torch.cat([self.space(generator(part).float()) for part in parts])
        distance = (features - self.data_features()).pow(2).sum(1)
        return all_sum(distance, ctx.world_size) / ctx.world_size

    def propose(self, batch: Batch, step: int) -> Targets:
        z = self.matched_z[batch.indices.to(self.matched_z.device)]
        if self.options.jitter:
            z = z + self.options.jitter * torch.randn_like(z)
        stats = {"match_distance": self.match_distance, "matched_epoch": float(self.matched_epoch)}
        if self.options.adaptive:
            stats["rematched_share"] = self.rematched_share
        return Targets(z=z, x=batch.images.to(self.context.device), stats=stats)

    def state_dict(self) -> dict:
        state = {
            "matched_z": self.matched_z,
            "matched_epoch": self.matched_epoch,
            "match_distance": self.match_distance,
        }
        if self.options.adaptive:
            state.update(thresholds=self.thresholds, matched_at=self.matched_at, rematched_share=self.rematched_share)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.matched_z = state["matched_z"]
        self.matched_epoch = state["matched_epoch"]
        self.match_distance = state["match_distance"]
        if self.options.adaptive:  # a plain run's checkpoint has none: its next matching matches every data point
            self.thresholds, self.matched_at = state.get("thresholds"), state.get("matched_at")
            self.rematched_share = state.get("rematched_share", 1.0)
