"""mf-spark: an implicit-feedback recommender pipeline on Apache Spark."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["ImplicitALS", "ImplicitALSModel", "__version__"]


def __getattr__(name: str):  # lazy: importing mf_spark.config must not import pyspark
    if name in ("ImplicitALS", "ImplicitALSModel"):
        from mf_spark.als import estimator

        return getattr(estimator, name)
    raise AttributeError(name)
