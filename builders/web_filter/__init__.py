"""``vlp-build web-filter``: LAIT-style filtering of web image-text pairs, with a funnel.

Stages, cheap first (each a function of a batch of rows plus fitted state, every default a
flag): 1 image (:mod:`.images`), 2 naturalness and 6 semantic score (:mod:`.scorer`, need
``--features``), 3 text selection and cleaning, 4 language, 5 text rules (:mod:`.texts`),
7 aggregation (:func:`.run.aggregate` in memory, :mod:`.shuffle` as Ray Data shuffles with the
same result). :mod:`.inputs` reads crawl records and img2dataset output in shards; :mod:`.run`
runs the shards in Ray tasks with resume and writes the ``web`` pair store,
``rejected.jsonl`` and ``funnel.html`` (:mod:`.funnel`);
:mod:`.train` fits the two models (``vlp-build train-web-scorer``).
"""

from vlp.builders.web_filter.run import aggregate, web_filter
from vlp.builders.web_filter.stages import FilterConfig

__all__ = ["FilterConfig", "aggregate", "web_filter"]
