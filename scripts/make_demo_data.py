"""Write the embedded demo task's files into lowmem_rlhf/data/bundled/ (deterministic).

    python scripts/make_demo_data.py
"""

import json
from pathlib import Path

from lowmem_rlhf.algo.demo_task import rows

out = Path(__file__).resolve().parent.parent / "lowmem_rlhf" / "data" / "bundled"
for name, items in rows().items():
    (out / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    print(f"{out / name}: {len(items)} rows")
