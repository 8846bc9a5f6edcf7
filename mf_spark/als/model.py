"""``ImplicitALSModel``: factor tables, scoring, top-k for all, persistence in MLlib's layout."""

from __future__ import annotations

import os
from typing import Any

from pyspark import Broadcast
from pyspark.ml import Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasBlockSize, HasPredictionCol
from pyspark.ml.util import DefaultParamsReader, DefaultParamsWriter, MLReadable, MLReader, MLWritable, MLWriter
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mf_spark.errors import InputDataError


COLD_START_STRATEGIES = ("nan", "drop")


class _ImplicitALSModelParams(HasPredictionCol, HasBlockSize):
    """Params shared by the estimator and the model (as MLlib's ``_ALSModelParams``)."""

    userCol: Param[str] = Param(Params._dummy(), "userCol", "column name for user ids; ids must be within the integer value range",
                                typeConverter=TypeConverters.toString)
    itemCol: Param[str] = Param(Params._dummy(), "itemCol", "column name for item ids; ids must be within the integer value range",
                                typeConverter=TypeConverters.toString)
    coldStartStrategy: Param[str] = Param(
        Params._dummy(), "coldStartStrategy",
        "strategy for unknown or unseen ids at prediction time: 'nan' (NaN prediction) or 'drop' (drop the rows)",
        typeConverter=TypeConverters.toString)

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._setDefault(userCol="user", itemCol="item", coldStartStrategy="nan", blockSize=4096)

    def getUserCol(self) -> str:
        return self.getOrDefault(self.userCol)

    def getItemCol(self) -> str:
        return self.getOrDefault(self.itemCol)

    def getColdStartStrategy(self) -> str:
        # MLlib lower-cases it: "DROP" must drop, not silently keep the NaN rows
        return self.getOrDefault(self.coldStartStrategy).lower()


