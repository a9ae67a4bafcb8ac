"""The rollout role: who samples the policy (rollout.engine, docs/rollout.md).

    hf     the policy's own ZeRO-3 ranks, Hugging Face `generate` (EngineWorker.generate)
    vllm   vLLM engines, Ray actors in their own Python environment (vllm_engine), kept in step
           with the policy by a weight sync after every update and a check of it (engines)

Nothing here is imported by the policy's ranks except `weights` (what a sync sends).
"""
