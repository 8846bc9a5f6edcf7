"""Top-N recommendations, similar items and fold-in, on numpy block kernels inside Spark tasks.

* :func:`recommend_top_k`: top-k dst per src (users x items, items x users, ...) with seen pairs,
  an exclude list and an allow list applied inside the block before the top-k.
* :func:`similar_items`: top-k cosine neighbours of every item, the item itself excluded.
* :func:`fold_in_factors` / :func:`fold_in_new_users`: exact factors of entities unknown to the model.
* :func:`to_string_ids` / :func:`similar_to_string_ids`: the published tables with the original ids.
"""

from mf_spark.recommend.engine import (
    DEFAULT_MAX_BROADCAST_BYTES,
    RECOMMENDATION_SCHEMA,
    recommend_top_k,
    similar_items,
)
from mf_spark.recommend.fold_in import factor_gramian, fold_in_factors, fold_in_new_users
from mf_spark.recommend.tables import (
    RecommendationTables,
    RecommendSettings,
    build_recommendation_tables,
    run_recommend_stage,
    similar_to_string_ids,
    to_string_ids,
)

__all__ = [
    "DEFAULT_MAX_BROADCAST_BYTES",
    "RECOMMENDATION_SCHEMA",
    "RecommendSettings",
    "RecommendationTables",
    "build_recommendation_tables",
    "factor_gramian",
    "fold_in_factors",
    "fold_in_new_users",
    "recommend_top_k",
    "run_recommend_stage",
    "similar_items",
    "similar_to_string_ids",
    "to_string_ids",
]
