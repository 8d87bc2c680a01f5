"""A deterministic synthetic world of Visual-Genome-vocabulary shapes.

The embedded default of vlp (README: `vlp synth`, `vlp demo`): images of eight drawable VG object
categories (circle, triangle, star, box, heart, cross, ring, diamond) in eight VG
colours, two sizes and two patterns, with annotations in the real public formats
(Visual Genome json, COCO captions + Karpathy split, VQA v2, Conceptual Captions
TSV and img2dataset folder, noisy web-crawl records) and a ``truth.json`` that
makes every builder and the demo detector scoreable exactly.

Entry points:

* :func:`generate` - write a whole world to a directory;
* :func:`sample_scene` / :func:`render_scene` - draw scenes in memory (training code);
* :func:`object_masks`, :func:`load_scenes` - masks and scenes for evaluation.
"""

from vlp.synthetic.palette import (ATTRIBUTE_IDS, CATEGORIES, CATEGORY_IDS, COLOURS,
                                   LARGE_AREA_FRACTION, PATTERNS, SIZES)
from vlp.synthetic.render import decode_image, encode_jpeg, object_masks, render_scene
from vlp.synthetic.scene import (Background, Clutter, DrawParams, Scene, SceneObject,
                                 sample_scene)
from vlp.synthetic.text import VERBS, has_verb
from vlp.synthetic.world import (GENERATOR_VERSION, WEB_CATEGORIES, WorldSummary, generate,
                                 load_scenes)

__all__ = [
    "ATTRIBUTE_IDS", "Background", "CATEGORIES", "CATEGORY_IDS", "COLOURS", "Clutter",
    "DrawParams", "GENERATOR_VERSION", "LARGE_AREA_FRACTION", "PATTERNS", "SIZES", "Scene",
    "SceneObject", "VERBS", "WEB_CATEGORIES", "WorldSummary", "decode_image", "encode_jpeg",
    "generate", "has_verb", "load_scenes", "object_masks", "render_scene", "sample_scene",
]
