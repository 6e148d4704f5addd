"""Why a trial won or lost: its AUC after each stage, its train-vs-valid gap, and how it routed.

    facts = diagnostics(results)        # a trial's per-epoch reports -> what its record keeps

From the epochs a trial reported (study/callback.py), at each stage's best epoch (the model
that stage hands on, which the next stage starts from):
- `stage_auc`: validation AUC after base, experts and joint: what the experts added on a frozen
  base, and what sparse joint fine-tuning added on top;
- `overfit_gap`: validation logloss minus the training task loss at the final model's epoch;
  small data overfits, and a large gap says the extra capacity memorised rather than generalised;
- `routing` of the final model on the validation split: per level the share of experts used
  (utilisation) and the routing entropy (nats; log K is uniform), and the distinct expert paths
  per batch (the combinatorial paths HiLoMoE's levels open up).
"""

from __future__ import annotations

import math

STAGES = ("base", "experts", "joint")


def _best(epochs: list[dict]) -> dict | None:
    scored = [e for e in epochs if isinstance(e.get("valid_auc"), (int, float))
              and math.isfinite(e["valid_auc"])]
    return max(scored, key=lambda e: e["valid_auc"]) if scored else None


def diagnostics(results: list[dict]) -> dict:
    epochs = [r for r in results if "stage" in r and not r.get("final")]
    best = {s: _best([e for e in epochs if e["stage"] == s]) for s in STAGES}
    best = {s: e for s, e in best.items() if e is not None}
    out: dict = {"stage_auc": {s: e["valid_auc"] for s, e in best.items()},
                 "overfit_gap": None, "routing": None}
    if not best:
        return out
    final = best[[s for s in STAGES if s in best][-1]]
    train = final.get("train_task", final.get("train_loss"))
    if isinstance(train, (int, float)) and isinstance(final.get("valid_logloss"), (int, float)):
        out["overfit_gap"] = final["valid_logloss"] - train
    levels = sorted(int(k[len("valid_level"):-len("_utilisation")]) for k in final
                    if k.startswith("valid_level") and k.endswith("_utilisation"))
    if levels:
        out["routing"] = {
            "utilisation": [final[f"valid_level{lv}_utilisation"] for lv in levels],
            "entropy": [final.get(f"valid_level{lv}_entropy") for lv in levels],
            "paths": final.get("valid_paths")}
    return out


def flat(facts: dict) -> dict[str, float]:
    """The diagnostics as MLflow metrics of a trial's run (final values, no step)."""
    out = {f"{s}_valid_auc": v for s, v in facts.get("stage_auc", {}).items()}
    if facts.get("overfit_gap") is not None:
        out["overfit_gap"] = facts["overfit_gap"]
    routing = facts.get("routing") or {}
    for i, (u, e) in enumerate(zip(routing.get("utilisation", []), routing.get("entropy", []))):
        out[f"final_level{i + 1}_utilisation"] = u
        if e is not None:
            out[f"final_level{i + 1}_entropy"] = e
    if routing.get("paths") is not None:
        out["final_paths"] = routing["paths"]
    return out
