"""``ImplicitALS``: a pyspark.ml Estimator with MLlib ALS's parameters, implicit feedback only.

Change ``from pyspark.ml.recommendation import ALS`` to ``from mf_spark import ImplicitALS as ALS`` and
an ``ALS(implicitPrefs=True, ...)`` pipeline keeps working. Differences from MLlib, all deliberate:

* duplicate (user, item) rows are summed before training (MLlib adds each row's term again);
* checkpointing works without setup (a temporary checkpoint dir is used when none is set);
* extras: ``solver`` ("cholesky" exact, "cg" conjugate gradient warm-started from the previous
  factors with ``cgSteps``), ``regularization`` ("count" as MLlib, "constant", "frequency"),
  ``confidence`` ("linear" as MLlib, "log"), and a warm start from ``initialModel``.
"""

from __future__ import annotations

import logging
from typing import Any

from pyspark import StorageLevel
from pyspark.ml import Estimator
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasCheckpointInterval, HasMaxIter, HasRegParam, HasSeed
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsReader, DefaultParamsWritable
from pyspark.sql import DataFrame, SparkSession
from pyspark import keyword_only

from mf_spark.als.blocks import select_ratings
from mf_spark.als.model import COLD_START_STRATEGIES, ImplicitALSModel, _ImplicitALSModelParams
from mf_spark.als.params import CONFIDENCES, REGULARIZATIONS, SOLVERS, SolveParams
from mf_spark.als.train import TrainSettings, factors_to_frame, train_implicit

log = logging.getLogger(__name__)


def storage_level(name: str, param: str) -> StorageLevel:
    """The :class:`~pyspark.StorageLevel` of one of Spark's level names, as MLlib takes them.

    Python data is always serialized, so the ``_SER`` levels MLlib accepts (``MEMORY_AND_DISK_SER``)
    are the plain ones here.

    Raises
    ------
    ValueError
        Naming ``param`` when ``name`` is not a storage level.
    """
    key = name.strip().upper().replace("_SER", "")
    level = getattr(StorageLevel, key, None)
    if not isinstance(level, StorageLevel):
        raise ValueError(f"{param} = {name!r} is not a storage level (e.g. MEMORY_AND_DISK, MEMORY_ONLY, DISK_ONLY)")
    return level


def _param(name: str, doc: str, converter: Any) -> Param:
    return Param(Params._dummy(), name, doc, typeConverter=converter)


