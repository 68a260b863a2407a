"""Write .dvc/plots_template.html: DVC's plot page with vega inlined, so it renders offline.

DVC's default page loads vega, vega-lite and vega-embed from a CDN; `dvc plots show` output then
stays blank on an offline machine. This script inlines the three libraries (BSD-3-Clause) into a
template and `.dvc/config` points `plots.html_template` at it. Re-run it to upgrade the libraries:

    cd /tmp && npm pack vega@5.30.0 vega-lite@5.21.0 vega-embed@6.26.0
    python scripts/build_plots_template.py /tmp/vega-5.30.0.tgz /tmp/vega-lite-5.21.0.tgz \
        /tmp/vega-embed-6.26.0.tgz
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

LIBRARIES = {
    "vega": "vega.min.js",
    "vega-lite": "vega-lite.min.js",
    "vega-embed": "vega-embed.min.js",
}
OUT = Path(__file__).resolve().parent.parent / ".dvc" / "plots_template.html"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>teacher: DVC plots</title>
{scripts}
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def read_library(tgz: Path, filename: str) -> str:
    with tarfile.open(tgz) as tar:
        member = tar.extractfile(f"package/build/{filename}")
        if member is None:
            raise SystemExit(f"{tgz}: has no package/build/{filename}")
        text = member.read().decode("utf-8")
    if "</script" in text or "{plot_divs}" in text:
        raise SystemExit(f"{tgz}: {filename} cannot be inlined safely")
    return text


def main(tarballs: list[str]) -> None:
    by_name = {Path(t).name.rsplit("-", 1)[0]: Path(t) for t in tarballs}
    missing = set(LIBRARIES) - set(by_name)
    if missing:
        raise SystemExit(f"missing tarballs for: {', '.join(sorted(missing))}")
    scripts = "\n".join(
        f"    <!-- {name} ({by_name[name].name}, BSD-3-Clause) -->\n"
        f"    <script>{read_library(by_name[name], filename)}</script>"
        for name, filename in LIBRARIES.items()
    )
    OUT.write_text(PAGE.format(scripts=scripts), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(sys.argv[1:])
