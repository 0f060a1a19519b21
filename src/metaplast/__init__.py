"""metaplast: meta-learn interpretable plasticity rules (Shervani-Tabar & Rosenbaum 2023)."""

__version__ = "0.1.0"