class ImplicitALSModel(Model, _ImplicitALSModelParams, MLWritable, MLReadable):
    """A fitted :class:`~mf_spark.als.estimator.ImplicitALS` model.

    Attributes
    ----------
    userFactors, itemFactors : DataFrame
        ``id`` int, ``features`` array<float> (MLlib's layout).
    rank : int
    trainingLoss : list of float
        The exact objective after each iteration (data term over all user-item pairs, computed with the
        Gramian trick, plus the regularisation terms).
    trainingParams : dict
        The estimator's parameters the model was fitted with (``regParam``, ``alpha``, ``solver``, ...),
        saved with the model: MLlib's model keeps only its own few Params, so a saved model could not be
        traced to how it was trained. Empty for a model built by hand or saved without them.
    provenance : dict
        Free-form record of where the model came from (``jobs/train.py`` puts the interactions' path and
        :func:`mf_spark.publish.provenance` there: command line, git commit, versions, host), saved with
        the model.
    trainingBroadcasts : list of Broadcast
        The broadcasts of the fit's last iterations (since its last checkpoint): the fixed side's Gramian
        and, below ``broadcastThreshold``, its factors. They are in the factor tables' lineage, which
        Spark serialises into every task that reads the tables, cached or not; each also keeps a driver
        temp file until the session stops. Destroy them (``Broadcast.destroy()``) once nothing will read
        ``userFactors``/``itemFactors`` again (written to Parquet and re-read, or released), as the nightly
        and the evaluation do: a fit-and-discard loop otherwise fills the driver's disk. After that any
        job on those tables fails with "Task not serializable". Empty for a loaded model.
    """

    def __init__(self, rank: int = 0, userFactors: DataFrame | None = None, itemFactors: DataFrame | None = None,
                 trainingLoss: list[float] | None = None, iterationSeconds: list[float] | None = None):
        super().__init__()
        self._rank = rank
        self._user_factors = userFactors
        self._item_factors = itemFactors
        self.trainingLoss = list(trainingLoss or [])
        self.iterationSeconds = list(iterationSeconds or [])
        self.trainingParams: dict[str, Any] = {}
        self.provenance: dict[str, Any] = {}
        self.trainingBroadcasts: list[Broadcast] = []

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def userFactors(self) -> DataFrame:
        assert self._user_factors is not None
        return self._user_factors

    @property
    def itemFactors(self) -> DataFrame:
        assert self._item_factors is not None
        return self._item_factors

    def setUserCol(self, value: str) -> ImplicitALSModel:
        return self._set(userCol=value)

    def setItemCol(self, value: str) -> ImplicitALSModel:
        return self._set(itemCol=value)

    def setColdStartStrategy(self, value: str) -> ImplicitALSModel:
        if value.lower() not in COLD_START_STRATEGIES:
            raise ValueError(f"coldStartStrategy must be one of {COLD_START_STRATEGIES}, got {value!r}")
        return self._set(coldStartStrategy=value)

    def setPredictionCol(self, value: str) -> ImplicitALSModel:
        return self._set(predictionCol=value)

    def setBlockSize(self, value: int) -> ImplicitALSModel:
        return self._set(blockSize=value)

    # -- scoring ---------------------------------------------------------------------------------
    def _transform(self, dataset: DataFrame) -> DataFrame:
        user_col, item_col, pred_col = self.getUserCol(), self.getItemCol(), self.getPredictionCol()
        # as MLlib's transformSchema: overwriting another model's predictions silently lost them
        if pred_col in dataset.columns:
            raise InputDataError(f"ImplicitALSModel: input already has a column '{pred_col}' (predictionCol)")
        # a param map given to transform() bypasses setColdStartStrategy's check
        if self.getColdStartStrategy() not in COLD_START_STRATEGIES:
            raise ValueError(f"coldStartStrategy must be one of {COLD_START_STRATEGIES}, "
                             f"got {self.getOrDefault(self.coldStartStrategy)!r}")
        for col in (user_col, item_col):
            if col not in dataset.columns:
                raise InputDataError(f"ImplicitALSModel: input has no column '{col}' (columns: {', '.join(dataset.columns)})")
            if not isinstance(dataset.schema[col].dataType, T.NumericType):
                raise InputDataError(f"ImplicitALSModel: column '{col}' must be numeric ids, "
                                     f"got {dataset.schema[col].dataType.simpleString()}")
        users = self.userFactors.select(F.col("id").alias("__uid"), F.col("features").alias("__uf"))
        items = self.itemFactors.select(F.col("id").alias("__iid"), F.col("features").alias("__if"))
        # Joined without a cast to int: Spark widens both sides, so an id beyond the int range (or 1.5)
        # simply matches no factor and is a cold start, where cast("int") failed the whole job with
        # CAST_OVERFLOW under ANSI mode (Spark 4's default).
        joined = (
            dataset.join(users, F.col(user_col) == F.col("__uid"), "left")
            .join(items, F.col(item_col) == F.col("__iid"), "left")
        )
        dot = F.aggregate(F.zip_with("__uf", "__if", lambda a, b: a * b), F.lit(0.0), lambda acc, x: acc + x)
        prediction = F.when(F.col("__uf").isNull() | F.col("__if").isNull(), F.lit(float("nan"))).otherwise(dot)
        out = joined.withColumn(pred_col, prediction.cast("float")).drop("__uid", "__uf", "__iid", "__if")
        if self.getColdStartStrategy() == "drop":
            out = out.na.drop(subset=[pred_col])
        return out

    def _recommend(self, src: DataFrame, dst: DataFrame, k: int, src_name: str, dst_name: str) -> DataFrame:
        from mf_spark.recommend import recommend_top_k

        block = self.getOrDefault(self.blockSize)
        recs = recommend_top_k(src, dst, k, src_block_size=block)
        nested = recs.groupBy("src").agg(
            F.sort_array(F.collect_list(F.struct("rank", "dst", "score"))).alias("ranked")
        )
        return nested.select(
            F.col("src").alias(src_name),
            F.transform("ranked", lambda r: F.struct(r["dst"].alias(dst_name), r["score"].alias("rating"))).alias(
                "recommendations"
            ),
        )

    def recommendForAllUsers(self, numItems: int) -> DataFrame:
        """Top ``numItems`` items per user: ``user, recommendations array<struct<item, rating>>``.

        As MLlib's, items the user already has are *not* excluded here; use
        :func:`mf_spark.recommend.recommend_top_k` with ``seen=`` for that.
        """
        return self._recommend(self.userFactors, self.itemFactors, numItems, self.getUserCol(), self.getItemCol())

    def recommendForAllItems(self, numUsers: int) -> DataFrame:
        """Top ``numUsers`` users per item: ``item, recommendations array<struct<user, rating>>``."""
        return self._recommend(self.itemFactors, self.userFactors, numUsers, self.getItemCol(), self.getUserCol())

    def recommendForUserSubset(self, dataset: DataFrame, numItems: int) -> DataFrame:
        """As :meth:`recommendForAllUsers` for the distinct users of ``dataset[userCol]``."""
        subset = self.userFactors.join(dataset.select(F.col(self.getUserCol()).alias("id")).distinct(), "id", "left_semi")
        return self._recommend(subset, self.itemFactors, numItems, self.getUserCol(), self.getItemCol())

    def recommendForItemSubset(self, dataset: DataFrame, numUsers: int) -> DataFrame:
        """As :meth:`recommendForAllItems` for the distinct items of ``dataset[itemCol]``."""
        subset = self.itemFactors.join(dataset.select(F.col(self.getItemCol()).alias("id")).distinct(), "id", "left_semi")
        return self._recommend(subset, self.userFactors, numUsers, self.getItemCol(), self.getUserCol())

    # -- persistence ------------------------------------------------------------------------------
    def write(self) -> MLWriter:
        return _ImplicitALSModelWriter(self)

    @classmethod
    def read(cls) -> MLReader:
        return _ImplicitALSModelReader(cls)


