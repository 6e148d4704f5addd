"""Model layers (routing, experts, projections), the CTR model, and its FLOP accounting."""

from hilomoe.model.ctr import CTRModel, projection_specs
from hilomoe.schema import FeatureSchema
from hilomoe.model.flops import Cost, measured_flops, model_cost, projection_cost
from hilomoe.model.layers import Projection, make_projection
from hilomoe.model.routing import Routing, RoutingMode

__all__ = [
    "CTRModel", "Cost", "FeatureSchema", "Projection", "Routing", "RoutingMode",
    "make_projection", "measured_flops", "model_cost", "projection_cost", "projection_specs",
]
