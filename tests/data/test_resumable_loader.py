"""The resumable training loader: batches and augmentations are a function of (seed, rank,
batch, slot), whoever maps them, and a start position skips ahead to exactly the same batches."""
import itertools
import random

import numpy as np
import pytest
import torch

from diffusiondet.data.resumable_loader import (
    MAX_ATTEMPTS,
    SeededBatchSampler,
    SeededMapDataset,
    aspect_groups,
    build_resumable_train_loader,
    set_loader_position,
)
from diffusiondet.data.datasets import register_coco_json
from diffusiondet.data.synthetic import generate_synthetic_crowd
from diffusiondet.data import DiffusionDetDatasetMapper
from tests.utils import tiny_cfg


class _Stream:
    """A restartable index stream, as detectron2's training samplers are."""

    def __init__(self, indices):
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)


def test_batches_group_by_aspect_in_stream_order():
    records = [{"width": 80, "height": 64}, {"width": 64, "height": 80}, {"width": 90, "height": 60},
               {"width": 50, "height": 50}]  # fmt: skip
    assert aspect_groups(records) == [0, 1, 0, 1]  # square counts as "not wider", as detectron2's
    sampler = SeededBatchSampler(_Stream([0, 1, 3, 2, 1, 0, 0]), aspect_groups(records), batch_size=2)
    assert list(sampler) == [
        [(0, 0, 1), (0, 1, 3)],  # the tall pair completes first
        [(1, 0, 0), (1, 1, 2)],
        [(2, 0, 0), (2, 1, 0)],  # the tall 1 still waits for a partner
    ]


def test_records_without_sizes_form_one_group():
    assert aspect_groups([{"width": 5, "height": 9}, {"file_name": "x"}]) == [0, 0]


def test_start_batch_skips_to_the_same_batches():
    groups = [i % 2 for i in range(10)]
    stream = _Stream(np.random.default_rng(0).integers(0, 10, 200).tolist())
    full = list(SeededBatchSampler(stream, groups, batch_size=3))
    assert len(full) > 20
    for start in (0, 1, 7, 20):
        assert list(SeededBatchSampler(stream, groups, 3, start_batch=start)) == full[start:]


def _noisy_mapper(record):
    # Draws from every global generator, as augmentations do (numpy, python, torch).
    return {"id": record["id"], "draws": (np.random.rand(), random.random(), float(torch.rand(())))}


def test_an_item_is_mapped_with_the_same_draws_whatever_ran_before():
    dataset = SeededMapDataset([{"id": i} for i in range(5)], _noisy_mapper, seed=3, rank=0)
    first = dataset[(4, 1, 2)]
    for key in [(0, 0, 0), (9, 2, 4)]:
        dataset[key]
    torch.manual_seed(123), np.random.seed(5), random.seed(9)  # the caller's own state
    assert dataset[(4, 1, 2)] == first
    assert dataset[(4, 0, 2)] != first and dataset[(5, 1, 2)] != first  # another slot / batch
    assert SeededMapDataset(dataset.dataset, _noisy_mapper, seed=3, rank=1)[(4, 1, 2)] != first
    assert SeededMapDataset(dataset.dataset, _noisy_mapper, seed=4, rank=0)[(4, 1, 2)] != first


def test_mapping_leaves_the_callers_generators_alone():
    dataset = SeededMapDataset([{"id": 0}], _noisy_mapper, seed=3, rank=0)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    expected = (float(torch.rand(())), np.random.rand(), random.random())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    dataset[(0, 0, 0)]
    assert (float(torch.rand(())), np.random.rand(), random.random()) == expected


def test_a_rejected_record_is_replaced_by_the_same_other_record_every_time():
    bad = {1, 2}
    mapper = lambda r: None if r["id"] in bad else _noisy_mapper(r)  # noqa: E731
    dataset = SeededMapDataset([{"id": i} for i in range(6)], mapper, seed=0, rank=0)
    replaced = dataset[(3, 0, 1)]
    assert replaced["id"] not in bad and dataset[(3, 0, 1)] == replaced


def test_a_mapper_that_rejects_everything_is_an_error_naming_the_slot():
    dataset = SeededMapDataset([{"id": i} for i in range(3)], lambda r: None, seed=0, rank=0)
    with pytest.raises(RuntimeError, match=f"rejected {MAX_ATTEMPTS} records in a row for batch 2, slot 1"):
        dataset[(2, 1, 0)]


