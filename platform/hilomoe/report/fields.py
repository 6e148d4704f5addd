"""The trial-record vocabulary the study writes and the report reads (tracking/records.py).

A fixed point of a study (a repeat, a law design's grid point) is a Tune point holding its
settings already resolved under `FIXED`; its record says what it is for under `REPEAT_OF` (the
search trial it repeats: report/verdict.py) or `DESIGN_AXIS` (the axis of its law design:
study/design.py). Here, not in the study's modules, so that the report needs neither Tune nor
the study file's types.
"""

from __future__ import annotations

FIXED, REPEAT_OF, DESIGN_AXIS = "settings", "repeat_of", "design_axis"

#: A law design's axis -> the dotted setting it varies.
SETTING = {"experts": "model.moe.experts", "levels": "model.moe.levels",
           "rank": "model.moe.rank", "mlp_width": "model.backbone.mlp",
           "train_size": "data.train_fraction"}
#: A law design's axis -> the record field its law is fitted along (report/scaling.py).
DESIGN_FIELD = {"experts": "experts", "levels": "levels", "rank": "rank",
                "mlp_width": "mlp_width", "train_size": "train_rows"}
