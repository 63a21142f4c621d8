"""Memory and throughput planner: the DeepSpeed plan for a model and a pool, before any GPU runs.

- ``hardware``: what one host of each pool has (GPU memory, matmul rate, links, RAM): the one
  table of GPU peaks.
- ``architecture``: the model's dimensions, from the config, a Hugging Face config.json or both.
- ``flops``: model FLOPs per token, the MFU numerator the planner, the training loop and the
  benchmarks share.
- ``memory``: peak GPU memory and host RAM of one setting (DeepSpeed's model-state accounting,
  the per-layer activation formula of Korthikanti et al. 2022, logits, buffers).
- ``throughput``: step time and MFU from hardware FLOPs (recomputation included), matmul rate,
  ZeRO collectives and PCIe offload.
- ``search``: every candidate setting, the fastest that fits, why the others lost; applying the
  plan to a config; the predictions the training stage logs beside what it measured.

Nothing here imports torch: the first Airflow task and ``pipeline plan`` run without it.
"""
