"""register_generated_sets: DATASETS.GENERATED.DIRS become training sets next to the real one."""
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from diffusiondet.data.datasets import register_coco_json
from diffusiondet.data.synthetic import SYNTHETIC_CROWD_CLASSES, generate_synthetic_crowd
from diffusionengine import build_config
from diffusionengine.data.coco_writer import GeneratedCocoWriter, reference_categories
from diffusionengine.data.generated import generated_dataset_name, register_generated_sets, thing_classes_of
from tests.utils import TINY_OPTS

REAL = "generated_sets_test_real"


@pytest.fixture(scope="module")
def real_and_generated(tmp_path_factory):
    """A registered real set (5 synthetic images) and two generated folders of 3 and 2 images."""
    root = str(tmp_path_factory.mktemp("gen_sets"))
    json_file = generate_synthetic_crowd(root, split="train", num_images=5, image_size=(40, 56),
                                         min_objects=1, max_objects=3, seed=4)  # fmt: skip
    register_coco_json(REAL, json_file, os.path.join(root, "train"))
    folders = []
    for name, count in (("gen_alpha", 3), ("gen_beta", 2)):
        writer = GeneratedCocoWriter(os.path.join(root, name), reference_categories(REAL))
        for i in range(count):
            image = np.full((32, 48, 3), 40 * i, dtype=np.uint8)
            writer.add(image, [[2, 3, 20, 30]], [i % 5], [0.8], prompt="p", seed=i)
        writer.flush()
        folders.append(os.path.join(root, name))
    return folders


def _cfg(*opts):
    opts = ["DATASETS.TRAIN", (REAL,), "MODEL.DiffusionDet.NUM_CLASSES", 5, *opts]
    return build_config("configs/diffdet.synthetic.res18.yaml", TINY_OPTS + opts)


def _names(folders):
    names = [generated_dataset_name(i, f) for i, f in enumerate(folders)]
    assert [n.rsplit("_", 1)[0] for n in names] == ["generated_0_gen_alpha", "generated_1_gen_beta"]
    return names


def test_generated_folders_are_appended_to_the_real_training_set(real_and_generated):
    cfg = _cfg("DATASETS.GENERATED.DIRS", tuple(real_and_generated))
    alpha, beta = _names(real_and_generated)
    assert cfg.DATASETS.TRAIN == (REAL, alpha, beta)
    assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler" and cfg.DATASETS.TRAIN_REPEAT_FACTOR == ()
    records = DatasetCatalog.get(alpha)
    assert len(records) == 3 and [r["annotations"][0]["category_id"] for r in records] == [0, 1, 2]
    assert MetadataCatalog.get(beta).thing_classes == list(SYNTHETIC_CROWD_CLASSES)


def test_folders_of_the_same_base_name_get_their_own_dataset(real_and_generated, tmp_path):
    """Two runs' generated/ folders trained on in one process (e.g. a job comparing them)."""
    other = tmp_path / os.path.basename(real_and_generated[0])
    other.mkdir()
    assert generated_dataset_name(0, str(other)) != generated_dataset_name(0, real_and_generated[0])
    assert generated_dataset_name(0, real_and_generated[0] + "/") == generated_dataset_name(0, real_and_generated[0])


def test_repeat_factor_selects_the_weighted_sampler_and_a_second_call_changes_nothing(real_and_generated):
    cfg = _cfg("DATASETS.GENERATED.DIRS", tuple(real_and_generated), "DATASETS.GENERATED.REPEAT_FACTOR", 0.5)
    alpha, beta = _names(real_and_generated)
    expected = ((alpha, 0.5), (beta, 0.5))
    assert cfg.DATASETS.TRAIN_REPEAT_FACTOR == expected
    assert cfg.DATALOADER.SAMPLER_TRAIN == "WeightedTrainingSampler"
    before = cfg.dump()
    assert register_generated_sets(cfg) == [alpha, beta]
    assert cfg.dump() == before
    # A dumped config built again (e.g. output/config.yaml of a run) registers the same way.
    again = _cfg("DATASETS.TRAIN", cfg.DATASETS.TRAIN, "DATASETS.GENERATED.DIRS", tuple(real_and_generated),
                 "DATASETS.GENERATED.REPEAT_FACTOR", 0.5, "DATASETS.TRAIN_REPEAT_FACTOR", expected)  # fmt: skip
    assert again.DATASETS.TRAIN == cfg.DATASETS.TRAIN and again.DATASETS.TRAIN_REPEAT_FACTOR == expected


def test_a_sampler_that_ignores_dataset_factors_is_an_error(real_and_generated):
    with pytest.raises(ValueError, match="RepeatFactorTrainingSampler"):
        _cfg("DATASETS.GENERATED.DIRS", tuple(real_and_generated[:1]), "DATASETS.GENERATED.REPEAT_FACTOR", 2.0,
             "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler")  # fmt: skip


def test_a_folder_without_the_layout_is_an_error_naming_it(tmp_path, real_and_generated):
    with pytest.raises(FileNotFoundError, match=f"folder not found: '{tmp_path}/nowhere'"):
        _cfg("DATASETS.GENERATED.DIRS", (str(tmp_path / "nowhere"),))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "images").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'.*/half' is not a generated dataset.*annotations.json"):
        _cfg("DATASETS.GENERATED.DIRS", (str(tmp_path / "half"),))


def test_other_categories_are_an_error_naming_both_lists(tmp_path, real_and_generated):
    writer = GeneratedCocoWriter(tmp_path / "gen_people", [{"id": 1, "name": "person"}])
    writer.add(np.zeros((8, 8, 3), np.uint8), [], [], [])
    writer.flush()
    with pytest.raises(ValueError, match=r"gen_people.*\['person'\].*'red_circle', 'green_square'"):
        _cfg("DATASETS.GENERATED.DIRS", (str(tmp_path / "gen_people"),))


def test_classes_of_a_lazily_registered_set_without_a_json_come_from_loading_it():
    name = "generated_sets_test_lazy"
    loads = []

    def load():
        loads.append(1)
        MetadataCatalog.get(name).set(thing_classes=["a", "b"])
        return []

    DatasetCatalog.register(name, load)
    assert MetadataCatalog.get(name).get("thing_classes") is None
    assert thing_classes_of(name) == ["a", "b"] and loads == [1]
    with pytest.raises(KeyError, match="not registered"):
        thing_classes_of("generated_sets_test_unknown")
