"""The family of a served model, as the API goes by it: what its live workers say, else what its
workers said last (a record each worker writes when it starts), else the default family."""

import logging
from collections import Counter
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError
from redis import Redis
from redis.exceptions import RedisError

from shared.families import DEFAULT_FAMILY, FAMILIES, ModelFamily, ModelFamilyName
from shared.info import WorkerInfo

log = logging.getLogger(__name__)

# A hash: model -> its FamilyRecord as JSON. Never expires: it stands for a model while no worker
# of it is live (the deployment's default, with its workers scaled to zero).
MODEL_FAMILIES_KEY = "t2i:model-families"


class FamilyRecord(BaseModel):
    """What a model's workers last said of it."""

    family: ModelFamilyName
    cross_attention_dim: int | None = None


@dataclass(frozen=True)
class ModelTarget:
    """A model as a request is checked against it."""

    model: str
    family: ModelFamily
    # The text features its UNet's cross-attention takes; None when nothing says.
    cross_attention_dim: int | None
    # False when nothing (no live worker, no record) said which family it is.
    known: bool = True

    def describe(self) -> str:
        """`the model 'x' (SDXL, its cross-attention taking 2048 text features)`."""
        dim = self.cross_attention_dim
        features = "" if dim is None else f", its cross-attention taking {dim} text features"
        return f"the model {self.model!r} ({self.family.title}{features})"


def record_model_family(redis: Redis, info: WorkerInfo) -> None:
    """Record the family a starting worker's model belongs to. Best effort: a worker that cannot
    write it still serves, and its heartbeat says the same."""
    record = FamilyRecord(family=info.family, cross_attention_dim=info.cross_attention_dim)
    try:
        redis.hset(MODEL_FAMILIES_KEY, info.model, record.model_dump_json())
    except RedisError as exc:
        log.warning("could not record the family of model %s: %s", info.model, exc)


def recorded_model_family(redis: Redis, model: str) -> FamilyRecord | None:
    raw = redis.hget(MODEL_FAMILIES_KEY, model)
    if raw is None:
        return None
    try:
        return FamilyRecord.model_validate_json(raw)
    except ValidationError:
        # A family this version does not know: as if nothing were recorded.
        return None


def model_target(redis: Redis, model: str, workers: list[WorkerInfo]) -> ModelTarget:
    """`model` as its live workers (of `workers`) describe it, else as its record does, else of
    the default family with its cross-attention unknown."""
    serving = [worker for worker in workers if worker.model == model]
    if serving:
        # Workers of one model that disagree are misconfigured; the majority decides.
        family = Counter(worker.family for worker in serving).most_common(1)[0][0]
        dims = Counter(
            worker.cross_attention_dim
            for worker in serving
            if worker.family == family and worker.cross_attention_dim is not None
        )
        dim = dims.most_common(1)[0][0] if dims else None
        return ModelTarget(model, FAMILIES[family], dim)
    record = recorded_model_family(redis, model)
    if record is not None:
        return ModelTarget(model, FAMILIES[record.family], record.cross_attention_dim)
    return ModelTarget(model, DEFAULT_FAMILY, None, known=False)
