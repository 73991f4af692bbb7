"""What the training loop uses: every ``[data.<name>]`` as an endless, resumable batch stream.

Typical use in the engine::

    data = build_train_data(pipeline, rank=acc.process_index, world_size=acc.num_processes)
    data.cache_latents(vae, device=acc.device, wait=acc.wait_for_everyone)  # only datasets with cache_latents
    data.load_state_dict(checkpoint["data"])                                  # when resuming
    for step in range(max_steps):
        batches = data.next_batches()      # {name: batch dict}, one batch from each dataset
        loss = sum(b["loss_weight"] * loss_of(b) for b in batches.values())
        ...
        checkpoint["data"] = data.state_dict()

Each dataset keeps its own epoch: when one runs out of batches it starts its next epoch
(reshuffled from the seed) while the others carry on. One DataLoader iterator runs through all
of a dataset's epochs (:class:`~hcp_core.data.sampler.EndlessBatches`), so its workers keep
batches ready across epoch boundaries.

Loading never touches the global RNGs (torch, ``random``, numpy): batch order, crops and prompt
edits are keyed on (seed, dataset, epoch, sample), and each DataLoader draws its worker seeds
from its own generator keyed on (seed, dataset, the epoch the iterator starts in). So whether the
loop built its iterators at step 0 or at a resumed step, the global RNG that LoRA dropout uses is
the same.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch

from ..config.schema import DatasetConfig
from .dataset import BucketDataset, Collate
from .holdout import split_selector
from .images import parse_colour
from .latent_cache import LatentCache
from .prepare import DEFAULT_LATENT_FACTOR, PreparedDataset, prepare_dataset
from .report import bucket_table, problem_summary
from .sampler import BucketBatchSampler
from .size_checks import size_warnings

log = logging.getLogger("hcp.data")

#: Batches each DataLoader worker prepares ahead (torch's default is 2).
PREFETCH_BATCHES = 4


class DataStream:
    """Endless batches of one dataset; :meth:`state_dict` is the position of the next batch."""

    def __init__(
        self,
        dataset: BucketDataset,
        sampler: BucketBatchSampler,
        collate: Collate,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.collate = collate
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        # Only the DataLoader's worker base seed comes from here (see loader_seed).
        self._generator = torch.Generator()
        self.epoch = 0
        self.batch = 0  # index (this rank) of the next batch within the epoch
        self._loader: Optional[torch.utils.data.DataLoader] = None
        self._iter: Optional[Iterator[Dict[str, Any]]] = None

    @property
    def batches_per_epoch(self) -> int:
        """Batches this process draws per epoch (the same on every process)."""
        return len(self.sampler)

    def _make_loader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler.endless(),
            collate_fn=self.collate,
            num_workers=self.num_workers,
            # Workers live across epochs (no restart, re-import and re-open at each epoch change) and
            # each keeps PREFETCH_BATCHES batches ready, so a fast step does not wait for decoding.
            persistent_workers=self.num_workers > 0,
            prefetch_factor=PREFETCH_BATCHES if self.num_workers > 0 else None,
            pin_memory=self.pin_memory,
            # Without its own generator, every iter() would draw from the global torch RNG.
            generator=self._generator,
        )

    def __iter__(self) -> "DataStream":
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._iter is None:
            if self._loader is None:
                self._loader = self._make_loader()
            # The sampler is iterated in this process, so setting it here is what workers see.
            self.sampler.set_position(self.epoch, self.batch)
            self._generator.manual_seed(loader_seed(self.seed, self.dataset.name, self.epoch))
            self._iter = iter(self._loader)  # endless: one iterator crosses every epoch boundary
        batch = next(self._iter)
        batch["epoch"] = self.epoch
        self.batch += 1
        if self.batch == len(self.sampler):
            self.epoch, self.batch = self.epoch + 1, 0
        return batch

    def state_dict(self) -> Dict[str, Any]:
        """Plain data to restore the exact position: epoch, next batch, and a size check."""
        return {"epoch": self.epoch, "batch": self.batch, "samples": len(self.dataset), "batches_per_epoch": len(self.sampler),
                "fingerprint": self.fingerprint()}

    def fingerprint(self) -> str:
        """A digest of what the dataset trains on: each image's path, caption, mask and repeat."""
        digest = hashlib.sha256()
        for r in self.dataset.records:
            digest.update(json.dumps([r.image, r.caption, r.mask, r.repeat]).encode())
        return digest.hexdigest()[:16]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position. If the data changed since, keep the epoch and warn."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        changes = []
        if state.get("samples", len(self.dataset)) != len(self.dataset):
            changes.append(f"{state['samples']} samples per epoch then, {len(self.dataset)} now")
        if state.get("batches_per_epoch", len(self.sampler)) != len(self.sampler):
            changes.append(f"{state['batches_per_epoch']} batches per epoch then, {len(self.sampler)} now")
        if state.get("fingerprint", self.fingerprint()) != self.fingerprint():
            changes.append("images, captions, masks or repeats differ")
        if changes:
            moved = batch > len(self.sampler) or state.get("batches_per_epoch", len(self.sampler)) != len(self.sampler)
            where = f"the start of epoch {epoch}" if moved else f"batch {batch} of epoch {epoch}"
            log.warning("data.%s: the data changed since the checkpoint (%s); continuing from %s; the run is no "
                        "longer the same as an uninterrupted one", self.dataset.name, "; ".join(changes), where)
            if moved:
                batch = 0
        if batch == len(self.sampler):  # a position saved at an epoch's very end
            epoch, batch = epoch + 1, 0
        self.epoch, self.batch = epoch, batch
        self.close()

    def close(self) -> None:
        """Stop workers; the next batch starts a fresh loader at the current position."""
        self._iter = None
        self._loader = None


