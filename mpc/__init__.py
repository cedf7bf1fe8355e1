"""mpc: low-precision embedding tables with an FP32 cache, for DLRM on Criteo.

Reproduces "Mixed-Precision Embedding Using a Cache" (Yang et al., 2020), DQRM
(Zhou et al., 2024) and an inference-acceleration study in the spirit of "Does Form
Follow Function?" (Abbasi et al., 2021). Data flows one way:

    Criteo TSV / synthetic generator -> mpc.data (binary splits, batches)
      -> mpc.model (DLRM + an embedding backend) -> mpc.train -> results/*.json
      -> notebooks (tables, figures)
"""

__version__ = "0.1.0"
