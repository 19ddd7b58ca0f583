"""Measurements on a real model: memory ceiling, throughput, gradient noise scale, sharpness.

Every probe returns a plain result object (a frozen dataclass) that the recommender and the report
consume; nothing reaches back into the probe.
"""
