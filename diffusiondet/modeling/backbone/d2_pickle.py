"""detectron2 model-zoo pickles: the ``.pkl`` layout the official configs' ImageNet weights use.

``{"model": {name: ndarray}, "__author__": ..., "matching_heuristics": True}``: detectron2's
``DetectionCheckpointer`` reads it and, because of ``matching_heuristics``, matches every name by
suffix onto the model's (e.g. ``layers.0...`` onto ``backbone.bottom_up.layers.0...``).
"""
import os
import pickle

import numpy as np
import torch


def d2_pickle_content(model_dict, author):
    """The pickle's content for ``model_dict`` (tensors become numpy arrays).

    ``author`` must not be ``"Caffe2"``: that would switch on detectron2's Caffe2 renaming, which
    these names do not need.
    """
    if author == "Caffe2":
        raise ValueError("author 'Caffe2' would make detectron2 rename the keys a second time")
    arrays = {}
    for name, value in model_dict.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        arrays[name] = np.asarray(value)
    return {"model": arrays, "__author__": author, "matching_heuristics": True}


def write_d2_pickle(content, path):
    """Write a :func:`d2_pickle_content` dict to ``path`` (parent folders created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(content, f)


def save_d2_pickle(model_dict, path, author):
    """:func:`d2_pickle_content` written to ``path``; returns the number of arrays."""
    content = d2_pickle_content(model_dict, author)
    write_d2_pickle(content, path)
    return len(content["model"])
