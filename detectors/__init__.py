"""The Visual-Genome Faster R-CNN (bottom-up attention) in torch + torchvision ops.

>>> from vlp.detectors import load_detector, draw
>>> det = load_detector("pytorch_model.bin")            # or faster_rcnn_from_caffe_attr.pkl
>>> records = det.detect([cv2.imread("a.jpg")], image_ids=["a"])   # BGR, as cv2 reads
>>> det.config, det.config_hash, det.weights_sha256     # what the manifest records
>>> png = draw(cv2.imread("a.jpg"), records[0])

Presets (``butd-10-100`` default, ``butd-36``, ``lxmert-36``, and ``demo``: the slim detector
shipped with vlp, trained on the synthetic world; ``load_detector(preset="demo")``) are documented in
:mod:`vlp.detectors.config`; every threshold is a keyword override of ``load_detector``.

Importing this package is light (no torch): the names below are loaded from their modules
on first use, so command lines and error handlers can name them without paying for torch.
The error types live in :mod:`vlp.detectors.errors`.
"""

import importlib

_EXPORTS = {
    "vlp.detectors.errors": ("AnnotationError", "CheckpointError", "DetectorConfigError", "MissingWeightsError",
                             "ShippedWeightsError", "TrainingStateError", "UnknownOptionError",
                             "UnknownPresetError"),
    "vlp.detectors.config": ("PRESETS", "ArchitectureConfig", "DetectorConfig", "config_from_dict", "get_preset",
                             "make_config", "preset_names", "register_preset"),
    "vlp.detectors.checkpoint": ("load_weights", "read_checkpoint", "save_checkpoint"),
    "vlp.detectors.draw": ("draw",),
    "vlp.detectors.inference": ("Detector", "PreparedImage", "load_detector", "prepare_image", "to_bgr"),
    "vlp.detectors.model": ("FasterRCNN",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
