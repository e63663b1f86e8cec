"""What users of a MoLink swarm touch: models, generation, and the `molink-swarm` CLI."""

from molink.swarm.distributed import DistributedModelForCausalLM
from molink.swarm.model import LocalSpansModelForCausalLM

__all__ = ["DistributedModelForCausalLM", "LocalSpansModelForCausalLM"]
