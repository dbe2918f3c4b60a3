"""A training loader whose b-th batch is a pure function of (seed, rank, b): resumable exactly.

detectron2's training loader draws each image's augmentation from its worker's RNG and fills
aspect-ratio buckets with whichever image a worker returns first, so its position cannot be
saved: a run resumed from a checkpoint sees other images with other augmentations. Here:

* the index stream is detectron2's training sampler (``TrainingSampler``, or the
  ``RepeatFactorTrainingSampler`` of the repeat-factor and weighted samplers), rebuilt on the
  run's seed so that it is a pure function of it, sharded by rank;
* :class:`SeededBatchSampler` forms batches from that stream in the main process, grouping by
  the records' aspect ratio (width > height or not, as detectron2 groups the mapped images), so
  batch b is known without loading an image, and ``start_batch`` skips ahead by index
  arithmetic alone;
* :class:`SeededMapDataset` maps slot j of batch b under python / numpy / torch generators seeded
  from (seed, rank, b, j), whichever worker (or the main process) runs it.

The loader's state is therefore one number, the batches consumed; the trainer stores it in its
checkpoints (``docs/reproducibility.md``).
"""
import logging
import signal
from typing import Callable, Iterator, List, Sequence, Tuple

import torch
from detectron2.data import build_detection_train_loader
from detectron2.data.build import trivial_batch_collator
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.utils import comm

from ..utils.rng_state import mixed_seed, seeded_rngs

__all__ = ["SeededBatchSampler", "SeededMapDataset", "build_resumable_train_loader", "set_loader_position"]

logger = logging.getLogger(__name__)

# Key of one image of the stream: (batch number, slot in the batch, dataset index).
ItemKey = Tuple[int, int, int]

# A mapper that rejects this many images in a row for one slot (each a logged skip) means the
# dataset is unusable, not that one image is bad.
MAX_ATTEMPTS = 100


def aspect_groups(dataset: Sequence[dict]) -> List[int]:
    """Per record: 0 if wider than tall, else 1 (detectron2's buckets); all 0 without sizes."""
    if not all("width" in d and "height" in d for d in dataset):
        logger.info("Some training records have no width/height: batches are not grouped by aspect ratio")
        return [0] * len(dataset)
    return [0 if d["width"] > d["height"] else 1 for d in dataset]


class SeededBatchSampler(torch.utils.data.Sampler):
    """Batches of :data:`ItemKey` from an index sampler, grouped by aspect ratio.

    Args:
        sampler: an infinite, restartable index sampler already sharded for this rank
            (detectron2's training samplers): iterating it again yields the same stream.
        groups: aspect group of each dataset index (see :func:`aspect_groups`).
        batch_size: images per batch on this rank.
        start_batch: batches to skip (the position a resumed run continues from).
    """

    def __init__(self, sampler, groups: Sequence[int], batch_size: int, start_batch: int = 0):
        self.sampler = sampler
        self.groups = list(groups)
        self.batch_size = batch_size
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[List[ItemKey]]:
        buckets = {}
        batch_no = 0
        for index in self.sampler:
            bucket = buckets.setdefault(self.groups[index], [])
            bucket.append(int(index))
            if len(bucket) < self.batch_size:
                continue
            if batch_no >= self.start_batch:
                yield [(batch_no, slot, i) for slot, i in enumerate(bucket)]
            batch_no += 1
            bucket.clear()


class SeededMapDataset(torch.utils.data.Dataset):
    """Maps the record of an :data:`ItemKey` with the RNGs seeded from (seed, rank, batch, slot).

    A mapper that returns None (a logged skip of a bad image) is asked again for another record,
    chosen from the same seeds; after ``MAX_ATTEMPTS`` refusals in a row it is an error.
    """

    def __init__(self, dataset: Sequence[dict], mapper: Callable, seed: int, rank: int):
        self.dataset = DatasetFromList(list(dataset), copy=False)
        self.mapper = mapper
        self.seed = seed
        self.rank = rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: ItemKey):
        batch_no, slot, index = key
        for attempt in range(MAX_ATTEMPTS):
            item_seed = mixed_seed(self.seed, self.rank, batch_no, slot, attempt)
            with seeded_rngs(item_seed):
                data = self.mapper(self.dataset[index])
                if data is not None:
                    return data
                index = int(torch.randint(len(self.dataset), ()))  # another record, same seeds
        raise RuntimeError(
            f"the training mapper rejected {MAX_ATTEMPTS} records in a row for batch {batch_no}, "
            f"slot {slot} (see the skips logged above): check the training data"
        )


def build_resumable_train_loader(cfg, mapper: Callable, seed: int) -> torch.utils.data.DataLoader:
    """detectron2's training data (``DATASETS.TRAIN``, ``DATALOADER.*``, ``SOLVER.IMS_PER_BATCH``)
    as a loader of lists of mapped dicts whose order and augmentations depend on ``seed`` only.

    ``seed`` must be the same on every rank (the ranks shard one stream).
    """
    args = build_detection_train_loader.from_config(cfg, mapper=mapper)
    dataset, sampler = args["dataset"], args["sampler"]
    if sampler is None:
        raise ValueError("the resumable training loader needs a map-style dataset (a list of records)")
    if type(sampler) is TrainingSampler:  # its own seed would come from numpy's global generator
        sampler = TrainingSampler(len(dataset), shuffle=True, seed=seed)
    elif type(sampler) is RepeatFactorTrainingSampler:
        # WeightedTrainingSampler (DATASETS.TRAIN_REPEAT_FACTOR) builds it without a seed, and
        # RepeatFactorTrainingSampler with cfg.SEED (-1 by default): rebuilt on the run's seed,
        # same repeat factors, so mixed real + generated training resumes exactly too.
        sampler = RepeatFactorTrainingSampler(
            sampler._int_part + sampler._frac_part, shuffle=sampler._shuffle, seed=seed
        )
    world = comm.get_world_size()
    if args["total_batch_size"] % world:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={args['total_batch_size']} must be divisible by the number of "
            f"processes ({world})"
        )
    batch_size = args["total_batch_size"] // world
    groups = aspect_groups(dataset) if args["aspect_ratio_grouping"] else [0] * len(dataset)
    return torch.utils.data.DataLoader(
        SeededMapDataset(dataset, args["mapper"], seed, comm.get_rank()),
        batch_sampler=SeededBatchSampler(sampler, groups, batch_size),
        num_workers=args["num_workers"],
        collate_fn=trivial_batch_collator,
        # The loader draws its workers' base seed from this generator, not from torch's global
        # one, whose state the checkpoint restores.
        generator=torch.Generator().manual_seed(seed % 2**63),
        worker_init_fn=_ignore_sigterm,
    )


def _ignore_sigterm(worker_id: int) -> None:
    """A loader worker ignores its first SIGTERM. A scheduler signals every process of the job,
    and torch's worker handler would end the worker under the running step, failing its rank
    before the rank writes its stop checkpoint (diffusiondet/engine/stop_signal.py); the rank
    then shuts its workers down itself. A second SIGTERM (the rank's own shutdown) ends it."""

    def first(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, first)


def set_loader_position(data_loader, batches: int) -> bool:
    """Make ``data_loader`` (before its first iteration) continue after ``batches`` batches.

    Returns False (and changes nothing) for a loader that is not a resumable one.
    """
    batch_sampler = getattr(data_loader, "batch_sampler", None)
    if not isinstance(batch_sampler, SeededBatchSampler):
        return False
    batch_sampler.start_batch = batches
    return True
