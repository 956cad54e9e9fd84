"""The long public-domain text bundled for perplexity and the `niah` haystack.

Genesis and Exodus of the King James Bible (1611, public domain), from Debian's `bible-kjv-text`
package; scripts/make_kjv_text.sh shows how the file was made. About 367 K characters (~90 K tokens).
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

KJV = Path(__file__).parent / "data" / "kjv-genesis-exodus.txt.gz"


@functools.cache
def kjv_text() -> str:
    return gzip.decompress(KJV.read_bytes()).decode("utf-8")