class _ImplicitALSParams(_ImplicitALSModelParams, HasMaxIter, HasRegParam, HasCheckpointInterval, HasSeed):
    rank = _param("rank", "rank of the factorization", TypeConverters.toInt)
    numUserBlocks = _param("numUserBlocks", "number of user blocks", TypeConverters.toInt)
    numItemBlocks = _param("numItemBlocks", "number of item blocks", TypeConverters.toInt)
    implicitPrefs = _param("implicitPrefs", "accepted for MLlib compatibility; must be true", TypeConverters.toBoolean)
    alpha = _param("alpha", "confidence scale: c = 1 + alpha*|r|", TypeConverters.toFloat)
    ratingCol = _param("ratingCol", "column name for ratings (strengths)", TypeConverters.toString)
    nonnegative = _param("nonnegative", "accepted for MLlib compatibility; must be false", TypeConverters.toBoolean)
    intermediateStorageLevel = _param("intermediateStorageLevel", "StorageLevel for intermediate datasets; cannot be 'NONE'",
                                      TypeConverters.toString)
    finalStorageLevel = _param("finalStorageLevel", "StorageLevel for the factor DataFrames", TypeConverters.toString)
    solver = _param("solver", "least-squares solver: 'cholesky' (exact) or 'cg' (conjugate gradient)", TypeConverters.toString)
    cgSteps = _param("cgSteps", "conjugate gradient steps per half-iteration", TypeConverters.toInt)
    regularization = _param("regularization", "lambda scaling: 'count' (MLlib), 'constant' or 'frequency'",
                            TypeConverters.toString)
    confidence = _param("confidence", "confidence: 'linear' 1+alpha|r| or 'log' 1+alpha*log(1+|r|/epsilon)",
                        TypeConverters.toString)
    confidenceEpsilon = _param("confidenceEpsilon", "epsilon of the log confidence", TypeConverters.toFloat)
    frequencyAlpha0 = _param("frequencyAlpha0", "alpha0 of frequency regularization", TypeConverters.toFloat)
    frequencyNu = _param("frequencyNu", "exponent nu of frequency regularization", TypeConverters.toFloat)
    broadcastThreshold = _param("broadcastThreshold",
                                "bytes; when the fixed side's factors are at most this, broadcast them instead of routing",
                                TypeConverters.toInt)
    computeLoss = _param("computeLoss", "compute the exact objective after each iteration", TypeConverters.toBoolean)

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._setDefault(
            rank=10, maxIter=10, regParam=0.1, numUserBlocks=10, numItemBlocks=10, implicitPrefs=True, alpha=1.0,
            ratingCol="rating", nonnegative=False, checkpointInterval=10, intermediateStorageLevel="MEMORY_AND_DISK",
            finalStorageLevel="MEMORY_AND_DISK", seed=0, solver="cg", cgSteps=3, regularization="count",
            confidence="linear", confidenceEpsilon=1.0, frequencyAlpha0=0.1, frequencyNu=1.0,
            broadcastThreshold=64 * 1024 * 1024, computeLoss=True,
        )

    # MLlib's getters (HasMaxIter, HasRegParam, HasCheckpointInterval and HasSeed bring the rest)
    def getRank(self) -> int:
        return self.getOrDefault(self.rank)

    def getNumUserBlocks(self) -> int:
        return self.getOrDefault(self.numUserBlocks)

    def getNumItemBlocks(self) -> int:
        return self.getOrDefault(self.numItemBlocks)

    def getImplicitPrefs(self) -> bool:
        return self.getOrDefault(self.implicitPrefs)

    def getAlpha(self) -> float:
        return self.getOrDefault(self.alpha)

    def getRatingCol(self) -> str:
        return self.getOrDefault(self.ratingCol)

    def getNonnegative(self) -> bool:
        return self.getOrDefault(self.nonnegative)

    def getIntermediateStorageLevel(self) -> str:
        return self.getOrDefault(self.intermediateStorageLevel)

    def getFinalStorageLevel(self) -> str:
        return self.getOrDefault(self.finalStorageLevel)

    # this project's own parameters
    def getSolver(self) -> str:
        return self.getOrDefault(self.solver)

    def getCgSteps(self) -> int:
        return self.getOrDefault(self.cgSteps)

    def getRegularization(self) -> str:
        return self.getOrDefault(self.regularization)

    def getConfidence(self) -> str:
        return self.getOrDefault(self.confidence)

    def getConfidenceEpsilon(self) -> float:
        return self.getOrDefault(self.confidenceEpsilon)

    def getFrequencyAlpha0(self) -> float:
        return self.getOrDefault(self.frequencyAlpha0)

    def getFrequencyNu(self) -> float:
        return self.getOrDefault(self.frequencyNu)

    def getBroadcastThreshold(self) -> int:
        return self.getOrDefault(self.broadcastThreshold)

    def getComputeLoss(self) -> bool:
        return self.getOrDefault(self.computeLoss)

    def solve_params(self) -> SolveParams:
        return SolveParams(
            alpha=self.getOrDefault(self.alpha), reg_param=self.getOrDefault(self.regParam),
            regularization=self.getOrDefault(self.regularization), confidence=self.getOrDefault(self.confidence),
            confidence_epsilon=self.getOrDefault(self.confidenceEpsilon),
            frequency_alpha0=self.getOrDefault(self.frequencyAlpha0), frequency_nu=self.getOrDefault(self.frequencyNu),
            solver=self.getOrDefault(self.solver), cg_steps=self.getOrDefault(self.cgSteps),
        )


