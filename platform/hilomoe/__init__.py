"""hilomoe: train and study Hierarchical LoRA Mixture-of-Experts CTR models (arXiv 2510.10432).

The Ray-free core is importable on its own:

    from hilomoe.config import TrainConfig
    from hilomoe.model import CTRModel
    from hilomoe.engine import Engine
"""

__version__ = "0.1.0"
