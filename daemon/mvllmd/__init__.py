"""mvllmd: owns a host's accelerators and the vLLM servers on them, and runs rollout jobs across them."""
