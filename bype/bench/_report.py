"""Where every benchmark leaves its results: NAME.json (everything) and NAME.md (the table)."""
from __future__ import annotations

import json
import os


def write_report(out_dir: str, name: str, report: dict, table: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    with open(md_path, "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    print(f"\nwritten: {json_path}, {md_path}")
    return json_path, md_path