@pytest.fixture(scope="module")
def tiny_cfg_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("loader"))
    json_file = generate_synthetic_crowd(root, split="train", num_images=5, image_size=(48, 72),
                                         min_objects=1, max_objects=4, seed=2)  # fmt: skip
    register_coco_json("loader_tiny_train", json_file, f"{root}/train")

    def make(workers):
        cfg = tiny_cfg("DATASETS.TRAIN", ("loader_tiny_train",), "MODEL.DiffusionDet.NUM_CLASSES", 5,
                       "DATALOADER.NUM_WORKERS", workers, "INPUT.MIN_SIZE_TRAIN", (40, 48, 56))  # fmt: skip
        return build_resumable_train_loader(cfg, DiffusionDetDatasetMapper(cfg, is_train=True), seed=17)

    return make


def _batches(loader, count):
    return [[(d["image_id"], d["image"].clone(), d["instances"].gt_boxes.tensor.clone()) for d in batch]
            for batch in itertools.islice(iter(loader), count)]  # fmt: skip


def _same(a, b):
    return all(x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
               for p, q in zip(a, b) for x, y in zip(p, q)) and len(a) == len(b)  # fmt: skip


def test_loader_is_the_same_with_workers_and_resumes_at_a_position(tiny_cfg_data):
    main_process = _batches(tiny_cfg_data(0), 6)
    # Random resizes among 3 sizes and flips really happened, and were reproduced.
    assert len({tuple(item[1].shape) for batch in main_process for item in batch}) > 1
    assert _same(main_process, _batches(tiny_cfg_data(2), 6))
    resumed = tiny_cfg_data(1)
    assert set_loader_position(resumed, 4)
    assert _same(main_process[4:], _batches(resumed, 2))
    assert not set_loader_position(torch.utils.data.DataLoader([1, 2]), 4)  # not a resumable loader


@pytest.fixture(scope="module")
def two_train_sets(tmp_path_factory):
    """Two registered training sets of 5 and 4 images (the second one stands for a generated set)."""
    root = str(tmp_path_factory.mktemp("weighted"))
    for name, split, count in (("weighted_real", "train", 5), ("weighted_extra", "extra", 4)):
        json_file = generate_synthetic_crowd(root, split=split, num_images=count, image_size=(48, 72),
                                             min_objects=1, max_objects=4, seed=2)  # fmt: skip
        register_coco_json(name, json_file, f"{root}/{split}")
    return ("weighted_real", "weighted_extra")


def _weighted_cfg(train, *opts):
    return tiny_cfg("DATASETS.TRAIN", train, "MODEL.DiffusionDet.NUM_CLASSES", 5,
                    "DATALOADER.SAMPLER_TRAIN", "WeightedTrainingSampler", *opts)  # fmt: skip


def test_train_repeat_factor_must_be_pairs_naming_training_sets(two_train_sets):
    cfg = _weighted_cfg(two_train_sets, "DATASETS.TRAIN_REPEAT_FACTOR", (("weighted_extra", 2.5),))
    assert cfg.DATASETS.TRAIN_REPEAT_FACTOR == (("weighted_extra", 2.5),)
    bad = {
        (("weighted_other", 2.0),): "names 'weighted_other', which is not in DATASETS.TRAIN",
        (("weighted_extra", 0.0),): "must be \\(dataset name, factor > 0\\) pairs",
        (("weighted_extra",),): "must be \\(dataset name, factor > 0\\) pairs",
        (("weighted_extra", 2.0), ("weighted_extra", 3.0)): "names a dataset twice",
    }
    for value, message in bad.items():
        with pytest.raises(ValueError, match=message):
            _weighted_cfg(two_train_sets, "DATASETS.TRAIN_REPEAT_FACTOR", value)


def _index_stream(cfg, seed, count=120):
    loader = build_resumable_train_loader(cfg, DiffusionDetDatasetMapper(cfg, is_train=True), seed=seed)
    return list(itertools.islice(iter(loader.batch_sampler.sampler), count))


def test_weighted_sampler_follows_the_run_seed_and_the_repeat_factors(two_train_sets):
    # DATASETS.TRAIN_REPEAT_FACTOR: the second set (indices 5..8) is drawn 3 times as often.
    cfg = _weighted_cfg(two_train_sets, "DATASETS.TRAIN_REPEAT_FACTOR", (("weighted_extra", 3.0),))
    np.random.seed(0)
    stream = _index_stream(cfg, seed=17)
    np.random.seed(1)  # detectron2 would seed the sampler from numpy's global generator
    assert _index_stream(cfg, seed=17) == stream
    assert _index_stream(cfg, seed=18) != stream
    extra = sum(i >= 5 for i in stream) / len(stream)
    assert extra == pytest.approx(12 / 17, abs=0.08)  # 4 * 3 of 5 + 4 * 3 draws per epoch
    plain = _index_stream(_weighted_cfg(two_train_sets), seed=17)  # factor 1 for both
    assert sum(i >= 5 for i in plain) / len(plain) == pytest.approx(4 / 9, abs=0.08)