def loader_seed(seed: int, name: str, epoch: int) -> int:
    """The seed of a dataset's DataLoader generator in ``epoch`` (its workers' base seed derives from it)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 8_191 + epoch) % 2**63


#: The most workers ``num_workers = "auto"`` gives one dataset: 4 decode 512 px batches of 4 faster
#: than a GPU trains on them (bench/bench_loader.py), and each worker holds its own copy of the
#: dataset's Python state.
AUTO_MAX_WORKERS = 4


def auto_num_workers(cuda: bool, datasets: int, processes: int = 1, cpus: Optional[int] = None) -> int:
    """The workers ``num_workers = "auto"`` gives each of ``datasets`` datasets.

    On a GPU: this process's share of the CPUs (``processes`` training processes on the machine),
    less one core for the training process itself, split over the datasets, at least 1 and at
    most :data:`AUTO_MAX_WORKERS` (on an H200, 4 workers took hcp's SD 1.5 LoRA step from 0.230 s
    to 0.195 s). On a CPU, 0: the step itself uses every core, and workers would compete for them.
    """
    if not cuda:
        return 0
    share = (cpus or os.cpu_count() or 1) // max(processes, 1) - 1
    return max(1, min(AUTO_MAX_WORKERS, share // max(datasets, 1)))


def resolve_num_workers(requested: Mapping[str, Union[int, str]], *, cuda: bool = False, processes: int = 1,
                        cpus: Optional[int] = None) -> Dict[str, int]:
    """Each dataset's worker count: ``"auto"`` resolved (:func:`auto_num_workers`, logged) and
    explicit counts capped (:func:`cap_num_workers`)."""
    autos = [name for name, n in requested.items() if n == "auto"]
    auto = auto_num_workers(cuda, len(autos), processes, cpus) if autos else 0
    if autos:
        log.info("num_workers auto: %d DataLoader worker(s) for %s (%s)", auto, ", ".join(f"data.{n}" for n in autos),
                 "a CUDA device: decoding overlaps the step" if cuda else "a CPU device: the step uses every core")
    return cap_num_workers({name: auto if n == "auto" else int(n) for name, n in requested.items()}, cpus)


def cap_num_workers(requested: Mapping[str, int], cpus: Optional[int] = None) -> Dict[str, int]:
    """Each dataset's ``num_workers``, at most the CPU count; one warning names those capped.

    More workers than CPUs only adds processes (and their memory) competing for the same cores.
    """
    cpus = cpus or os.cpu_count() or 1
    capped = {name: n for name, n in requested.items() if n > cpus}
    if capped:
        log.warning(
            "num_workers above the %d CPUs of this machine, using %d: %s", cpus, cpus,
            ", ".join(f"data.{name} ({n})" for name, n in capped.items()),
        )
    return {name: min(n, cpus) for name, n in requested.items()}


class TrainData:
    """The parallel datasets of a pipeline: one batch from each per training step."""

    def __init__(self, streams: Dict[str, DataStream], prepared: Dict[str, PreparedDataset], caches: Dict[str, LatentCache]) -> None:
        self.streams = streams
        self.prepared = prepared
        self.caches = caches

    @property
    def loss_weights(self) -> Dict[str, float]:
        """Each dataset's ``loss_weight``."""
        return {name: p.config.loss_weight for name, p in self.prepared.items()}

    def next_batches(self) -> Dict[str, Dict[str, Any]]:
        """One batch from every dataset, keyed by dataset name (in pipeline order)."""
        return {name: next(stream) for name, stream in self.streams.items()}

    def state_dict(self) -> Dict[str, Dict[str, Any]]:
        """Every dataset's position (save it in checkpoints)."""
        return {name: stream.state_dict() for name, stream in self.streams.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore :meth:`state_dict`; a dataset missing from ``state`` starts at the beginning."""
        for name, stream in self.streams.items():
            if name in state:
                stream.load_state_dict(state[name])
            else:
                log.warning("data.%s: not in the checkpoint; it starts from its first batch", name)

    def cache_latents(
        self,
        vae: Any,
        *,
        device: Any = "cpu",
        dtype: Optional[torch.dtype] = None,
        batch_size: int = 4,
        rank: int = 0,
        world_size: int = 1,
        wait: Optional[Callable[[], None]] = None,
    ) -> None:
        """Fill the latent caches of datasets with ``cache_latents = true``, then serve latents.

        Call before the first batch. With several processes pass ``wait`` (a barrier such as
        ``accelerator.wait_for_everyone``): every rank encodes its share, waits, then reads all.
        """
        readers = {}
        for name, cache in self.caches.items():
            stream = self.streams[name]
            readers[name] = cache.fill(
                stream.dataset, vae, device=device, dtype=dtype, batch_size=batch_size, rank=rank, world_size=world_size
            )
        if wait is not None and self.caches:
            wait()
        for name, reader in readers.items():
            self.streams[name].dataset.use_latents(reader)
            self.streams[name].close()

    def close(self) -> None:
        """Stop every DataLoader's workers."""
        for stream in self.streams.values():
            stream.close()


def build_train_data(
    pipeline: Any,
    *,
    registry: Any = None,
    rank: int = 0,
    world_size: int = 1,
    latent_factor: int = DEFAULT_LATENT_FACTOR,
    size_multiple: Optional[int] = None,
    verify_images: bool = False,
    pin_memory: bool = False,
    native_size: Optional[Tuple[int, int]] = None,
    cuda: bool = False,
    local_processes: int = 1,
) -> TrainData:
    """Scan, bucket and wrap every ``pipeline.data`` dataset; logs each bucket table and problems,
    and warns about buckets far above ``native_size`` or the images (:mod:`.size_checks`).

    ``pipeline`` is a :class:`~hcp_core.config.schema.Pipeline`. Unusable files are skipped and
    summarised in the log; a dataset with no usable image raises
    :class:`~hcp_core.errors.DataError`. ``cuda`` and ``local_processes`` (training processes on
    this machine) decide what ``num_workers = "auto"`` comes to.
    """
    streams: Dict[str, DataStream] = {}
    prepared_all: Dict[str, PreparedDataset] = {}
    caches: Dict[str, LatentCache] = {}
    workers = resolve_num_workers({name: config.num_workers for name, config in pipeline.data.items()},
                                  cuda=cuda, processes=local_processes)
    for name, config in pipeline.data.items():
        prepared = prepare_dataset(
            name,
            config,
            registry=registry if registry is not None else pipeline.registry,
            base_dir=pipeline.base_dir,
            seed=pipeline.seed,
            verify_images=verify_images,
            latent_factor=latent_factor,
            size_multiple=size_multiple,
            select=split_selector(pipeline, name, held=False),  # held-out validation images never train
        )
        log.info("%s", bucket_table(prepared))
        for warning in size_warnings(prepared, native_size):
            log.warning("%s", warning)
        if prepared.problems:
            log.warning("%s", problem_summary(name, prepared.problems))
        dataset = BucketDataset(prepared, seed=pipeline.seed, latent_factor=latent_factor, background=parse_colour(config.background))
        sampler = BucketBatchSampler(
            dataset.bucket_members(), config.batch_size, seed=pipeline.seed, name=name, rank=rank, world_size=world_size
        )
        streams[name] = DataStream(dataset, sampler, Collate(name, config.loss_weight), num_workers=workers[name],
                                   pin_memory=pin_memory, seed=pipeline.seed)
        prepared_all[name] = prepared
        cache = _latent_cache(name, config, prepared, pipeline)
        if cache is not None:
            caches[name] = cache
    return TrainData(streams, prepared_all, caches)


def _latent_cache(name: str, config: DatasetConfig, prepared: PreparedDataset, pipeline: Any) -> Optional[LatentCache]:
    if not config.cache_latents:
        return None
    if not prepared.bucket.deterministic:
        log.warning(
            "data.%s: cache_latents is on but the bucket crops at random; latents are computed every step "
            "(set crop = \"center\" on the bucket to cache them)", name,
        )
        return None
    root = config.cache_dir or os.path.join(pipeline.exp_dir, "latent_cache")
    return LatentCache(os.path.join(pipeline.base_dir, root))

