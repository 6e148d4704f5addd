"""Reports: what a study's trial records say, in numbers, Markdown, HTML and PNG.

    report = write_report(records, out_dir, title)      # report/writer.py

Pure numerics on plain records (dicts, tracking/records.py): Pareto fronts and ROI
(`pareto.py`), per-axis and joint scaling laws (`scaling.py`, `joint_law.py`), the noise-aware
verdict (`verdict.py`), per-trial diagnostics (`diagnostics.py`); the PNG plots (`plots.py`),
the HTML page (`page.py`), and the record fields shared with the study (`fields.py`). Imports
numpy, scipy, matplotlib and markdown only, never torch or Ray, nor the study's modules:
`hilomoe study report` reads JSON.
"""
