"""The ground floor: run support every layer may import (and that imports no other layer).

* :mod:`vlp.core.durable` - atomic file writes and append-only JSON lines with torn-tail repair;
* :mod:`vlp.core.progress` - progress bars / log lines with rate and ETA;
* :mod:`vlp.core.errors_log` - ``errors.jsonl``, one line per input that could not be used;
* :mod:`vlp.core.decode` - image files to BGR arrays, or the reason why not (the extractor's
  and the web filter's image stage share these rules).
"""
