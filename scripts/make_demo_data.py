"""Write the embedded demo task's files into lowmem_rlhf/data/bundled/ (deterministic).

    python scripts/make_demo_data.py
"""

import gzip
import json
from pathlib import Path

from lowmem_rlhf.algo.demo_task import rows

out = Path(__file__).resolve().parent.parent / "lowmem_rlhf" / "data" / "bundled"
for name, items in rows().items():
    text = "".join(json.dumps(r) + "\n" for r in items)
    if name.endswith(".gz"):  # mtime 0: the same rows give the same bytes
        (out / name).write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        (out / name).write_text(text)
    print(f"{out / name}: {len(items)} rows")