class _ImplicitALSModelWriter(MLWriter):
    """Writes ``metadata/`` (params, rank, loss) and ``userFactors/``, ``itemFactors/`` Parquet."""

    def __init__(self, instance: ImplicitALSModel):
        super().__init__()
        self.instance = instance

    def saveImpl(self, path: str) -> None:
        extra = {"rank": self.instance.rank, "trainingLoss": self.instance.trainingLoss,
                 "iterationSeconds": self.instance.iterationSeconds,
                 "trainingParams": self.instance.trainingParams, "provenance": self.instance.provenance}
        DefaultParamsWriter.saveMetadata(self.instance, path, self.sparkSession.sparkContext, extraMetadata=extra)
        self.instance.userFactors.write.parquet(os.path.join(path, "userFactors"))
        self.instance.itemFactors.write.parquet(os.path.join(path, "itemFactors"))


#: Saved model classes :meth:`ImplicitALSModel.load` reads: its own, and MLlib's (same layout).
LOADABLE_MODEL_CLASSES = ("mf_spark.als.model.ImplicitALSModel", "org.apache.spark.ml.recommendation.ALSModel")


class _ImplicitALSModelReader(MLReader):
    def __init__(self, cls: type):
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> ImplicitALSModel:
        spark = SparkSession.active()
        metadata = DefaultParamsReader.loadMetadata(path, spark.sparkContext)
        if metadata["class"] not in LOADABLE_MODEL_CLASSES:
            # an estimator's directory failed with a bare KeyError: 'rank'
            raise ValueError(f"{path} holds a saved {metadata['class']}, not a model of "
                             f"{' or '.join(LOADABLE_MODEL_CLASSES)}")
        model = ImplicitALSModel(
            rank=int(metadata["rank"]),
            userFactors=spark.read.parquet(os.path.join(path, "userFactors")),
            itemFactors=spark.read.parquet(os.path.join(path, "itemFactors")),
            trainingLoss=[float(x) for x in metadata.get("trainingLoss", [])],
            iterationSeconds=[float(x) for x in metadata.get("iterationSeconds", [])],
        )
        model.trainingParams = dict(metadata.get("trainingParams") or {})
        model.provenance = dict(metadata.get("provenance") or {})
        model._resetUid(metadata["uid"])
        DefaultParamsReader.getAndSetParams(model, metadata)
        return model