class ImplicitALS(Estimator, _ImplicitALSParams, DefaultParamsWritable, DefaultParamsReadable):
    """Block-partitioned implicit ALS (Hu, Koren and Volinsky 2008) on Spark.

    Minimises ``sum_{u,i} c_ui (p_ui - x_u.y_i)^2 + sum_u lambda_u |x_u|^2 + sum_i lambda_i |y_i|^2``
    with ``p = [r > 0]``, ``c = 1 + alpha*|r|`` and, by default, ``lambda_u = regParam * n_u^+`` (the
    count of positive entries, as MLlib). Each half-step solves, for every user,
    ``(YtY + sum_i (c_ui - 1) y_i y_i^T + lambda_u I) x_u = sum_{r_ui>0} c_ui y_i``
    with the Gramian ``YtY`` computed once per half-step.

    Parameters use MLlib's names and defaults (``rank=10, maxIter=10, regParam=0.1, alpha=1.0,
    numUserBlocks=numItemBlocks=10, checkpointInterval=10``), except ``solver`` which defaults to
    ``"cg"`` (3 steps); ``solver="cholesky"`` gives MLlib's exact solve. ``initialModel`` (an
    :class:`ImplicitALSModel`) warm-starts the fit: known ids keep their factors, new ids start random.
    It is a plain attribute, not a persisted Param.

    Notes
    -----
    The input should be deterministic (see MLlib's note, SPARK-28927): read it from storage or
    checkpoint it rather than sampling a repartitioned DataFrame.
    """

    @keyword_only
    def __init__(self, *, rank: int = 10, maxIter: int = 10, regParam: float = 0.1, numUserBlocks: int = 10,
                 numItemBlocks: int = 10, implicitPrefs: bool = True, alpha: float = 1.0, userCol: str = "user",
                 itemCol: str = "item", seed: int | None = None, ratingCol: str = "rating", nonnegative: bool = False,
                 checkpointInterval: int = 10, intermediateStorageLevel: str = "MEMORY_AND_DISK",
                 finalStorageLevel: str = "MEMORY_AND_DISK", coldStartStrategy: str = "nan", blockSize: int = 4096,
                 predictionCol: str = "prediction", solver: str = "cg", cgSteps: int = 3,
                 regularization: str = "count", confidence: str = "linear", confidenceEpsilon: float = 1.0,
                 frequencyAlpha0: float = 0.1, frequencyNu: float = 1.0, broadcastThreshold: int = 64 * 1024 * 1024,
                 computeLoss: bool = True, initialModel: ImplicitALSModel | None = None):
        super().__init__()
        self.initialModel = initialModel
        kwargs = dict(self._input_kwargs)
        kwargs.pop("initialModel", None)
        if kwargs.get("seed") is None:
            kwargs.pop("seed", None)
        self._set(**kwargs)

    @keyword_only
    def setParams(self, **kwargs: Any) -> ImplicitALS:
        if "initialModel" in kwargs:
            self.initialModel = kwargs.pop("initialModel")
        if "seed" in kwargs and kwargs["seed"] is None:
            kwargs.pop("seed")
            self.clear(self.seed)
        return self._set(**kwargs)

    def setInitialModel(self, model: ImplicitALSModel | None) -> ImplicitALS:
        self.initialModel = model
        return self

    # MLlib's setters, so that code written for pyspark.ml.recommendation.ALS keeps working
    def setRank(self, value: int) -> ImplicitALS:
        return self._set(rank=value)

    def setNumUserBlocks(self, value: int) -> ImplicitALS:
        return self._set(numUserBlocks=value)

    def setNumItemBlocks(self, value: int) -> ImplicitALS:
        return self._set(numItemBlocks=value)

    def setNumBlocks(self, value: int) -> ImplicitALS:
        """Sets both numUserBlocks and numItemBlocks."""
        return self._set(numUserBlocks=value, numItemBlocks=value)

    def setImplicitPrefs(self, value: bool) -> ImplicitALS:
        return self._set(implicitPrefs=value)

    def setAlpha(self, value: float) -> ImplicitALS:
        return self._set(alpha=value)

    def setUserCol(self, value: str) -> ImplicitALS:
        return self._set(userCol=value)

    def setItemCol(self, value: str) -> ImplicitALS:
        return self._set(itemCol=value)

    def setRatingCol(self, value: str) -> ImplicitALS:
        return self._set(ratingCol=value)

    def setNonnegative(self, value: bool) -> ImplicitALS:
        return self._set(nonnegative=value)

    def setCheckpointInterval(self, value: int) -> ImplicitALS:
        return self._set(checkpointInterval=value)

    def setIntermediateStorageLevel(self, value: str) -> ImplicitALS:
        return self._set(intermediateStorageLevel=value)

    def setFinalStorageLevel(self, value: str) -> ImplicitALS:
        return self._set(finalStorageLevel=value)

    def setColdStartStrategy(self, value: str) -> ImplicitALS:
        return self._set(coldStartStrategy=value)

    def setMaxIter(self, value: int) -> ImplicitALS:
        return self._set(maxIter=value)

    def setRegParam(self, value: float) -> ImplicitALS:
        return self._set(regParam=value)

    def setPredictionCol(self, value: str) -> ImplicitALS:
        return self._set(predictionCol=value)

    def setBlockSize(self, value: int) -> ImplicitALS:
        return self._set(blockSize=value)

    def setSeed(self, value: int | None) -> ImplicitALS:
        # None means "the default seed" (as in the constructor); storing None would only fail later,
        # inside the executors that draw the initial factors.
        if value is None:
            self.clear(self.seed)
            return self
        return self._set(seed=value)

    def setSolver(self, value: str) -> ImplicitALS:
        return self._set(solver=value)

    def setCgSteps(self, value: int) -> ImplicitALS:
        return self._set(cgSteps=value)

    def setRegularization(self, value: str) -> ImplicitALS:
        return self._set(regularization=value)

    def setConfidence(self, value: str) -> ImplicitALS:
        return self._set(confidence=value)

    def setConfidenceEpsilon(self, value: float) -> ImplicitALS:
        return self._set(confidenceEpsilon=value)

    def setFrequencyAlpha0(self, value: float) -> ImplicitALS:
        return self._set(frequencyAlpha0=value)

    def setFrequencyNu(self, value: float) -> ImplicitALS:
        return self._set(frequencyNu=value)

    def setBroadcastThreshold(self, value: int) -> ImplicitALS:
        return self._set(broadcastThreshold=value)

    def setComputeLoss(self, value: bool) -> ImplicitALS:
        return self._set(computeLoss=value)

    @classmethod
    def read(cls) -> DefaultParamsReader:
        return _ImplicitALSReader(cls)

    def _copyValues(self, to: Any, extra: Any = None) -> Any:
        to = super()._copyValues(to, extra)
        if isinstance(to, ImplicitALS):
            to.initialModel = getattr(self, "initialModel", None)
        return to

    def _validate(self) -> None:
        get = self.getOrDefault
        if not get(self.implicitPrefs):
            raise ValueError("ImplicitALS only supports implicitPrefs=True (use MLlib's ALS for explicit ratings)")
        if get(self.nonnegative):
            raise ValueError("ImplicitALS does not support nonnegative=True")
        if get(self.rank) < 1 or get(self.numUserBlocks) < 1 or get(self.numItemBlocks) < 1:
            raise ValueError("rank, numUserBlocks and numItemBlocks must be >= 1")
        if get(self.maxIter) < 0:  # as MLlib: 0 returns the initial factors (random, or initialModel's)
            raise ValueError(f"maxIter must be >= 0, got {get(self.maxIter)}")
        if get(self.checkpointInterval) < -1:
            raise ValueError(f"checkpointInterval must be >= 1, or -1 (or 0) for none, got {get(self.checkpointInterval)}")
        if get(self.solver) not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}")
        if get(self.regularization) not in REGULARIZATIONS:
            raise ValueError(f"regularization must be one of {REGULARIZATIONS}")
        if get(self.confidence) not in CONFIDENCES:
            raise ValueError(f"confidence must be one of {CONFIDENCES}")
        if self.getColdStartStrategy() not in COLD_START_STRATEGIES:
            raise ValueError(f"coldStartStrategy must be one of {COLD_START_STRATEGIES}, got {get(self.coldStartStrategy)!r}")
        if storage_level(get(self.intermediateStorageLevel), "intermediateStorageLevel") == StorageLevel.NONE:
            raise ValueError("intermediateStorageLevel cannot be NONE: ALS persists its blocks")
        storage_level(get(self.finalStorageLevel), "finalStorageLevel")

    def _fit(self, dataset: DataFrame) -> ImplicitALSModel:
        self._validate()
        get = self.getOrDefault
        spark = SparkSession.active()
        columns = (get(self.userCol), get(self.itemCol), get(self.ratingCol))
        ratings = select_ratings(dataset, *columns)
        settings = TrainSettings(
            rank=get(self.rank), max_iter=get(self.maxIter), solve=self.solve_params(),
            num_user_blocks=get(self.numUserBlocks), num_item_blocks=get(self.numItemBlocks), seed=get(self.seed),
            checkpoint_interval=get(self.checkpointInterval),
            intermediate_storage=storage_level(get(self.intermediateStorageLevel), "intermediateStorageLevel"),
            broadcast_threshold_bytes=get(self.broadcastThreshold), compute_loss=get(self.computeLoss),
        )
        initial = getattr(self, "initialModel", None)
        if initial is not None and initial.rank != settings.rank:
            raise ValueError(f"initialModel has rank {initial.rank}, but rank is {settings.rank}")
        result = train_implicit(
            spark, ratings, settings,
            initial_user_factors=None if initial is None else initial.userFactors,
            initial_item_factors=None if initial is None else initial.itemFactors,
            column_names=columns,
        )
        final_level = storage_level(get(self.finalStorageLevel), "finalStorageLevel")
        user_factors = factors_to_frame(spark, result.user_factors)
        item_factors = factors_to_frame(spark, result.item_factors)
        if final_level != StorageLevel.NONE:
            user_factors = user_factors.persist(final_level)
            item_factors = item_factors.persist(final_level)
            user_factors.count()
            item_factors.count()
            result.user_factors.unpersist()
            result.item_factors.unpersist()
        model = ImplicitALSModel(settings.rank, user_factors, item_factors, result.training_loss, result.iteration_seconds)
        model.trainingBroadcasts = result.broadcasts
        model.trainingParams = {param.name: value for param, value in self.extractParamMap().items()}
        model._resetUid(self.uid)
        return self._copyValues(model)


class _ImplicitALSReader(DefaultParamsReader):
    """Loads a saved :class:`ImplicitALS`, refusing another class's directory: PySpark's default reader
    built whatever class the metadata names, so ``ImplicitALS.load(model_dir)`` returned a model."""

    def load(self, path: str) -> ImplicitALS:
        expected = f"{ImplicitALS.__module__}.{ImplicitALS.__name__}"
        DefaultParamsReader.loadMetadata(path, self.sparkSession, expectedClassName=expected)
        return super().load(path)
