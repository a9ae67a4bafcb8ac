"""ReferenceWorker: a Ray actor holding the frozen reference model, away from the policy ranks.

It answers "log-probs of these rows" for the offline losses. A pool of replicas answers
chunks in parallel; the controller writes the answers once to Parquet, and the policy
workers read them beside the tokens, so the reference never costs a policy rank memory.
"""

from __future__ import annotations

import numpy as np
import torch

from prefopt.config import RunConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ReferenceWorker:
    def __init__(self, config_json: str, model_dir: str, data_path: str):
        from transformers import AutoModelForCausalLM

        from prefopt.data import TokenizedData

        self.cfg = RunConfig.model_validate_json(config_json)
        torch.set_num_threads(max(1, int(self.cfg.cluster.cpus_per_worker)))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[self.cfg.model.dtype])
        self.model.requires_grad_(False).eval()
        self.data = TokenizedData.open(data_path)

    @torch.no_grad()
    def logps(self, indices: list[int]) -> dict[str, np.ndarray]:
        """Summed completion log-probs (fp32) of the given rows, one array per sequence role."""
        from prefopt.algorithms.offline import sequence_logps_of_rows

        return {k: v.numpy() for k, v in sequence_logps_of_rows(self.model, self.data, indices, self.cfg).items()}
