"""dsv's workloads for echosim, the step-time simulator: echosim imports nothing of dsv, dsv
plugs in here through echosim's public API.

    dit.py       DiTWorkload: one FSDP (and context-parallel) training step of dsv's video DiT,
                 the workload behind `echosim trace|simulate|calibrate|validate --preset ...`
                 (entry point `dit` of the group echosim.workloads)
    kernels.py   dsv's Triton kernel as the CUDA kernel of echosim's modelled sparse attention
"""
