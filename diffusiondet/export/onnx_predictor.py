"""Run an exported detector (:func:`~.onnx_export.export_onnx`) with onnxruntime, called like the
PyTorch model at inference: detectron2-style inputs in, ``[{"instances": Instances}]`` out.

Shape legend as in :mod:`.exportable`: B the graph's batch, H × W its canvas, N proposals, D noise
draws, K detection rows per image.
"""
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, Instances

from ..diffusion import TorchRandom, seeded_source
from .exportable import sampling_noise
from .onnx_export import import_optional

__all__ = ["OnnxPredictor"]


class OnnxPredictor:
    """An ONNX detector on onnxruntime that answers like ``model(batched_inputs)`` in eval mode.

    Each input dict has "image" (3, h, w) in the model's input format and resolution (what the
    test mapper gives the PyTorch model; h <= H, w <= W) and optionally "height" / "width", the
    output resolution (boxes are rescaled and clipped there by ``detector_postprocess``, and empty
    ones dropped, as the PyTorch model does), and "image_id". Lists longer than B run in chunks,
    shorter ones are padded with blank images.

    Noise (graphs exported with noise "input"): image b's draws come from the same stream as in
    the PyTorch model, ``seeded_source(SEED, image_id)``, when the exported model had a SEED >= 0
    and every input has an "image_id"; otherwise from this predictor's generator (``seed``).

    Args:
        path: the .onnx file.
        threads: onnxruntime intra-op threads (0: onnxruntime's default, one per core).
        providers: onnxruntime execution providers, in order of preference.
        seed: seed of the fallback noise generator.
    """

    def __init__(
        self, path: str, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",), seed: int = 0
    ):
        ort = import_optional("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=list(providers))
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.batch, self.height, self.width = int(meta["batch"]), int(meta["height"]), int(meta["width"])
        self.num_boxes, self.draws = int(meta["num_boxes"]), int(meta["noise_draws"])
        self.noise, self.sampling_seed = meta["noise"], int(meta["sampling_seed"])
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        results = []
        for start in range(0, len(batched_inputs), self.batch):
            results += self.run_batch(batched_inputs[start : start + self.batch])
        return results

    def run_batch(self, inputs: List[Dict]) -> List[Dict[str, Instances]]:
        """At most B inputs through one graph run."""
        feeds = self.feeds(inputs)
        outputs = dict(zip(self.output_names, self.session.run(None, feeds)))
        results = []
        for b, x in enumerate(inputs):
            count = int(outputs["num_detections"][b])
            fields = {
                name: torch.from_numpy(np.ascontiguousarray(value[b, :count]))
                for name, value in outputs.items()
                if name != "num_detections"
            }
            image_size = tuple(int(v) for v in feeds["image_sizes"][b])
            output_size = (x.get("height", image_size[0]), x.get("width", image_size[1]))
            inst = detector_postprocess(self.build_instances(fields, image_size), *output_size)
            results.append({"instances": self.finish_instances(inst, image_size, output_size)})
        return results

    def feeds(self, inputs: List[Dict]) -> Dict[str, np.ndarray]:
        """The graph's inputs for up to B detectron2 input dicts (blank images fill the batch)."""
        if not 0 < len(inputs) <= self.batch:
            raise ValueError(f"run_batch takes 1 to {self.batch} inputs, got {len(inputs)}")
        images = np.zeros((self.batch, 3, self.height, self.width), dtype=np.float32)
        sizes = np.tile(np.array([[self.height, self.width]], dtype=np.int64), (self.batch, 1))
        for b, x in enumerate(inputs):
            image = x["image"]
            height, width = image.shape[-2:]
            if height > self.height or width > self.width:
                raise ValueError(
                    f"image {x.get('image_id', b)} is {height}x{width}, larger than the exported "
                    f"canvas {self.height}x{self.width}: export with a larger --image-size"
                )
            images[b, :, :height, :width] = torch.as_tensor(image).float().numpy()
            sizes[b] = (height, width)
        feeds = {"images": images, "image_sizes": sizes}
        if self.noise == "input":
            feeds["noise"] = self.noise_for(inputs).numpy()
        return feeds

    def noise_for(self, inputs: List[Dict]) -> torch.Tensor:
        """(D, B, N, 4) float32 draws for ``inputs`` (see the class docstring); blank rows zero."""
        if self.sampling_seed >= 0 and all("image_id" in x for x in inputs):
            sources = [seeded_source(self.sampling_seed, x["image_id"]) for x in inputs]
        else:
            sources = [TorchRandom(generator=self.generator)] * len(inputs)
        noise = torch.zeros(self.draws, self.batch, self.num_boxes, 4)
        noise[:, : len(inputs)] = sampling_noise(sources, self.num_boxes, self.draws)
        return noise

    def build_instances(self, fields: Dict[str, torch.Tensor], image_size: Tuple[int, int]) -> Instances:
        """One image's detections (``fields``: the graph's per-detection outputs, n rows) as
        Instances in the network-input frame, as the model's ``build_instances``."""
        inst = Instances(image_size)
        inst.pred_boxes = Boxes(fields["boxes"])
        inst.scores = fields["scores"]
        inst.pred_classes = fields["classes"]
        return inst

    def finish_instances(self, inst: Instances, image_size, output_size) -> Instances:
        """Hook for subclasses (DiffusionInst's masks): fields made in the final frame."""
        return inst
