"""The Visual-Genome Faster R-CNN (bottom-up attention) in torch + torchvision ops.

>>> from vlp.detectors import load_detector, draw
>>> det = load_detector("pytorch_model.bin")            # or faster_rcnn_from_caffe_attr.pkl
>>> records = det.detect([cv2.imread("a.jpg")], image_ids=["a"])   # BGR, as cv2 reads
>>> det.config, det.config_hash, det.weights_sha256     # what the manifest records
>>> png = draw(cv2.imread("a.jpg"), records[0])

Presets (``butd-10-100`` default, ``butd-36``, ``lxmert-36``, and ``demo``: the slim detector
shipped with vlp, trained on the synthetic world; ``load_detector(preset="demo")``) are documented in
:mod:`vlp.detectors.config`; every threshold is a keyword override of ``load_detector``.
"""

from vlp.detectors.checkpoint import CheckpointError, load_weights, read_checkpoint, save_checkpoint
from vlp.detectors.config import (PRESETS, ArchitectureConfig, DetectorConfig, config_from_dict, get_preset,
                                  make_config, preset_names, register_preset)
from vlp.detectors.draw import draw
from vlp.detectors.inference import (Detector, MissingWeightsError, PreparedImage, ShippedWeightsError, load_detector,
                                     prepare_image, to_bgr)
from vlp.detectors.model import FasterRCNN

__all__ = ["ArchitectureConfig", "CheckpointError", "Detector", "DetectorConfig", "FasterRCNN",
           "MissingWeightsError", "PRESETS", "PreparedImage", "ShippedWeightsError", "config_from_dict", "draw", "get_preset", "load_detector",
           "load_weights", "make_config", "prepare_image", "preset_names", "read_checkpoint",
           "register_preset", "save_checkpoint", "to_bgr"]
