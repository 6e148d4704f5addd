"""The CTR model and its variants: function preservation, FLOPs and parameter accounting."""

from __future__ import annotations

import pytest
import torch

from conftest import MOE_VARIANTS, VARIANTS, model_config, random_inputs
from hilomoe.config import BackboneConfig, ModelConfig, MoEConfig, Variant
from hilomoe.model import CTRModel, RoutingMode, measured_flops, model_cost


@pytest.mark.parametrize("variant", MOE_VARIANTS)
@pytest.mark.parametrize("mode", [RoutingMode.DENSE, RoutingMode.SPARSE])
def test_zero_up_factors_give_exactly_the_base_model(schema, variant, mode):
    """A freshly built MoE model equals the non-MoE model with the same base weights, exactly."""
    moe_model = CTRModel(schema, model_config(variant))
    dense_model = CTRModel(schema, model_config(Variant.DENSE))
    missing = dense_model.load_state_dict(moe_model.state_dict(), strict=False)
    assert not missing.missing_keys  # every base weight was copied
    moe_model.set_routing(mode)
    cat, num = random_inputs(schema, 64)
    with torch.no_grad():
        y_moe, routings = moe_model(cat, num)
        y_dense, none = dense_model(cat, num)
    assert len(routings) == len(moe_model.moe_layers()) > 0 and none == []
    assert torch.equal(y_moe, y_dense)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", [RoutingMode.SPARSE, RoutingMode.DENSE, RoutingMode.OFF])
@pytest.mark.parametrize("structure", ["parallel", "stacked"])
def test_flops_match_flop_counter_and_params_match_the_model(schema, variant, mode, structure):
    cfg = model_config(variant)
    cfg = cfg.model_copy(update={"backbone": cfg.backbone.model_copy(update={"structure": structure})})
    model = CTRModel(schema, cfg)
    model.set_routing(mode)
    batch = 128
    cost = model_cost(schema, cfg, mode, batch)
    measured = measured_flops(model, *random_inputs(schema, batch))
    assert measured == pytest.approx(cost.flops, rel=0.02)
    # the state holds every parameter, the TorchRec tables (kept outside `parameters()`) too
    assert cost.params_total == sum(v.numel() for v in model.state_dict().values())
    tables = sum(t.numel() for t in model.embedding.tables().values())
    assert cost.params_embedding == tables + model.embedding.numeric.numel()
    assert cost.params_embedding < cost.params_total


@pytest.mark.parametrize("moe", [
    dict(variant=Variant.HILOMOE, rank=3),
    dict(variant=Variant.HILOMOE, router_projection="learned"),
    dict(variant=Variant.HILOMOE, levels=1),
    dict(variant=Variant.HILOMOE, levels=6, experts=16, top_k=4),
    dict(variant=Variant.FLAT, rank=2),
    dict(variant=Variant.SEQUENTIAL, levels=5),
    dict(variant=Variant.DENSE_EXPERTS, experts=6, top_k=3),
    dict(variant=Variant.HILOMOE, apply_to=("cross",)),
    dict(variant=Variant.HILOMOE, levels=0),
])
def test_flops_match_flop_counter_across_knobs(schema, moe):
    cfg = model_config(**moe)
    model = CTRModel(schema, cfg)
    cost = model_cost(schema, cfg, RoutingMode.SPARSE, 96)
    assert measured_flops(model, *random_inputs(schema, 96)) == pytest.approx(cost.flops, rel=0.02)
    assert cost.params_total == sum(v.numel() for v in model.state_dict().values())


def test_active_params_and_flops_grow_with_experts_only_through_routing(schema):
    """Sparse FLOPs grow with K only by the routing (down) products, not by the up-projections."""
    small = model_cost(schema, model_config(levels=2, experts=4, top_k=2))
    large = model_cost(schema, model_config(levels=2, experts=16, top_k=2))
    assert large.params_total > small.params_total
    d0 = schema.num_fields * 4
    per_layer_routing = 2 * d0 * 2 * (16 - 4)  # down-projection of the 24 extra keys, d_in = d0
    assert large.flops - small.flops >= per_layer_routing
    assert large.params_active < large.params_total


def test_one_config_schema_builds_every_variant(schema):
    for variant in VARIANTS:
        model = CTRModel(schema, model_config(variant))
        y, routings = model(*random_inputs(schema, 8))
        assert y.shape == (8,)
        assert model.has_experts == (variant is not Variant.DENSE)


def test_backbone_shapes(schema):
    for mlp, cross, structure in [((), 2, "parallel"), ((8,), 0, "stacked"), ((8, 4), 1, "stacked")]:
        cfg = ModelConfig(embedding_dim=3, backbone=BackboneConfig(mlp=mlp, cross_layers=cross,
                                                                   structure=structure),
                          moe=MoEConfig(levels=2, experts=3, top_k=1))
        y, _ = CTRModel(schema, cfg)(*random_inputs(schema, 5))
        assert y.shape == (5,)
