"""The operator model the replay gate and the paired canary score assisted accuracy with."""

from dagster import Config
from pydantic import Field

from cvops_pipelines.core.measure.replay import Operator


class OperatorConfig(Config):
    operator_top_k: int = Field(2, description="Operator model: suggestions shown.")
    operator_p_right: float = Field(
        0.95, description="Operator model: chance of picking the right suggestion when it is shown."
    )

    def operator(self) -> Operator:
        return Operator(self.operator_top_k, self.operator_p_right)
