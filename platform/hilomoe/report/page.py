"""`report.md` as one self-contained HTML page (`report.html`), for MLflow's artifact viewer."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

HTML_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 1.5rem auto;
       padding: 0 1rem; line-height: 1.45; color: #1f2328; }}
table {{ border-collapse: collapse; margin: 0.8rem 0; font-size: 0.92rem; }}
th, td {{ border: 1px solid #d0d7de; padding: 0.25rem 0.6rem; text-align: left; }}
th {{ background: #f6f8fa; }}
img {{ max-width: 100%; }}
code, pre {{ background: #f6f8fa; border-radius: 4px; }}
pre {{ padding: 0.6rem; overflow-x: auto; }}
</style></head>
<body>
{body}
</body></html>
"""


def html_page(text: str, title: str, images: Path, links: dict[str, str] | None = None) -> str:
    """`report.md` as one self-contained HTML page. MLflow's artifact viewer renders HTML, not
    Markdown, and shows it in a frame that cannot fetch the plots beside it: the plots are
    inlined (data: URIs), and each trial id links to its MLflow run (`links`), opened in the
    whole window."""
    import markdown as md

    body = md.markdown(text, extensions=["tables", "fenced_code"])
    for trial, url in (links or {}).items():  # before inlining: never inside an image's data
        body = re.sub(rf"(?<=[>\s(]){re.escape(trial)}(?=[<\s,;)])",
                      f'<a href="{html.escape(url)}" target="_top">{trial}</a>', body)

    def inline(match: re.Match) -> str:
        path = images / match.group(1)
        if not path.is_file():
            return match.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'src="([^"/]+\.png)"', inline, body)
    return HTML_PAGE.format(title=html.escape(title), body=body)
